//! The core's only notion of wall-clock time: an anchor the driver hands
//! in. The core reads no clock itself.

use std::time::Instant;

/// Which Unix time an `Instant` was: the core reads no clock, so the
/// driver hands it this anchor (at start, and again now and then so NTP
/// adjustments are followed). Bite start times and membership stamps
/// derive from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixClock {
    anchor: Instant,
    unix_us: u64,
}

impl UnixClock {
    /// `anchor` was Unix microsecond `unix_us`.
    pub fn new(anchor: Instant, unix_us: u64) -> Self {
        UnixClock { anchor, unix_us }
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        (self.unix_us + now.saturating_duration_since(self.anchor).as_micros() as u64) / 1000
    }
}
