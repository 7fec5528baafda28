//! The core's settings.

use std::net::SocketAddr;
use std::time::Duration;

use str0m::net::Protocol;

use super::bite::BiteConfig;
use super::conversation::speaker::SpeakerConfig;
use super::peer::budget::BudgetConfig;

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// This node's id: it stamps the joins accepted here (the tiebreak of
    /// the cluster's membership order).
    pub node_id: String,
    /// The addresses put in every answer as the server's host candidates
    /// (one per address family it serves, or more); a datagram is
    /// considered delivered to the first one of its source's family.
    pub candidates: Vec<SocketAddr>,
    /// The addresses of the passive ICE-TCP candidates (RFC 6544), if TCP
    /// is served; a frame is delivered to the first one of its family.
    pub tcp_candidates: Vec<SocketAddr>,
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
    /// How many of a speaker's previous packets ride as RED (RFC 2198)
    /// redundancy on each packet to a listener that negotiated RED, at most
    /// [`MAX_RED_DISTANCE`]; 0 does not negotiate RED at all.
    pub red_distance: usize,
    /// Whether answers carry `usedtx=1` (docs/ARCHITECTURE.md, decision 28).
    pub opus_dtx: bool,
}

/// Most redundant packets per RED packet (`red_distance`).
pub const MAX_RED_DISTANCE: usize = super::red::MAX_DISTANCE;

impl SfuConfig {
    /// The candidate a datagram of `proto` from `source` was delivered to:
    /// the first of that transport and address family (the first of all if
    /// none matches).
    pub fn local_for(&self, proto: Protocol, source: SocketAddr) -> SocketAddr {
        let list = match proto {
            Protocol::Tcp if !self.tcp_candidates.is_empty() => &self.tcp_candidates,
            _ => &self.candidates,
        };
        list.iter()
            .find(|c| c.is_ipv4() == source.is_ipv4())
            .or(list.first())
            .copied()
            .unwrap_or(source)
    }

    /// Production defaults around one candidate address.
    pub fn new(candidate_addr: SocketAddr) -> Self {
        SfuConfig {
            node_id: "local".into(),
            candidates: vec![candidate_addr],
            tcp_candidates: Vec::new(),
            max_peers: 10_000,
            max_peers_per_user: 16,
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            membership_grace: Duration::from_secs(60),
            speaker: SpeakerConfig::default(),
            bites: BiteConfig::default(),
            budget: BudgetConfig::default(),
            red_distance: 2,
            opus_dtx: true,
        }
    }
}
