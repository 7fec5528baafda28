//! Fuzz target `red`: see `beep_sfu::testkit::fuzz::red`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::red(data);
});
