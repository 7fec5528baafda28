//! Deadlines of every peer (and of membership grace periods) in one min-heap.
//!
//! The media loop must never poll every `Rtc` on a wake. Each entry is
//! `(deadline, key)`; an entry is *stale* when the owner has since armed an
//! earlier deadline or has gone away, and stale entries are skipped when they
//! reach the top. Pushing and popping cost O(log n).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::ids::PeerId;

/// What a deadline belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A peer: its `Rtc` timeout, its connect deadline or its idle deadline.
    Peer(PeerId),
    /// The end of a user's membership grace period (user id).
    Grace(String),
    /// The earliest moment another node of the cluster may fall silent.
    Cluster,
}

/// A min-heap of deadlines with lazy invalidation.
#[derive(Debug, Default)]
pub struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl TimerHeap {
    /// Adds a deadline. Owners remember what they armed so they can tell a
    /// stale entry from a live one when it pops.
    pub fn push(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest deadline, stale or not.
    pub fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        if self.peek()? <= now {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.push(t0 + Duration::from_millis(30), TimerKey::Peer(PeerId(3)));
        h.push(t0 + Duration::from_millis(10), TimerKey::Peer(PeerId(1)));
        h.push(t0 + Duration::from_millis(20), TimerKey::Grace("u".into()));
        assert_eq!(h.pop_due(t0), None);
        let now = t0 + Duration::from_millis(25);
        assert_eq!(h.pop_due(now).map(|e| e.1), Some(TimerKey::Peer(PeerId(1))));
        assert_eq!(
            h.pop_due(now).map(|e| e.1),
            Some(TimerKey::Grace("u".into()))
        );
        assert_eq!(h.pop_due(now), None);
        assert_eq!(h.heap.len(), 1);
    }
}
