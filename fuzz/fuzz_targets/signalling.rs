//! Fuzz target `signalling`: see `beep_sfu::testkit::fuzz::signalling`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::signalling(data);
});
