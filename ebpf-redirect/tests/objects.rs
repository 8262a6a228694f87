//! The committed eBPF objects match their sources: `bpf/build.sh` rebuilds them into a scratch
//! directory and each must equal the committed one, byte for byte or, where clang's output bytes
//! differ (another clang build), in its disassembly and relocations.
//!
//! Needs clang with the BPF target and libbpf headers. In CI (`CI` set) a missing clang fails the
//! test; elsewhere it is skipped with a loud message.

// Test helpers panic on a broken toolchain like the tests do.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The first of `candidates` that runs.
fn find_tool(candidates: &[&str]) -> Option<String> {
    candidates.iter().find_map(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| (*c).to_owned())
    })
}

/// Instructions with relocations, and the contents of the sections that define maps (BTF) and
/// the license: everything the kernel gets from the object except debug info.
fn disassembly(objdump: &str, obj: &Path) -> String {
    let run = |args: &[&str]| {
        let out = Command::new(objdump)
            .args(args)
            .arg(obj)
            .output()
            .expect("llvm-objdump runs");
        assert!(out.status.success(), "llvm-objdump {}", obj.display());
        // Lines naming the file differ between the two paths.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.contains("file format"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let code = run(&["-d", "-r", "--no-show-raw-insn"]);
    let data = run(&["-s", "-j", ".BTF", "-j", ".maps", "-j", "license"]);
    format!("{code}\n{data}")
}

#[test]
#[ignore = "needs clang-19 with the BPF target; the test command installs it and runs this with --include-ignored"]
fn committed_objects_match_their_sources() {
    let Some(clang) = find_tool(&["clang-19", "clang"]) else {
        panic!(
            "clang (with the BPF target) is needed to rebuild bpf/*.bpf.c (scripts/test.sh installs clang-19)"
        );
    };
    let bpf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bpf");
    let out = std::env::temp_dir().join(format!("eastguard-bpf-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("scratch dir");
    let status = Command::new(bpf.join("build.sh"))
        .arg(&out)
        .env("CLANG", &clang)
        .status()
        .expect("bpf/build.sh runs");
    assert!(status.success(), "bpf/build.sh failed");
    let mut checked = 0;
    for entry in std::fs::read_dir(&bpf).expect("bpf dir") {
        let src = entry.expect("entry").path();
        let Some(name) = src.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        let committed = bpf.join(format!("{stem}.bpf.o"));
        let rebuilt = out.join(format!("{stem}.bpf.o"));
        assert!(committed.exists(), "{name} has no committed object");
        let a = std::fs::read(&committed).expect("committed object");
        let b = std::fs::read(&rebuilt).expect("rebuilt object");
        if a != b {
            let objdump = find_tool(&["llvm-objdump-19", "llvm-objdump"])
                .expect("llvm-objdump to compare differing objects");
            assert_eq!(
                disassembly(&objdump, &committed),
                disassembly(&objdump, &rebuilt),
                "{stem}.bpf.o is stale: run ebpf-redirect/bpf/build.sh and commit the result"
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no bpf/*.bpf.c found");
    let _ = std::fs::remove_dir_all(&out);
}

/// The committed object carries every program and map the loader attaches (aya parses it; no
/// kernel needed).
#[test]
fn object_has_every_program_and_map() {
    let obj = aya_obj_names();
    for want in [
        "eg_guard",
        "eg_getsockopt",
        "eg_sockops",
        "eg_sk_msg",
        "eg_connect4",
        "eg_connect6",
        "eg_sk_lookup",
    ] {
        assert!(
            obj.contains(&want.to_owned()),
            "{want} missing from {obj:?}"
        );
    }
}

fn aya_obj_names() -> Vec<String> {
    eastguard_ebpf_redirect::object_programs()
}
