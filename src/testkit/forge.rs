//! A forger for the cluster's trust tests: seals messages as a node that
//! holds a cluster key (a compromised node) would, with any node id at all,
//! so a test can show what an authenticated but hostile node can and cannot
//! do. Outsiders without the key are played by publishing raw bytes.

use crate::cluster::seal::{ClusterKey, Kind, Sealer};

/// What a forged message claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forged {
    /// A heartbeat or goodbye.
    Heartbeat,
    /// A join.
    Join,
    /// A media batch.
    Media,
}

/// Seals as one sender boot, with its own running counter.
pub struct Forger(Sealer);

impl Forger {
    /// A forger holding `key`, sealing as `node` (unchecked: a hostile
    /// node may write anything there) in boot `instance`.
    pub fn new(key: &ClusterKey, node: &str, instance: u64) -> Self {
        Forger(Sealer::new(key, node, instance))
    }

    /// The sealed bytes of `body` for `subject`, sent at Unix ms `sent_ms`.
    pub fn seal(&mut self, kind: Forged, subject: &str, sent_ms: u64, body: &[u8]) -> Vec<u8> {
        let kind = match kind {
            Forged::Heartbeat => Kind::Heartbeat,
            Forged::Join => Kind::Join,
            Forged::Media => Kind::Media,
        };
        self.0.seal(kind, subject, sent_ms, body)
    }
}
