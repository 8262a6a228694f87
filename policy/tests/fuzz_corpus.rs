//! Replays the committed fuzz corpora (`policy/fuzz/corpus/*`) through the fuzz targets' checks,
//! so every input a fuzzer ever found interesting keeps passing in `cargo test`.

use std::path::Path;

fn replay(
    target: &str,
    check: fn(&[u8]) -> Result<(), eastguard_policy::fuzzing::Violation>,
) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = check(&data) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
    n
}

#[test]
fn normalize_corpus() {
    let n = replay("normalize", eastguard_policy::fuzzing::check_normalize);
    println!("normalize corpus: {n} inputs");
}

#[test]
fn compile_evaluate_corpus() {
    let n = replay(
        "compile_evaluate",
        eastguard_policy::fuzzing::check_compile_evaluate,
    );
    println!("compile_evaluate corpus: {n} inputs");
}
