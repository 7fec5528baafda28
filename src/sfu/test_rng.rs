//! A small deterministic generator for the property-style unit tests, the
//! test kit's seeded losses and its fake microphones, so a failure repeats
//! exactly.

/// Xorshift64: the next pseudo-random number on each call.
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
