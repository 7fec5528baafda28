//! The sans-IO core: a small facade, [`Sfu`], over parts named for what they
//! hold.
//!
//! | part | holds |
//! |---|---|
//! | [`peers`] `PeerTable` | every [`peer`] `Peer` (its `Rtc`, slots, timers), the [`demux`], the connected count |
//! | [`membership`] `Memberships` | users, their conversation, their clients, their grace period |
//! | [`conversation`] `Conversations` | members, the [`speaker`] selector, slot assignment, the listener table |
//! | [`bite`] `BiteAssembler` | the talk spurt being cut for each speaker |
//! | [`timer`] `TimerHeap` | peer and grace deadlines |
//!
//! [`Sfu`] owns no socket, thread, channel or clock. It is driven by
//! [`Sfu::handle_datagram`], [`Sfu::handle_request`] and
//! [`Sfu::handle_timeout`], each given the current time, and it answers
//! through [`Sfu::poll_transmit`], [`Sfu::poll_event`] and
//! [`Sfu::poll_timeout`]. What remains in this file is glue: it takes what
//! one part decided and hands it to the next.

mod bite;
mod bite_audio;
mod budget;
mod cluster;
mod conversation;
mod demux;
mod forward;
mod membership;
mod offer;
mod outbox;
mod peer;
mod peers;
mod relay;
mod slot;
mod speaker;
mod stats;
#[cfg(test)]
mod test_rng;
mod timer;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, info};
use str0m::net::{Protocol, Transmit};
use str0m::{Input, RtcConfig};

pub use api::{
    ClusterInput, ConnectError, JoinError, Member, PeerId, Presence, RelayedPacket, Reply, Request,
    SfuEvent,
};
pub use bite::unix_clock_now;
pub use bite::{BiteConfig, FinishedBite};
pub use budget::BudgetConfig;
pub use config::SfuConfig;
pub use offer::MAX_OFFER_BYTES;
pub use peer::{Claim, CloseReason};
pub use speaker::{speaker_csrc, SpeakerConfig};
pub(crate) use stats::Export;
pub use stats::{CoreStats, Snapshot};

use bite::BiteAssembler;
use cluster::Cluster;
use conversation::{ConvKey, Conversations};
use membership::{Grace, Memberships, PeerGone};
use outbox::{Outbox, Pending};
use peer::{Limits, Peer, PeerTimer};
use peers::{Dropped, PeerTable};
use timer::{TimerHeap, TimerKey};

mod admission;
#[cfg(any(test, feature = "test-kit"))]
mod test_hooks;
#[cfg(feature = "test-kit")]
pub use test_hooks::internals;
mod api;
mod config;

/// The whole SFU state, driven by its caller.
pub struct Sfu {
    config: SfuConfig,
    rtc_config: RtcConfig,
    peers: PeerTable,
    members: Memberships,
    convs: Conversations,
    bites: BiteAssembler,
    /// The other nodes, when this one is part of a cluster.
    cluster: Cluster,
    /// True while a `TimerKey::Cluster` entry is in the heap.
    cluster_armed: bool,
    /// Which Unix microsecond an `Instant` was (for membership stamps).
    clock: (Instant, u64),
    timers: TimerHeap,
    out: Outbox,
    events: VecDeque<SfuEvent>,
    stats: CoreStats,
    shutting_down: bool,
    /// Due timers popped before any is handled (handling may arm new ones).
    due: Vec<(Instant, TimerKey)>,
}

impl Sfu {
    /// A core with no peers, its bite start times read off the system clock.
    pub fn new(config: SfuConfig) -> Self {
        Self::with_clock(config, unix_clock_now())
    }

    /// A core whose Unix clock is given: `clock.0` is the `Instant` that was
    /// Unix microsecond `clock.1` (bite start times derive from it).
    pub fn with_clock(config: SfuConfig, clock: (Instant, u64)) -> Self {
        Sfu {
            rtc_config: admission::rtc_config(),
            peers: PeerTable::default(),
            members: Memberships::new(config.membership_grace),
            convs: Conversations::new(config.speaker),
            bites: BiteAssembler::new(config.bites, clock),
            cluster: Cluster::default(),
            cluster_armed: false,
            clock,
            timers: TimerHeap::default(),
            out: Outbox::default(),
            events: VecDeque::new(),
            stats: CoreStats::default(),
            shutting_down: false,
            due: Vec::new(),
            config,
        }
    }

    /// Re-anchors the Unix clock bite start times derive from (the driver
    /// calls this now and then, so NTP adjustments are followed).
    pub fn set_unix_clock(&mut self, clock: (Instant, u64)) {
        self.bites.set_clock(clock);
        self.clock = clock;
    }

    /// Unix milliseconds at `now`.
    fn unix_ms(&self, now: Instant) -> u64 {
        (self.clock.1 + now.saturating_duration_since(self.clock.0).as_micros() as u64) / 1000
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
            cluster_nodes: self.cluster.node_count(),
            remote_speakers: self.cluster.speaker_count(),
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

    fn on_connected(&mut self, id: PeerId, now: Instant) {
        if !self.peers.mark_connected(id) {
            return;
        }
        let Some(peer) = self.peers.get(id) else {
            return;
        };
        self.stats.peers_connected += 1;
        match peer.addrs().first() {
            Some((proto, a)) => info!("{} connected from {a} ({proto:?})", peer.label()),
            None => info!("{} connected", peer.label()),
        }
        self.events.push_back(SfuEvent::PeerConnected(id));
        if let Some(key) = self.members.peer_connected(&peer.claim().userid) {
            self.convs.add_member(key, id, peer.slot_count(), now);
        }
        self.arm(id);
    }

    fn peer_timeout(&mut self, id: PeerId, at: Instant, now: Instant) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if peer.armed() != Some(at) {
            return; // stale entry
        }
        peer.set_armed(None);
        match peer.expired(now) {
            Some(PeerTimer::Connect) => self.remove_peer(id, CloseReason::ConnectTimeout, now),
            Some(PeerTimer::Idle) => self.remove_peer(id, CloseReason::Idle, now),
            Some(PeerTimer::Rtc) => {
                self.stats.rtc_timeouts += 1;
                if !peer.handle_input(Input::Timeout(now), &mut self.out) {
                    self.stats.dropped_rejected += 1;
                }
                arm(peer, &mut self.timers);
            }
            None => arm(peer, &mut self.timers),
        }
    }

    /// Takes a peer out of its conversation, finishing its open bite.
    fn leave(&mut self, key: ConvKey, id: PeerId, now: Instant) {
        if let Some(b) = self.bites.flush(id) {
            self.events.push_back(bite_event(b));
        }
        self.convs.remove_member(key, id, now);
    }

    fn remove_peer(&mut self, id: PeerId, reason: CloseReason, now: Instant) {
        if let Some(key) = self.convs.of(id) {
            self.leave(key, id, now);
        }
        let Some(mut peer) = self.peers.remove(id) else {
            return;
        };
        // Say goodbye (DTLS close_notify, RTCP BYE) if the peer got that far.
        peer.close(&mut self.out);
        let userid = &peer.claim().userid;
        let keep = !self.shutting_down;
        if let PeerGone::GraceUntil(t) = self.members.peer_removed(userid, id, now, keep) {
            self.timers.push(t, TimerKey::Grace(userid.clone()));
        }
        self.stats.peers_closed += 1;
        info!("{} closed: {reason}", peer.label());
        self.events
            .push_back(SfuEvent::PeerClosed { peer: id, reason });
    }

    /// Makes sure the timer heap holds this peer's next deadline.
    fn arm(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.get_mut(id) {
            arm(peer, &mut self.timers);
        }
    }
}

/// Puts the peer's next deadline in the heap if it is earlier than the one
/// already armed (later ones are found when the armed entry pops).
fn arm(peer: &mut Peer, timers: &mut TimerHeap) {
    let d = peer.next_deadline();
    if peer.armed().is_none_or(|a| d < a) {
        peer.set_armed(Some(d));
        timers.push(d, TimerKey::Peer(peer.id()));
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
