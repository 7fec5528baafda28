//! Fuzz target `datagram`: see `beep_sfu::testkit::fuzz::datagram`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::datagram(data);
});
