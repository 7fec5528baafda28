//! Warnings that outside input can cause are rate-limited: one line per
//! interval per kind of event, with a count of what was suppressed, so a
//! flood of bad messages cannot flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rate-limited log line.
pub(crate) struct LogLimit {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Calls `log` with the number of events suppressed since the last
    /// line, if a line is due; otherwise counts this one. Never blocks for
    /// long (the lock is held only to update two numbers) and is never used
    /// on the media loop.
    pub fn log(&self, now: Instant, log: impl FnOnce(u64)) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if s.0
            .is_some_and(|at| now.saturating_duration_since(at) < self.every)
        {
            s.1 += 1;
            return;
        }
        let suppressed = s.1;
        *s = (Some(now), 0);
        drop(s);
        log(suppressed);
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
