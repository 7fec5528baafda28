//! The sans-IO core: a small facade, [`Sfu`], over parts named for what they
//! hold.
//!
//! | part | holds |
//! |---|---|
//! | `peer/` | `PeerTable` (`table.rs`): every `Peer` (its `Rtc`, slots, timers), the demux (`demux.rs`), the connected count; a peer's offer checks, outbox, media budget and slot rewriting |
//! | `conversation/` | `Conversations`: members, the speaker selector (`speaker.rs`), slot assignment, the listener table; `Memberships` (`membership.rs`): users, their conversation, clients, grace |
//! | `bite/` | `BiteAssembler`: the talk spurt being cut for each speaker, and its audio (`audio.rs`) |
//! | `nodes.rs` | `Nodes`: the other nodes of a cluster and their remote speakers |
//! | `timer.rs` | `TimerHeap`: peer, grace and cluster deadlines |
//! | `ids.rs`, `api.rs` | the ids every part shares; the driving vocabulary and its errors |
//!
//! The facade's own work is split by what it answers: `request.rs`
//! (connect, candidate, join, shutdown), `forward.rs` (a local packet),
//! `relay.rs` (what other nodes said), `lifecycle.rs` (a peer connects,
//! times out, goes).
//!
//! [`Sfu`] owns no socket, thread, channel or clock. It is driven by
//! [`Sfu::handle_datagram`], [`Sfu::handle_request`] and
//! [`Sfu::handle_timeout`], each given the current time, and it answers
//! through [`Sfu::poll_transmit`], [`Sfu::poll_event`] and
//! [`Sfu::poll_timeout`]. What remains in this file is glue: it takes what
//! one part decided and hands it to the next.

mod api;
mod bite;
mod clock;
mod config;
mod conversation;
mod forward;
mod ids;
mod lifecycle;
mod nodes;
pub(crate) mod opus;
mod peer;
pub(crate) mod red;
mod relay;
mod request;
mod stats;
#[cfg(any(test, feature = "test-kit"))]
mod test_hooks;
#[cfg(any(test, feature = "test-kit"))]
pub(crate) mod test_rng;
mod timer;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, info};
use str0m::net::{Protocol, Transmit};
use str0m::RtcConfig;

pub use api::{
    CandidateError, Claim, CloseReason, ClusterInput, ConnectError, InternalError, JoinError,
    Member, OfferError, PeerFailure, Presence, RelayedPacket, Reply, Request, SfuEvent,
};
pub use bite::{BiteAudio, BiteConfig, FinishedBite};
pub use clock::UnixClock;
pub use config::{SfuConfig, MAX_RED_DISTANCE};
pub use conversation::speaker::{speaker_csrc, SpeakerConfig};
pub use ids::PeerId;
pub use peer::budget::BudgetConfig;
pub use peer::offer::MAX_OFFER_BYTES;
pub(crate) use stats::Export;
pub use stats::{CoreStats, Snapshot};
#[cfg(feature = "test-kit")]
pub use test_hooks::internals;

use bite::BiteAssembler;
use conversation::membership::{Grace, Memberships};
use conversation::Conversations;
use ids::SpeakerId;
use nodes::Nodes;
use peer::outbox::{Outbox, Pending};
use peer::table::{Dropped, PeerTable};
use timer::{TimerHeap, TimerKey};

/// The whole SFU state, driven by its caller.
pub struct Sfu {
    config: SfuConfig,
    rtc_config: RtcConfig,
    peers: PeerTable,
    members: Memberships,
    convs: Conversations,
    bites: BiteAssembler,
    /// The other nodes, when this one is part of a cluster.
    nodes: Nodes,
    /// True while a `TimerKey::Cluster` entry is in the heap.
    cluster_armed: bool,
    /// Which Unix time an `Instant` was (bite starts, membership stamps).
    clock: UnixClock,
    timers: TimerHeap,
    out: Outbox,
    events: VecDeque<SfuEvent>,
    stats: CoreStats,
    shutting_down: bool,
    /// Due timers popped before any is handled (handling may arm new ones).
    due: Vec<(Instant, TimerKey)>,
    /// Each speaker's last packets, for RED listeners and uplink recovery
    /// (empty when RED is off).
    histories: HashMap<SpeakerId, red::History>,
}

impl Sfu {
    /// A core with no peers. The core reads no clock: `clock` says which
    /// Unix time an `Instant` was (bite start times derive from it).
    pub fn new(config: SfuConfig, clock: UnixClock) -> Self {
        Sfu {
            peers: PeerTable::default(),
            members: Memberships::new(config.membership_grace),
            convs: Conversations::new(config.speaker),
            bites: BiteAssembler::new(config.bites),
            nodes: Nodes::new(config.budget),
            cluster_armed: false,
            clock,
            timers: TimerHeap::default(),
            out: Outbox::default(),
            events: VecDeque::new(),
            stats: CoreStats::default(),
            shutting_down: false,
            due: Vec::new(),
            histories: HashMap::new(),
            rtc_config: request::rtc_config(config.red_distance > 0, config.opus_dtx),
            config,
        }
    }

    /// Re-anchors the Unix clock bite start times derive from (the driver
    /// calls this now and then, so NTP adjustments are followed).
    pub fn set_unix_clock(&mut self, clock: UnixClock) {
        self.clock = clock;
    }

    /// Feeds one received UDP datagram. (Never inlined: profiles, such as
    /// the callgrind recipe in BENCHMARKS.md, tell its callers apart.)
    #[inline(never)]
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, buf: &[u8]) {
        self.handle_receive(now, Protocol::Udp, source, buf);
    }

    /// Feeds one received datagram of `proto` (a UDP datagram, or one RFC
    /// 4571 frame off a TCP connection from `source`). Returns true if a
    /// peer's `Rtc` took it (for TCP: the connection belongs to a client).
    pub fn handle_receive(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        buf: &[u8],
    ) -> bool {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += buf.len() as u64;
        let local = self.config.local_for(proto, source);
        let taken = match self
            .peers
            .handle_datagram(now, proto, local, source, buf, &mut self.out)
        {
            Ok((id, accepted)) => {
                if !accepted {
                    self.stats.dropped_rejected += 1;
                }
                self.arm(id);
                accepted
            }
            Err(Dropped::Malformed) => {
                self.stats.dropped_malformed += 1;
                false
            }
            Err(Dropped::UnknownSource) => {
                self.stats.dropped_unknown_source += 1;
                false
            }
            Err(Dropped::Rejected) => {
                self.stats.dropped_rejected += 1;
                false
            }
        };
        self.process_pending(now);
        taken
    }

    /// Answers one request (connect, candidate, join, shutdown).
    pub fn handle_request(&mut self, now: Instant, request: Request) -> Reply {
        let reply = match request {
            Request::Connect { claim, offer } => Reply::Connect(self.connect(now, claim, &offer)),
            Request::Candidate { peer, candidate } => {
                Reply::Candidate(self.add_candidate(peer, &candidate))
            }
            Request::Join {
                userid,
                conversation,
            } => Reply::Join(self.join(now, &userid, &conversation)),
            Request::Shutdown => {
                self.shutdown(now);
                Reply::Shutdown
            }
        };
        self.process_pending(now);
        reply
    }

    /// Fires every deadline that has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        while let Some(e) = self.timers.pop_due(now) {
            due.push(e);
        }
        for (at, key) in due.drain(..) {
            match key {
                TimerKey::Peer(id) => self.peer_timeout(id, at, now),
                TimerKey::Grace(userid) => match self.members.grace_expired(&userid, now) {
                    Grace::Expired(Some(key)) => {
                        info!("user {userid} left their conversation: no client reconnected within the grace period");
                        self.convs.user_left(key);
                    }
                    Grace::Expired(None) | Grace::Nothing => {}
                    Grace::Later(t) => self.timers.push(t, TimerKey::Grace(userid)),
                },
                TimerKey::Cluster => self.cluster_timeout(now),
            }
        }
        self.due = due;
        if self.bites.poll_timeout().is_some_and(|t| t <= now) {
            let mut done = Vec::new();
            self.bites.handle_timeout(now, &mut done);
            self.events.extend(done.into_iter().map(bite_event));
        }
        self.process_pending(now);
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    /// When [`Sfu::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timers.peek(), self.bites.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counters and gauges, for metrics and health.
    pub fn snapshot(&self) -> Snapshot {
        let mut stats = self.stats;
        stats.speaker_changes = self.convs.reassignments();
        stats.bite_packets_late = self.bites.dropped_late();
        Snapshot {
            stats,
            peers: self.peers.len(),
            connected: self.peers.connected(),
            conversations: self.convs.count(),
            open_bites: self.bites.open_count(),
            cluster_nodes: self.nodes.node_count(),
            remote_speakers: self.nodes.speaker_count(),
        }
    }

    /// True once a shutdown ran and every peer is gone.
    pub fn is_drained(&self) -> bool {
        self.shutting_down && self.peers.len() == 0
    }

    fn process_pending(&mut self, now: Instant) {
        while let Some(p) = self.out.pending.pop_front() {
            match p {
                Pending::Rtp(id, pkt) => self.on_rtp(id, pkt, now),
                Pending::Connected(id) => self.on_connected(id, now),
                Pending::Close(id, reason) => self.remove_peer(id, reason, now),
            }
        }
    }

    /// Makes sure the timer heap holds this peer's next deadline.
    fn arm(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.get_mut(id) {
            peer.arm(&mut self.timers);
        }
    }
}

/// The event for a finished bite, logged at debug level.
fn bite_event(b: FinishedBite) -> SfuEvent {
    debug!(
        "bite of {}/{} in {}: {} packets, {} ms",
        b.userid, b.clientid, b.conversation, b.packets, b.duration_ms
    );
    SfuEvent::Bite(b)
}
