//! Links `eastguard-sidecar`, when built with the `sidecar` profile, with the functions a sidecar
//! runs placed first and together in its code, in the order of `src/bin/eastguard-sidecar.order`.
//!
//! Why: the kernel maps a binary's code into a process 64 KiB around each page it runs, so code
//! that runs scattered among code that does not keeps most of the binary resident. Grouped, a
//! sidecar's resident code shrinks to about what it runs (benches/RESULTS.md, "Code in the order
//! it runs"). The file is made by `benches/compare.py --symbol-order` (callgrind over a bench
//! run); a name it lists that a later build no longer has is skipped, so a stale file costs
//! memory, not correctness.
//!
//! Only for the `sidecar` profile on x86_64 Linux with Rust 1.90 or later, where rustc links
//! with its bundled `lld`, which knows `--symbol-ordering-file`. `EASTGUARD_NO_SYMBOL_ORDER=1`
//! turns it off (a linker of one's own that lacks the flag).

use std::path::Path;

const ORDER: &str = "src/bin/eastguard-sidecar.order";

fn main() {
    println!("cargo::rerun-if-changed={ORDER}");
    println!("cargo::rerun-if-env-changed=EASTGUARD_NO_SYMBOL_ORDER");
    let out_dir = std::env::var_os("OUT_DIR").unwrap_or_default();
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<package>-<hash>/out.
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(Path::file_name);
    let target = std::env::var("TARGET").unwrap_or_default();
    if profile != Some("sidecar".as_ref())
        || target != "x86_64-unknown-linux-gnu"
        || std::env::var_os("EASTGUARD_NO_SYMBOL_ORDER").is_some_and(|v| v != "0")
    {
        return;
    }
    if !links_with_lld() {
        println!(
            "cargo::warning=rustc before 1.90 links with the system linker: the sidecar's code is linked unordered"
        );
        return;
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let order = Path::new(&manifest_dir).join(ORDER);
    if !order.is_file() {
        println!("cargo::warning={ORDER} is missing: the sidecar's code is linked unordered");
        return;
    }
    let order = order.display();
    println!("cargo::rustc-link-arg-bin=eastguard-sidecar=-Wl,--symbol-ordering-file={order}");
    println!("cargo::rustc-link-arg-bin=eastguard-sidecar=-Wl,--no-warn-symbol-ordering");
}

/// Whether this rustc is 1.90 or later, which links x86_64 Linux programs with its own `lld`.
fn links_with_lld() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
