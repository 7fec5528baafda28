//! The sans-IO core: every peer's `Rtc`, the conversations, speaker
//! selection and the forwarding decision.
//!
//! [`Sfu`] owns no socket, thread, channel or clock. It is driven by plain
//! calls — [`Sfu::handle_datagram`], [`Sfu::connect`], [`Sfu::join`],
//! [`Sfu::handle_timeout`] — each given the current time, and it answers
//! through [`Sfu::poll_transmit`] (datagrams to send), [`Sfu::poll_event`]
//! (things the driver must tell others about) and [`Sfu::poll_timeout`]
//! (when to call again). The media loop in `crate::net` is one driver; the
//! in-memory test harness and the benchmarks are others.
//!
//! Forwarding path: a datagram is demultiplexed in O(1) ([`demux`]), handed
//! to that peer's `Rtc`, which yields RTP packets; each packet updates the
//! conversation's [`speaker::SpeakerSelector`] and, if its sender is an active
//! speaker, is rewritten per subscriber [`slot::Slot`] and written to the
//! subscriber's `Rtc`, whose SRTP output is queued for sending.

pub mod bite;
pub mod conversation;
pub mod demux;
pub mod peer;
pub mod slot;
pub mod speaker;
pub mod stats;
pub mod timer;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use str0m::change::SdpOffer;
use str0m::media::Mid;
use str0m::net::{Protocol, Receive, Transmit};
use str0m::rtp::{Extension, ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, RtcConfig};

use bite::{BiteAssembler, BiteConfig, FinishedBite, Owner};
use conversation::{ConvKey, Conversation};
pub use peer::Claim;
use peer::Peer;
use slot::Slot;
use speaker::{SpeakerConfig, SpeakerSelector};
pub use stats::CoreStats;
use timer::{TimerHeap, TimerKey};

/// Identifies a peer for its whole life; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How often open bites are checked for silence.
const BITE_TICK: Duration = Duration::from_millis(100);
/// Most slots one conversation's selector keeps active.
const MAX_ACTIVE_SPEAKERS: usize = 16;
/// Longest accepted SDP offer.
pub const MAX_OFFER_BYTES: usize = 64 * 1024;

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
    /// Speaker selection tuning.
    pub speaker: SpeakerConfig,
    /// Bite segmentation.
    pub bites: BiteConfig,
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
        }
    }
}

/// Why a connect was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The peer limit is reached.
    ServerFull,
    /// This user already has the most clients allowed.
    UserLimit,
    /// The server is shutting down.
    ShuttingDown,
    /// The offer could not be parsed or accepted.
    MalformedOffer(String),
    /// The offer has no audio m-line with Opus.
    NoOpus,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::ServerFull => write!(f, "server is at its peer limit"),
            ConnectError::UserLimit => write!(f, "this user has too many connected clients"),
            ConnectError::ShuttingDown => write!(f, "server is shutting down"),
            ConnectError::MalformedOffer(e) => write!(f, "malformed offer: {e}"),
            ConnectError::NoOpus => write!(f, "offer has no audio m-line with Opus"),
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The server is shutting down.
    ShuttingDown,
}

/// Why a peer was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// ICE/DTLS did not complete within the connect timeout.
    ConnectTimeout,
    /// No datagram for the idle timeout.
    Idle,
    /// ICE reported the peer disconnected, or DTLS was closed.
    Disconnected,
    /// `Rtc` failed (error text).
    Failed(String),
    /// The server is shutting down.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ConnectTimeout => write!(f, "not connected within the connect timeout"),
            CloseReason::Idle => write!(f, "no traffic within the idle timeout"),
            CloseReason::Disconnected => write!(f, "disconnected"),
            CloseReason::Failed(e) => write!(f, "failed: {e}"),
            CloseReason::Shutdown => write!(f, "server shutting down"),
        }
    }
}

/// What the driver must act on besides sending datagrams.
#[derive(Debug)]
pub enum SfuEvent {
    /// ICE and DTLS are up for this peer.
    PeerConnected(PeerId),
    /// The peer is gone and all its state freed.
    PeerClosed {
        /// Which peer.
        peer: PeerId,
        /// Why.
        reason: CloseReason,
    },
    /// A talk spurt is finished and ready to publish.
    Bite(FinishedBite),
}

/// Work found while draining an `Rtc`, handled once the drain is complete
/// (so no two `Rtc`s are borrowed at once).
// RTP packets dominate and are moved, not boxed: the queue's buffer is
// reused, so boxing would add an allocation per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Pending {
    Connected(PeerId),
    Close(PeerId, CloseReason),
    Rtp(PeerId, RtpPacket),
}

/// The whole SFU state, driven by its caller.
pub struct Sfu {
    config: SfuConfig,
    rtc_config: RtcConfig,
    peers: HashMap<PeerId, Peer>,
    demux: demux::Demux,
    timers: TimerHeap,
    users: HashMap<String, User>,
    conversations: HashMap<ConvKey, Conversation>,
    conversation_keys: HashMap<String, ConvKey>,
    next_peer: u64,
    next_conversation: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SfuEvent>,
    pending: VecDeque<Pending>,
    scratch_peers: Vec<PeerId>,
    scratch_due: Vec<(Instant, TimerKey)>,
    shutting_down: bool,
    stats: CoreStats,
    /// Connected peers, kept as a count so metrics need no scan.
    connected: usize,
    bites: BiteAssembler,
    bite_tick: Option<Instant>,
    scratch_bites: Vec<FinishedBite>,
}

/// A user's membership and connected clients.
#[derive(Debug, Default)]
struct User {
    conversation: Option<ConvKey>,
    peers: Vec<PeerId>,
    grace_until: Option<Instant>,
}

impl Sfu {
    /// A core with no peers. Generates the one DTLS certificate all peers share
    /// (generating one per peer would stall the loop for milliseconds).
    pub fn new(config: SfuConfig) -> Self {
        Self::with_clock(config, unix_clock_now())
    }

    /// Re-anchors the Unix clock bite start times derive from (the driver
    /// calls this now and then, so NTP adjustments are followed).
    pub fn set_unix_clock(&mut self, clock: (Instant, u64)) {
        self.bites.set_clock(clock);
    }

    /// A core whose Unix clock is given: `clock.0` is the `Instant` that was
    /// Unix microsecond `clock.1` (bite start times derive from it).
    pub fn with_clock(config: SfuConfig, clock: (Instant, u64)) -> Self {
        let provider = str0m::crypto::from_feature_flags();
        let mut rtc_config = RtcConfig::new()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .set_rtp_mode(true)
            .set_stats_interval(None)
            // Opus is not retransmitted: a short send buffer saves memory per slot.
            .set_send_buffer_audio(8)
            // Only the extensions an audio SFU uses: the RFC 6464 level (speaker
            // selection, bites) and the mid. Transport-wide congestion control
            // would cost a sequence register per sent packet (about 90 KiB per
            // peer) for a bandwidth estimate nobody reads.
            .clear_extension_map()
            .set_extension(1, Extension::AudioLevel)
            .set_extension(4, Extension::RtpMid);
        if let Some(cert) = provider.dtls_provider.generate_certificate() {
            rtc_config = rtc_config.set_dtls_cert(cert);
        }
        Sfu {
            rtc_config,
            peers: HashMap::new(),
            demux: demux::Demux::default(),
            timers: TimerHeap::default(),
            users: HashMap::new(),
            conversations: HashMap::new(),
            conversation_keys: HashMap::new(),
            next_peer: 1,
            next_conversation: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            pending: VecDeque::new(),
            scratch_peers: Vec::new(),
            scratch_due: Vec::new(),
            shutting_down: false,
            stats: CoreStats::default(),
            connected: 0,
            bites: BiteAssembler::new(config.bites, clock),
            bite_tick: None,
            scratch_bites: Vec::new(),
            config,
        }
    }

    /// The configuration the core runs with.
    pub fn config(&self) -> &SfuConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Number of peers (connecting or connected).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of connected peers.
    pub fn connected_count(&self) -> usize {
        self.connected
    }

    /// Number of conversations with members or joined users.
    pub fn conversation_count(&self) -> usize {
        self.conversations.len()
    }

    /// The conversation a user is in, if any.
    pub fn conversation_of(&self, userid: &str) -> Option<&str> {
        let key = self.users.get(userid)?.conversation?;
        self.conversations.get(&key).map(|c| c.name.as_str())
    }

    /// True if this peer exists and is connected.
    pub fn is_connected(&self, peer: PeerId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.connected)
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<SfuEvent> {
        self.events.pop_front()
    }

    /// When [`Sfu::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek()
    }

    /// True once [`Sfu::shutdown`] ran and every peer is gone.
    pub fn is_drained(&self) -> bool {
        self.shutting_down && self.peers.is_empty()
    }

    /// Creates a peer from a client's SDP offer and returns it with the answer.
    pub fn connect(
        &mut self,
        now: Instant,
        claim: Claim,
        offer: &str,
    ) -> Result<(PeerId, String), ConnectError> {
        if self.shutting_down {
            return Err(ConnectError::ShuttingDown);
        }
        if self.peers.len() >= self.config.max_peers {
            self.stats.connects_refused += 1;
            return Err(ConnectError::ServerFull);
        }
        if self
            .users
            .get(&claim.userid)
            .is_some_and(|u| u.peers.len() >= self.config.max_peers_per_user)
        {
            self.stats.connects_refused += 1;
            return Err(ConnectError::UserLimit);
        }
        check_offer_text(offer)?;
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| ConnectError::MalformedOffer(e.to_string()))?;
        let candidate = Candidate::host(self.config.candidate_addr, "udp")
            .map_err(|e| ConnectError::MalformedOffer(format!("server candidate: {e}")))?;
        let rtc_config = self.rtc_config.clone();
        let built = catch_unwind(AssertUnwindSafe(move || {
            let mut rtc = rtc_config.build(now);
            rtc.add_local_candidate(candidate);
            let answer = rtc.sdp_api().accept_offer(offer);
            (rtc, answer)
        }));
        let (mut rtc, answer) = built
            .map_err(|_| ConnectError::MalformedOffer("offer could not be processed".into()))?;
        let answer = answer.map_err(|e| ConnectError::MalformedOffer(e.to_string()))?;
        let mut ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        while self.demux.ufrag_taken(&ufrag) {
            let creds = str0m::IceCreds::new();
            ufrag = creds.ufrag.clone();
            rtc.direct_api().set_local_ice_credentials(creds);
        }
        let id = PeerId(self.next_peer);
        self.next_peer += 1;
        let answer = answer.to_sdp_string();
        // Slots and sources come from the negotiated audio m-lines.
        let mut slots = Vec::new();
        let mut sending_mlines = 0;
        for mid in audio_mids(&answer) {
            let Some(media) = rtc.media(mid) else {
                continue;
            };
            let dir = media.direction();
            if dir.is_sending() {
                slots.push(Slot::new(mid, rand::random(), rand::random()));
            }
            if dir.is_receiving() {
                sending_mlines += 1;
            }
        }
        if slots.is_empty() && sending_mlines == 0 {
            return Err(ConnectError::NoOpus);
        }
        let userid = claim.userid.clone();
        let peer = Peer {
            id,
            claim,
            rtc,
            ufrag: ufrag.clone(),
            addrs: Vec::new(),
            slots,
            sending_mlines,
            connected: false,
            conversation: None,
            created: now,
            last_rx: now,
            rtc_deadline: now,
            armed: None,
        };
        self.peers.insert(id, peer);
        self.demux.add_ufrag(ufrag, id);
        self.user_mut(&userid).peers.push(id);
        // str0m may report a far-future timeout right after accept_offer until
        // it has seen the current time once.
        self.feed(id, Input::Timeout(now));
        self.process_pending(now);
        let Some(peer) = self.peers.get(&id) else {
            return Err(ConnectError::MalformedOffer(
                "peer failed right after the offer".into(),
            ));
        };
        self.stats.peers_created += 1;
        info!(
            "{} created: {} receiving slot(s), {} sending m-line(s)",
            peer.label(),
            peer.slots.len(),
            peer.sending_mlines
        );
        Ok((id, answer))
    }

    /// Adds a trickled remote ICE candidate (`candidate:…` or `a=candidate:…`).
    /// The server is ICE-lite and learns addresses from STUN checks anyway,
    /// so a candidate that does not parse is reported but harmless.
    pub fn add_remote_candidate(
        &mut self,
        now: Instant,
        peer: PeerId,
        candidate: &str,
    ) -> Result<(), String> {
        let text = candidate.trim();
        let text = text.strip_prefix("a=").unwrap_or(text);
        if text.is_empty() {
            // An empty candidate is the end-of-candidates marker.
            return Ok(());
        }
        let parsed = catch_unwind(|| Candidate::from_sdp_string(text))
            .map_err(|_| "candidate could not be parsed".to_string())?
            .map_err(|e| format!("bad candidate: {e}"))?;
        let Some(p) = self.peers.get_mut(&peer) else {
            return Err("peer is gone".into());
        };
        p.rtc.add_remote_candidate(parsed);
        self.drain(peer);
        self.process_pending(now);
        Ok(())
    }

    /// Moves every client of `userid` (and those that connect later) into the
    /// conversation `name`, out of any other.
    pub fn join(&mut self, now: Instant, userid: &str, name: &str) -> Result<(), JoinError> {
        if self.shutting_down {
            return Err(JoinError::ShuttingDown);
        }
        let key = match self.conversation_keys.get(name) {
            Some(k) => *k,
            None => {
                let k = ConvKey(self.next_conversation);
                self.next_conversation += 1;
                self.conversation_keys.insert(name.to_string(), k);
                let selector = SpeakerSelector::new(self.config.speaker, 2);
                self.conversations
                    .insert(k, Conversation::new(name.to_string(), selector));
                k
            }
        };
        let old = self.users.get(userid).and_then(|u| u.conversation);
        if old == Some(key) {
            return Ok(());
        }
        if let Some(old) = old {
            self.leave_conversation(userid, old, now);
        }
        if let Some(c) = self.conversations.get_mut(&key) {
            c.users += 1;
        }
        let user = self.user_mut(userid);
        user.conversation = Some(key);
        let no_clients = user.peers.is_empty();
        let peers = user.peers.clone();
        for p in peers {
            if self.peers.get(&p).is_some_and(|p| p.connected) {
                self.add_member(key, p, now);
            }
        }
        if no_clients {
            self.start_grace(userid, now);
        }
        self.stats.joins += 1;
        info!("user {userid} joined conversation {name}");
        Ok(())
    }

    /// Feeds one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, buf: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += buf.len() as u64;
        let id = match demux::kind(buf) {
            Some(demux::Kind::Stun) => {
                demux::stun_local_ufrag(buf).and_then(|u| self.demux.by_ufrag(u))
            }
            Some(demux::Kind::Other) => self.demux.by_addr(&source),
            None => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let Some(id) = id else {
            self.stats.dropped_unknown_source += 1;
            return;
        };
        let input = match Receive::new(Protocol::Udp, source, self.config.candidate_addr, buf) {
            Ok(r) => Input::Receive(now, r),
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            self.stats.dropped_unknown_source += 1;
            return;
        };
        if !peer.rtc.accepts(&input) {
            self.stats.dropped_rejected += 1;
            return;
        }
        peer.last_rx = now;
        if !peer.addrs.contains(&source) && peer.addrs.len() < demux::MAX_ADDRS_PER_PEER {
            peer.addrs.push(source);
            self.demux.learn_addr(source, id);
        } else if peer.addrs.contains(&source) && self.demux.by_addr(&source) != Some(id) {
            self.demux.learn_addr(source, id);
        }
        self.feed(id, input);
        self.process_pending(now);
    }

    /// Advances every peer whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.scratch_due);
        due.clear();
        while let Some(e) = self.timers.pop_due(now) {
            due.push(e);
        }
        for (at, key) in due.drain(..) {
            match key {
                TimerKey::Peer(id) => self.peer_timeout(id, at, now),
                TimerKey::Grace(userid) => self.grace_timeout(&userid, now),
                TimerKey::Bites => self.bite_tick(now),
            }
        }
        self.scratch_due = due;
        self.process_pending(now);
    }

    /// Closes every peer (sending DTLS close and RTCP BYE) and refuses new
    /// work. The driver keeps sending [`Sfu::poll_transmit`] output after it.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.remove_peer(id, CloseReason::Shutdown, now);
        }
    }

    fn user_mut(&mut self, userid: &str) -> &mut User {
        if !self.users.contains_key(userid) {
            self.users.insert(userid.to_string(), User::default());
        }
        self.users.get_mut(userid).expect("inserted above")
    }

    fn peer_timeout(&mut self, id: PeerId, at: Instant, now: Instant) {
        let (connect_timeout, idle_timeout) =
            (self.config.connect_timeout, self.config.idle_timeout);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.armed != Some(at) {
            return; // stale entry
        }
        peer.armed = None;
        if !peer.connected && now >= peer.created + connect_timeout {
            self.remove_peer(id, CloseReason::ConnectTimeout, now);
        } else if now >= peer.last_rx + idle_timeout {
            self.remove_peer(id, CloseReason::Idle, now);
        } else if now >= peer.rtc_deadline {
            self.stats.rtc_timeouts += 1;
            self.feed(id, Input::Timeout(now));
        } else {
            self.arm(id);
        }
    }

    /// Closes bites whose speaker went quiet; re-arms while any is open.
    fn bite_tick(&mut self, now: Instant) {
        self.bite_tick = None;
        let mut done = std::mem::take(&mut self.scratch_bites);
        self.bites.poll_silence(now, &mut done);
        self.emit_bites(&mut done);
        self.scratch_bites = done;
        self.arm_bite_tick(now);
    }

    fn arm_bite_tick(&mut self, now: Instant) {
        if self.bite_tick.is_none() && self.bites.open_count() > 0 {
            let at = now + BITE_TICK;
            self.bite_tick = Some(at);
            self.timers.push(at, TimerKey::Bites);
        }
    }

    fn emit_bites(&mut self, done: &mut Vec<FinishedBite>) {
        for b in done.drain(..) {
            self.stats.bites += 1;
            debug!(
                "bite of {}/{} in {}: {} packets, {} ms",
                b.userid, b.clientid, b.conversation, b.packets, b.duration_ms
            );
            self.events.push_back(SfuEvent::Bite(b));
        }
    }

    fn grace_timeout(&mut self, userid: &str, now: Instant) {
        let Some(user) = self.users.get(userid) else {
            return;
        };
        if !user.peers.is_empty() || user.grace_until.is_none_or(|g| g > now) {
            return;
        }
        if let Some(key) = user.conversation {
            info!("user {userid} left their conversation: no client reconnected within the grace period");
            self.leave_conversation(userid, key, now);
        }
        self.users.remove(userid);
    }

    fn start_grace(&mut self, userid: &str, now: Instant) {
        let until = now + self.config.membership_grace;
        let user = self.user_mut(userid);
        user.grace_until = Some(until);
        self.timers.push(until, TimerKey::Grace(userid.to_string()));
    }

    /// Hands one input to a peer's `Rtc` and drains it. A panic inside str0m
    /// (it should have none, but the input came from outside) closes only
    /// that peer.
    fn feed(&mut self, id: PeerId, input: Input) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let rtc = &mut peer.rtc;
        match catch_unwind(AssertUnwindSafe(|| rtc.handle_input(input))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("{}: input rejected: {e}", peer.label());
                self.stats.dropped_rejected += 1;
            }
            Err(_) => {
                warn!(
                    "{}: str0m panicked on input; closing the peer",
                    peer.label()
                );
                self.pending.push_back(Pending::Close(
                    id,
                    CloseReason::Failed("internal error".into()),
                ));
                return;
            }
        }
        self.drain(id);
    }

    /// Drains one `Rtc` to its timeout and re-arms its deadline.
    fn drain(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        drain_into(peer, &mut self.transmits, &mut self.pending);
        arm_peer(peer, &mut self.timers, &self.config);
    }

    /// Makes sure the timer heap holds this peer's next deadline.
    fn arm(&mut self, id: PeerId) {
        if let Some(peer) = self.peers.get_mut(&id) {
            arm_peer(peer, &mut self.timers, &self.config);
        }
    }

    fn process_pending(&mut self, now: Instant) {
        while let Some(p) = self.pending.pop_front() {
            match p {
                Pending::Rtp(id, pkt) => self.on_rtp(id, pkt, now),
                Pending::Connected(id) => self.on_connected(id, now),
                Pending::Close(id, reason) => self.remove_peer(id, reason, now),
            }
        }
    }

    fn on_connected(&mut self, id: PeerId, now: Instant) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.connected {
            return;
        }
        peer.connected = true;
        self.connected += 1;
        self.stats.peers_connected += 1;
        let userid = peer.claim.userid.clone();
        match peer.addrs.first() {
            Some(a) => info!("{} connected from {a}", peer.label()),
            None => info!("{} connected", peer.label()),
        }
        self.events.push_back(SfuEvent::PeerConnected(id));
        let user = self.user_mut(&userid);
        user.grace_until = None;
        if let Some(key) = user.conversation {
            self.add_member(key, id, now);
        }
        self.arm(id);
    }

    fn on_rtp(&mut self, src: PeerId, pkt: RtpPacket, now: Instant) {
        self.stats.rtp_in += 1;
        let Some(key) = self.peers.get(&src).and_then(|p| p.conversation) else {
            self.stats.rtp_outside_conversation += 1;
            return;
        };
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        let level = pkt.header.ext_vals.audio_level;
        if conv.selector.on_packet(src, level, now) {
            self.reassign_slots(key);
        }
        let finished = match (self.peers.get(&src), self.conversations.get(&key)) {
            (Some(peer), Some(conv)) => {
                let owner = Owner {
                    conversation: &conv.name,
                    userid: &peer.claim.userid,
                    clientid: &peer.claim.clientid,
                };
                self.bites
                    .on_packet(src, owner, pkt.header.timestamp, &pkt.payload, level, now)
            }
            _ => return,
        };
        if let Some(b) = finished {
            self.emit_bites(&mut vec![b]);
        }
        self.arm_bite_tick(now);
        let Some(conv) = self.conversations.get(&key) else {
            return;
        };
        let Some(listeners) = conv.listeners.get(&src) else {
            return;
        };
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            ..Default::default()
        };
        let in_seq = *pkt.seq_no;
        let in_ts = pkt.header.timestamp;
        for &(sub, idx) in listeners {
            let Some(peer) = self.peers.get_mut(&sub) else {
                continue;
            };
            if !peer.connected {
                continue;
            }
            let Some(&Slot { mid, pt, .. }) = peer.slots.get(idx) else {
                continue;
            };
            if pt.is_none() {
                let pt = peer.opus_pt(mid);
                peer.slots[idx].pt = pt;
            }
            let slot = &mut peer.slots[idx];
            let Some(pt) = slot.pt else { continue };
            let Some(rw) = slot.rewrite(src, in_seq, in_ts, now) else {
                continue;
            };
            let mut api = peer.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                continue;
            };
            tx.write_rtp(
                RtpWrite::new(
                    pt,
                    SeqNo::from(rw.seq),
                    rw.timestamp,
                    now,
                    pkt.payload.clone(),
                )
                .marker(rw.marker)
                .ext_vals(ext.clone()),
            );
            self.stats.forwarded += 1;
            // Drain the subscriber right away (str0m's single-mutation rule);
            // whatever it reports is queued in `pending`.
            drain_into(peer, &mut self.transmits, &mut self.pending);
            // str0m's pacer releases queued RTP on a timeout; hand it "now"
            // at once so the packet leaves in this wake, not the next one.
            if peer.rtc.handle_input(Input::Timeout(now)).is_ok() {
                drain_into(peer, &mut self.transmits, &mut self.pending);
            }
            arm_peer(peer, &mut self.timers, &self.config);
        }
    }

    /// Maps the active speakers of a conversation onto every member's slots,
    /// keeping a speaker on the slot it already has, and rebuilds the
    /// listener table the forwarding path reads.
    fn reassign_slots(&mut self, key: ConvKey) {
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        conv.listeners.clear();
        let mut desired = std::mem::take(&mut self.scratch_peers);
        for &m in &conv.members {
            let Some(peer) = self.peers.get_mut(&m) else {
                continue;
            };
            conv.selector.top_for(m, peer.slots.len(), &mut desired);
            for slot in &mut peer.slots {
                match slot.source {
                    Some(s) if desired.contains(&s) => desired.retain(|d| *d != s),
                    _ => slot.source = None,
                }
            }
            let mut next = desired.drain(..);
            for slot in peer.slots.iter_mut().filter(|s| s.source.is_none()) {
                slot.source = next.next();
            }
            drop(next);
            for (i, slot) in peer.slots.iter().enumerate() {
                if let Some(s) = slot.source {
                    conv.listeners.entry(s).or_default().push((m, i));
                }
            }
        }
        desired.clear();
        self.scratch_peers = desired;
        self.stats.speaker_changes += 1;
    }

    fn add_member(&mut self, key: ConvKey, id: PeerId, now: Instant) {
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        if !conv.members.contains(&id) {
            conv.members.push(id);
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.conversation = Some(key);
            debug!("{} is in conversation {}", p.label(), conv.name);
        }
        self.resize_selector(key, now);
        self.reassign_slots(key);
    }

    fn remove_member(&mut self, key: ConvKey, id: PeerId, now: Instant) {
        if let Some(b) = self.bites.flush(id) {
            self.emit_bites(&mut vec![b]);
        }
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        conv.members.retain(|m| *m != id);
        conv.selector.remove(id);
        if let Some(p) = self.peers.get_mut(&id) {
            p.conversation = None;
            for s in &mut p.slots {
                s.source = None;
            }
        }
        self.resize_selector(key, now);
        self.reassign_slots(key);
        self.drop_if_abandoned(key);
    }

    fn resize_selector(&mut self, key: ConvKey, now: Instant) {
        let Some(conv) = self.conversations.get_mut(&key) else {
            return;
        };
        let most_slots = conv
            .members
            .iter()
            .filter_map(|m| self.peers.get(m))
            .map(|p| p.slots.len())
            .max()
            .unwrap_or(1);
        conv.selector
            .set_capacity((most_slots + 1).min(MAX_ACTIVE_SPEAKERS), now);
    }

    fn drop_if_abandoned(&mut self, key: ConvKey) {
        if self
            .conversations
            .get(&key)
            .is_some_and(|c| c.is_abandoned())
        {
            if let Some(c) = self.conversations.remove(&key) {
                self.conversation_keys.remove(&c.name);
                debug!("conversation {} is empty and was dropped", c.name);
            }
        }
    }

    fn leave_conversation(&mut self, userid: &str, key: ConvKey, now: Instant) {
        let peers = self
            .users
            .get(userid)
            .map(|u| u.peers.clone())
            .unwrap_or_default();
        for p in peers {
            self.remove_member(key, p, now);
        }
        if let Some(u) = self.users.get_mut(userid) {
            u.conversation = None;
        }
        if let Some(c) = self.conversations.get_mut(&key) {
            c.users = c.users.saturating_sub(1);
        }
        self.drop_if_abandoned(key);
    }

    fn remove_peer(&mut self, id: PeerId, reason: CloseReason, now: Instant) {
        let Some(key) = self.peers.get(&id).map(|p| p.conversation) else {
            return;
        };
        if let Some(key) = key {
            self.remove_member(key, id, now);
        }
        let Some(mut peer) = self.peers.remove(&id) else {
            return;
        };
        // Say goodbye (DTLS close_notify, RTCP BYE) if the peer got that far.
        if peer.connected {
            let rtc = &mut peer.rtc;
            if catch_unwind(AssertUnwindSafe(|| rtc.close())).is_ok() {
                let mut dump = VecDeque::new();
                drain_into(&mut peer, &mut self.transmits, &mut dump);
            }
        }
        self.demux.forget(id, &peer.ufrag, &peer.addrs);
        let userid = peer.claim.userid.clone();
        let no_clients_left = match self.users.get_mut(&userid) {
            Some(u) => {
                u.peers.retain(|p| *p != id);
                u.peers.is_empty()
            }
            None => false,
        };
        if no_clients_left {
            if self
                .users
                .get(&userid)
                .is_some_and(|u| u.conversation.is_some())
                && !self.shutting_down
            {
                self.start_grace(&userid, now);
            } else {
                self.users.remove(&userid);
            }
        }
        if peer.connected {
            self.connected -= 1;
        }
        self.stats.peers_closed += 1;
        info!("{} closed: {reason}", peer.label());
        self.events
            .push_back(SfuEvent::PeerClosed { peer: id, reason });
    }
}

/// Drains an `Rtc` to its timeout: datagrams go to `transmits`, everything
/// that touches other state (media, connect, close) is deferred to `pending`,
/// so no two `Rtc`s are ever borrowed at once.
fn drain_into(
    peer: &mut Peer,
    transmits: &mut VecDeque<Transmit>,
    pending: &mut VecDeque<Pending>,
) {
    let id = peer.id;
    loop {
        match peer.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                peer.rtc_deadline = t;
                break;
            }
            Ok(Output::Transmit(t)) => transmits.push_back(t),
            Ok(Output::Event(e)) => match e {
                RtcEvent::RtpPacket(p) => pending.push_back(Pending::Rtp(id, p)),
                RtcEvent::Connected => pending.push_back(Pending::Connected(id)),
                RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected)
                | RtcEvent::Closed => {
                    pending.push_back(Pending::Close(id, CloseReason::Disconnected))
                }
                _ => {}
            },
            Err(e) => {
                pending.push_back(Pending::Close(id, CloseReason::Failed(e.to_string())));
                break;
            }
        }
    }
    if !peer.rtc.is_alive() {
        pending.push_back(Pending::Close(id, CloseReason::Disconnected));
    }
}

/// Puts the peer's next deadline in the heap if it is earlier than the one
/// already armed (later ones are found when the armed entry pops).
fn arm_peer(peer: &mut Peer, timers: &mut TimerHeap, config: &SfuConfig) {
    let d = peer.next_deadline(config.connect_timeout, config.idle_timeout);
    if peer.armed.is_none_or(|a| d < a) {
        peer.armed = Some(d);
        timers.push(d, TimerKey::Peer(peer.id));
    }
}

/// Now, as an `Instant` and Unix microseconds read back to back.
pub fn unix_clock_now() -> (Instant, u64) {
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    (Instant::now(), unix_us)
}

/// The mids of the audio m-lines of an SDP, in order.
fn audio_mids(sdp: &str) -> Vec<Mid> {
    let mut mids = Vec::new();
    let mut in_audio = false;
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            in_audio = m.starts_with("audio ");
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            if in_audio {
                mids.push(Mid::from(mid));
            }
        }
    }
    mids
}

/// Cheap checks on an offer before str0m parses it: size, an audio m-line,
/// and Opus among its codecs.
fn check_offer_text(offer: &str) -> Result<(), ConnectError> {
    if offer.len() > MAX_OFFER_BYTES {
        return Err(ConnectError::MalformedOffer(format!(
            "offer is larger than {MAX_OFFER_BYTES} bytes"
        )));
    }
    if !offer.trim_start().starts_with("v=0") {
        return Err(ConnectError::MalformedOffer(
            "an SDP offer starts with v=0".into(),
        ));
    }
    let mut in_audio = false;
    for line in offer.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            in_audio = m.starts_with("audio ");
        } else if in_audio {
            if let Some(rest) = line.strip_prefix("a=rtpmap:") {
                let codec = rest.split_whitespace().nth(1).unwrap_or("");
                if codec.to_ascii_lowercase().starts_with("opus/48000") {
                    return Ok(());
                }
            }
        }
    }
    Err(ConnectError::NoOpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_text_checks() {
        assert!(matches!(
            check_offer_text("hello"),
            Err(ConnectError::MalformedOffer(_))
        ));
        assert_eq!(
            check_offer_text("v=0\r\nm=video 9 UDP 96\r\na=rtpmap:96 VP8/90000\r\n"),
            Err(ConnectError::NoOpus)
        );
        assert_eq!(
            check_offer_text("v=0\r\nm=audio 9 UDP 0\r\na=rtpmap:0 PCMU/8000\r\n"),
            Err(ConnectError::NoOpus)
        );
        assert_eq!(
            check_offer_text("v=0\r\nm=audio 9 UDP 111\r\na=rtpmap:111 opus/48000/2\r\n"),
            Ok(())
        );
        let huge = format!("v=0\r\n{}", "a".repeat(MAX_OFFER_BYTES));
        assert!(matches!(
            check_offer_text(&huge),
            Err(ConnectError::MalformedOffer(_))
        ));
    }
}
