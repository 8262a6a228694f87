#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = eastguard_proxy::fuzzing::check_translate(data) {
        panic!("{e}");
    }
});
