//! The media loop's side of a cluster: what other nodes said goes into the
//! core in batches, and this node's heartbeat goes out when presence changed.

use std::time::{Duration, Instant};

use super::MediaLoop;

/// Least time between two heartbeats sent because presence changed.
const PRESENCE_SPACING: Duration = Duration::from_millis(50);
/// Bytes of cluster input (decoded size) handled per wake: about 200
/// relayed packets, or one large heartbeat.
const CLUSTER_TURN_BYTES: usize = 64 * 1024;

impl MediaLoop {
    /// Feeds what other nodes said, up to a budget in bytes per turn (a
    /// flood from NATS cannot hold the loop); true if more wait.
    pub(super) fn handle_cluster(&mut self) -> bool {
        let mut spent = 0;
        while spent < CLUSTER_TURN_BYTES {
            let Some((input, cost)) = self.cluster.as_ref().and_then(|c| c.take()) else {
                return false;
            };
            spent += cost;
            self.sfu.handle_cluster(Instant::now(), input);
            self.send_transmits();
        }
        self.cluster.as_ref().is_some_and(|c| c.has_more())
    }

    /// Sends this node's heartbeat every second, and soon after a
    /// conversation gained its first or lost its last member here.
    pub(super) fn heartbeat(&mut self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        self.presence_dirty |= self.sfu.take_presence_changed();
        if self.stopping || !self.presence_dirty || self.heartbeat_at.elapsed() < PRESENCE_SPACING {
            return;
        }
        cluster.heartbeat(self.sfu.presence());
        self.heartbeat_at = Instant::now();
        self.presence_dirty = false;
    }
}
