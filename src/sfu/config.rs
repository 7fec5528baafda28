//! The core's settings.

use std::net::SocketAddr;
use std::time::Duration;

use super::bite::BiteConfig;
use super::budget::BudgetConfig;
use super::speaker::SpeakerConfig;

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The address put in every answer as the server's one host candidate,
    /// and the address datagrams are considered delivered to.
    pub candidate_addr: SocketAddr,
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
    /// Production defaults around one candidate address.
    pub fn new(candidate_addr: SocketAddr) -> Self {
        SfuConfig {
            candidate_addr,
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
