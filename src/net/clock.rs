//! The one place the wall clock is read for the core: the driver anchors
//! the core's `Instant`s to Unix time with it (the core itself reads no
//! clock).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::sfu::UnixClock;

/// Now, as an `Instant` and Unix microseconds read back to back.
pub(crate) fn unix_clock_now() -> UnixClock {
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    UnixClock::new(Instant::now(), unix_us)
}
