#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = eastguard_policy::fuzzing::check_compile_evaluate(data) {
        panic!("{e}");
    }
});
