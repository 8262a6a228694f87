//! Finds the descriptor set that `envoy-types` ships (`src/generated/types.bin`) so the codec can
//! embed it: the JSON form of Envoy's protos comes from their descriptors, not from hand-written code.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(&manifest_dir)
        .output();
    let path = match out {
        Ok(o) if o.status.success() => find(&o.stdout),
        Ok(o) => fail(&format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run cargo metadata: {e}")),
    };
    if !path.is_file() {
        fail(&format!("{} is missing", path.display()));
    }
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=ENVOY_DESCRIPTOR_SET={}", path.display());
}

fn find(metadata: &[u8]) -> PathBuf {
    let v: serde_json::Value = match serde_json::from_slice(metadata) {
        Ok(v) => v,
        Err(e) => fail(&format!("cargo metadata printed bad JSON: {e}")),
    };
    let manifest = v["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str());
    match manifest {
        Some(m) => PathBuf::from(m)
            .with_file_name("src")
            .join("generated")
            .join("types.bin"),
        None => fail("envoy-types is not in the dependency graph"),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("eastguard-xds build: {msg}");
    std::process::exit(1);
}
