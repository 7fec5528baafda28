//! Warnings that outside input can cause are rate-limited: one line per
//! interval per kind of event, with a count of what was suppressed, so a
//! flood of bad messages cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The moment the first rate-limited line was asked for; times are kept
/// as milliseconds since it, in atomics (no lock, so the media loop may
/// use it too).
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// One rate-limited log line.
pub(crate) struct LogLimit {
    every: Duration,
    /// Milliseconds since [`EPOCH`] (plus one) of the last line; 0: none.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Calls `log` with the number of events suppressed since the last
    /// line, if a line is due; otherwise counts this one. Lock-free.
    pub fn log(&self, now: Instant, log: impl FnOnce(u64)) {
        let epoch = *EPOCH.get_or_init(|| now);
        let now_ms = now.saturating_duration_since(epoch).as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= self.every.as_millis() as u64;
        if !due
            || self
                .last
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        log(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 0..100 {
            l.log(t0 + Duration::from_millis(i * 10), |n| lines.push(n));
        }
        assert_eq!(lines, vec![0]);
        l.log(t0 + Duration::from_secs(11), |n| lines.push(n));
        assert_eq!(lines, vec![0, 99]);
    }
}
