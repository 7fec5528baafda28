//! Fuzz target `cluster`: see `beep_sfu::testkit::fuzz::cluster`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::cluster(data);
});
