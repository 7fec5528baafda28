//! Fuzz target `claim`: see `beep_sfu::testkit::fuzz::claim`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::claim(data);
});
