//! Fuzz target `offer`: see `beep_sfu::testkit::fuzz::offer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    beep_sfu::testkit::fuzz::offer(data);
});
