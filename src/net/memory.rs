//! Gives the heap back after a peak. glibc keeps freed memory in its arenas,
//! so after 1,000 clients have come and gone the process still shows their
//! peak RSS; operators read that as a leak and orchestrators act on it.
//! When the load (peers plus conversations) has fallen to half its peak,
//! the loop asks glibc to return free pages (`malloc_trim`), at most once
//! per [`SPACING`]. It runs on the loop because a trim takes the arena locks
//! the loop allocates under: on a side thread it would stall the loop just
//! the same, only at a moment nobody chose. A trim costs milliseconds; each
//! is timed in `/metrics` (`beep_sfu_heap_trim_seconds`).

use std::time::{Duration, Instant};

/// Least time between two trims.
pub(crate) const SPACING: Duration = Duration::from_secs(30);
/// Peaks smaller than this are not worth a trim.
const MIN_PEAK: usize = 64;

/// The peak since the last trim, and when that was.
#[derive(Debug, Default)]
pub(crate) struct HeapTrim {
    peak: usize,
    last: Option<Instant>,
}

impl HeapTrim {
    /// Called now and then with the current load; trims when it is due and
    /// returns how long the trim took.
    pub fn check(&mut self, now: Instant, load: usize) -> Option<Duration> {
        self.peak = self.peak.max(load);
        let due = self.peak >= MIN_PEAK
            && load * 2 <= self.peak
            && self.last.is_none_or(|t| now.duration_since(t) >= SPACING);
        if !due {
            return None;
        }
        let start = Instant::now();
        trim();
        self.last = Some(now);
        self.peak = load;
        Some(start.elapsed())
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas; 0 keeps no pad.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_the_load_halves_and_then_not_again_within_the_spacing() {
        let mut h = HeapTrim::default();
        let t0 = Instant::now();
        assert!(h.check(t0, 10).is_none(), "small peaks are left alone");
        assert!(h.check(t0, 200).is_none(), "at the peak");
        assert!(h.check(t0, 101).is_none(), "not yet half");
        assert!(h.check(t0, 100).is_some(), "half the peak");
        assert!(h.check(t0 + SPACING / 2, 0).is_none(), "within the spacing");
        h.check(t0 + SPACING / 2, 300);
        assert!(h.check(t0 + SPACING, 100).is_some(), "spacing passed");
    }
}
