//! Fuzz target `slot`: see `beep_sfu::testkit::fuzz::slot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::slot(data);
});
