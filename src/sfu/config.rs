//! The core's settings.

use std::net::SocketAddr;
use std::time::Duration;

use super::bite::BiteConfig;
use super::budget::BudgetConfig;
use super::speaker::SpeakerConfig;

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The addresses put in every answer as the server's host candidates
    /// (one per address family it serves, or more); a datagram is
    /// considered delivered to the first one of its source's family.
    pub candidates: Vec<SocketAddr>,
    /// Most peers at once; further connects are refused.
    pub max_peers: usize,
    /// Most peers one user may have at once (their devices).
    pub max_peers_per_user: usize,
    /// A peer that has not connected within this time is removed.
    pub connect_timeout: Duration,
    /// A peer that sent nothing for this long is removed.
    pub idle_timeout: Duration,
    /// How long a user with no clients left stays in their conversation.
    pub membership_grace: Duration,
    /// Speaker selection tuning (its voiced threshold also decides bites).
    pub speaker: SpeakerConfig,
    /// Bite segmentation.
    pub bites: BiteConfig,
    /// Each peer's media budget.
    pub budget: BudgetConfig,
}

impl SfuConfig {
    /// The candidate a datagram from `source` was delivered to: the first of
    /// the same address family (the first of all if none matches).
    pub fn local_for(&self, source: SocketAddr) -> SocketAddr {
        self.candidates
            .iter()
            .find(|c| c.is_ipv4() == source.is_ipv4())
            .or(self.candidates.first())
            .copied()
            .unwrap_or(source)
    }

    /// Production defaults around one candidate address.
    pub fn new(candidate_addr: SocketAddr) -> Self {
        SfuConfig {
            candidates: vec![candidate_addr],
            max_peers: 10_000,
            max_peers_per_user: 16,
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            membership_grace: Duration::from_secs(60),
            speaker: SpeakerConfig::default(),
            bites: BiteConfig::default(),
            budget: BudgetConfig::default(),
        }
    }
}
