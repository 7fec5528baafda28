//! The media loop's side of a cluster: what other nodes said goes into the
//! core in batches, and this node's heartbeat goes out when presence changed.

use std::time::{Duration, Instant};

use super::MediaLoop;

/// Least time between two heartbeats sent because presence changed.
const PRESENCE_SPACING: Duration = Duration::from_millis(50);
/// Cluster inputs handled per wake.
const CLUSTER_BATCH: usize = 256;

impl MediaLoop {
    /// Feeds up to a batch of what other nodes said; true if more wait.
    pub(super) fn handle_cluster(&mut self) -> bool {
        let Some(inputs) = self.cluster.as_ref().map(|c| c.inputs.clone()) else {
            return false;
        };
        for _ in 0..CLUSTER_BATCH {
            match inputs.try_recv() {
                Ok(input) => {
                    self.sfu.handle_cluster(Instant::now(), input);
                    self.send_transmits();
                }
                Err(_) => return false,
            }
        }
        !inputs.is_empty()
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
