//! The descriptor set the codec embeds (`xds/envoy-types-<version>.descriptors.bin`) is the one the
//! `envoy-types` crate in `Cargo.lock` ships. The copy keeps the build free of `cargo metadata`
//! (which needs every locked package in the local cache); this test keeps the copy honest.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The version the committed copy is of; `xds/src/codec.rs` includes the file of this name.
const COPIED_VERSION: &str = "0.7.7";

#[test]
fn embedded_descriptor_set_is_the_one_envoy_types_ships() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let pkg = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types is in the dependency graph");
    let version = pkg["version"].as_str().expect("version");
    let shipped: PathBuf = Path::new(pkg["manifest_path"].as_str().expect("manifest path"))
        .with_file_name("src")
        .join("generated")
        .join("types.bin");
    assert_eq!(
        version,
        COPIED_VERSION,
        "envoy-types is now {version}: copy {} to xds/envoy-types-{version}.descriptors.bin, \
         point codec.rs at it and remove the old copy",
        shipped.display()
    );
    let copy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("envoy-types-{COPIED_VERSION}.descriptors.bin"));
    let ours = std::fs::read(&copy).expect("reading the committed descriptor set");
    let theirs = std::fs::read(&shipped).expect("reading envoy-types' descriptor set");
    assert!(
        ours == theirs,
        "{} differs from {} ({} vs {} bytes): copy it again",
        copy.display(),
        shipped.display(),
        ours.len(),
        theirs.len()
    );
    // And the codec really decodes it (the pool knows Envoy's and the xDS transport's messages).
    let pool = eastguard_xds::codec::pool().expect("the embedded set decodes");
    for name in [
        "envoy.config.listener.v3.Listener",
        "envoy.service.discovery.v3.DiscoveryRequest",
        "envoy.extensions.filters.http.rbac.v3.RBAC",
    ] {
        assert!(
            pool.get_message_by_name(name).is_some(),
            "{name} is missing"
        );
    }
}
