//! Fuzz target `request_head`: see `beep_sfu::testkit::fuzz::request_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::request_head(data);
});
