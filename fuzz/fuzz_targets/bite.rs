//! Fuzz target `bite`: see `beep_sfu::testkit::fuzz::bite`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::bite(data);
});
