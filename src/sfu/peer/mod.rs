//! One client's peer connection: its `Rtc` (private), who it belongs to, its
//! slots and its named timers.
//!
//! Everything that touches the `Rtc` is here: accepting the offer, feeding it
//! an input behind a panic guard, forwarding a packet on a slot, closing it,
//! and draining it into an [`Outbox`]. The peer never looks at other peers or
//! at conversations; what it finds that concerns them goes to
//! [`Outbox::pending`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use str0m::format::Codec;
use str0m::media::{Mid, Pt};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

pub(crate) mod budget;
pub(crate) mod demux;
pub(crate) mod offer;
pub(crate) use offer::Setup;
pub(crate) mod outbox;
pub(crate) mod slot;
pub(crate) mod table;

use super::api::{Claim, CloseReason, PeerFailure};
use super::ids::PeerId;
use super::red::Redundancy;
use super::timer::{TimerHeap, TimerKey};
use budget::{Budget, Overrun};
use demux::Origin;
use outbox::{Outbox, Pending};
use slot::{Incoming, Slot, SlotPts};

/// A peer's timers, by name (quinn's timer table, for three entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerTimer {
    /// ICE and DTLS did not come up in time.
    Connect,
    /// Nothing was received for the idle timeout.
    Idle,
    /// The `Rtc` asked to be woken (ICE consent, DTLS retransmit, pacing).
    Rtc,
}

/// Most slots (receiving audio m-lines) one peer gets; further m-lines stay
/// silent. A 64 KiB offer could otherwise ask for about 800.
pub(crate) const MAX_SLOTS: usize = 16;

/// How an admitted packet carries its Opus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// Plain Opus.
    Opus,
    /// Wrapped in RED (RFC 2198) whose blocks must carry this Opus payload
    /// type.
    Red {
        /// The peer's Opus payload type.
        opus_pt: u8,
    },
}

/// Why a peer's packet was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It came on a second sending m-line (one source per peer).
    NotSource,
    /// Its payload type is not the negotiated Opus.
    NotOpus,
    /// It was over the peer's media budget.
    Over(Overrun),
}

/// The two deadlines a peer is given besides its `Rtc`'s own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time to connect after the offer.
    pub connect: Duration,
    /// Time without a datagram before the peer is dropped.
    pub idle: Duration,
}

/// What a write put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wrote {
    /// Nothing: not connected, no such slot, or a duplicate or late packet.
    Nothing,
    /// Plain Opus.
    Opus,
    /// Opus wrapped in RED.
    Red,
}

/// str0m panicked on a write; the peer is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

/// The header fields and payload of one packet to forward.
pub(crate) struct Forward<'a> {
    /// Who is speaking, and the sender's header fields.
    pub incoming: Incoming,
    /// The CSRC naming the speaker.
    pub csrc: u32,
    /// Audio level and voice activity, forwarded as they came.
    pub ext: &'a ExtensionValues,
    /// The Opus payload, shared by every subscriber's write.
    pub payload: &'a Arc<[u8]>,
    /// The same packet wrapped with its speaker's previous ones, for the
    /// subscribers that negotiated RED.
    pub red: &'a Redundancy,
    /// Recovered from the next packet's redundancy (the speaker's uplink
    /// lost it): plain listeners get it late, RED listeners get it only as
    /// a block of the packets after it. Sent on its own, it would reach
    /// their jitter buffer late, and a late arrival makes it wait longer.
    pub recovered: bool,
}

/// A connected or connecting client.
pub(crate) struct Peer {
    id: PeerId,
    claim: Claim,
    rtc: Rtc,
    ufrag: String,
    addrs: Vec<Origin>,
    slots: Vec<Slot>,
    sending_mlines: usize,
    /// The CSRC its audio carries when forwarded ([`speaker_csrc`]).
    csrc: u32,
    /// The one m-line taken as this peer's source when it has several.
    source_mid: Option<Mid>,
    budget: Budget,
    connected: bool,
    limits: Limits,
    /// When the connect timeout fires; `None` once connected.
    connect_at: Option<Instant>,
    last_rx: Instant,
    rtc_at: Instant,
    /// The deadline currently in the timer heap for this peer, if any.
    armed: Option<Instant>,
}

impl Peer {
    // ---- getters ----

    /// Core-assigned id, never reused.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// Whose client this is.
    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    /// The server-side ICE ufrag this peer's STUN checks carry.
    pub fn ufrag(&self) -> &str {
        &self.ufrag
    }

    /// Addresses datagrams from this peer were routed from.
    pub fn addrs(&self) -> &[Origin] {
        &self.addrs
    }

    /// Number of audio m-lines the server sends on (slots).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The CSRC naming this peer's user in what it says.
    pub fn csrc(&self) -> u32 {
        self.csrc
    }

    /// Number of audio m-lines the peer sends on.
    pub fn sending_mlines(&self) -> usize {
        self.sending_mlines
    }

    /// ICE + DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Short description for logs: `peer 7 (alice/phone)`.
    pub fn label(&self) -> String {
        format!(
            "peer {} ({}/{})",
            self.id.0, self.claim.userid, self.claim.clientid
        )
    }

    // ---- handle_* ----

    /// True if the `Rtc` claims this input (a STUN check for its ufrag, or
    /// DTLS/SRTP from a known remote).
    pub fn accepts(&self, input: &Input) -> bool {
        self.rtc.accepts(input)
    }

    /// Records that a datagram came from `source`. Returns whether the
    /// address is new for this peer, and the oldest address it forgot to
    /// make room (the newest is always routed: it is the one ICE uses now).
    pub fn on_received_from(
        &mut self,
        now: Instant,
        source: Origin,
        max_addrs: usize,
    ) -> (bool, Option<Origin>) {
        self.last_rx = now;
        if self.addrs.contains(&source) {
            return (false, None);
        }
        let evicted = (self.addrs.len() >= max_addrs.max(1)).then(|| self.addrs.remove(0));
        self.addrs.push(source);
        (true, evicted)
    }

    /// Hands one input to the `Rtc` and drains it. A panic inside str0m (it
    /// should have none, but the input came from outside) closes only this
    /// peer. Returns false if the `Rtc` rejected the input.
    pub fn handle_input(&mut self, input: Input, out: &mut Outbox) -> bool {
        let rtc = &mut self.rtc;
        let accepted = match catch_unwind(AssertUnwindSafe(|| rtc.handle_input(input))) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!("{}: input rejected: {e}", self.label());
                false
            }
            Err(_) => {
                self.close_after_panic("on input", out);
                return false;
            }
        };
        self.drain(out);
        accepted
    }

    /// Adds a trickled remote candidate and drains.
    ///
    /// The candidate came from the client, so str0m takes it behind the
    /// panic guard: a panic closes this peer only.
    pub fn add_remote_candidate(&mut self, candidate: Candidate, out: &mut Outbox) {
        let rtc = &mut self.rtc;
        if catch_unwind(AssertUnwindSafe(|| rtc.add_remote_candidate(candidate))).is_err() {
            self.close_after_panic("on a trickled candidate", out);
            return;
        }
        self.drain(out);
    }

    /// Decides whether a decrypted packet from this peer is taken: from its
    /// one source m-line, Opus (plain or in RED), and within its media
    /// budget.
    pub fn admit(&mut self, pkt: &RtpPacket, now: Instant) -> Result<Carried, Refused> {
        if self.sending_mlines > 1 {
            let mid = self
                .rtc
                .direct_api()
                .stream_rx(&pkt.header.ssrc)
                .map(|s| s.mid());
            if mid != self.source_mid {
                return Err(Refused::NotSource);
            }
        }
        let pt = pkt.header.payload_type;
        let carried = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .filter(|p| p.spec().codec == Codec::Opus)
            .find_map(|p| {
                if p.pt() == pt {
                    Some(Carried::Opus)
                } else if p.red() == Some(pt) {
                    Some(Carried::Red { opus_pt: *p.pt() })
                } else {
                    None
                }
            })
            .ok_or(Refused::NotOpus)?;
        self.budget
            .admit(pkt.payload.len(), now)
            .map_err(Refused::Over)?;
        Ok(carried)
    }

    /// Charges a packet recovered from this peer's RED to its media budget,
    /// like one that arrived: redundancy cannot multiply what a sender may
    /// put through the core.
    pub fn admit_recovered(&mut self, len: usize, now: Instant) -> Result<(), Refused> {
        self.budget.admit(len, now).map_err(Refused::Over)
    }

    /// Marks the peer connected; false if it already was.
    pub fn set_connected(&mut self) -> bool {
        let was = self.connected;
        self.connected = true;
        self.connect_at = None;
        !was
    }

    /// Writes one packet on slot `idx` with continuous sequence numbers and
    /// timestamps, and releases it at once. Returns what it wrote, or that
    /// str0m panicked (the peer is then closing).
    pub fn forward(
        &mut self,
        idx: usize,
        pkt: &Forward<'_>,
        now: Instant,
        out: &mut Outbox,
    ) -> Result<Wrote, Panicked> {
        if !self.connected {
            return Ok(Wrote::Nothing);
        }
        let Some(mid) = self.slots.get(idx).map(|s| s.mid) else {
            return Ok(Wrote::Nothing);
        };
        if self.slots[idx].pts.is_none() {
            self.slots[idx].pts = self.slot_pts(mid);
        }
        let slot = &mut self.slots[idx];
        let Some(pts) = slot.pts else {
            return Ok(Wrote::Nothing);
        };
        if pkt.recovered && pts.red.is_some() {
            return Ok(Wrote::Nothing);
        }
        let Some(rw) = slot.rewrite(pkt.incoming, now) else {
            return Ok(Wrote::Nothing);
        };
        // A RED subscriber gets RED on every packet, with as many of the
        // speaker's previous packets as belong to this slot's current run
        // (none right after a switch); the others get the primary alone.
        let (pt, payload, wrote) = match pts.red {
            Some(red) => {
                let blocks = pkt.red.allowed(rw.since_run);
                (red, pkt.red.payload(blocks, *pts.opus), Wrote::Red)
            }
            None => (pts.opus, pkt.payload.clone(), Wrote::Opus),
        };
        // The payload may come from another node: str0m must never be able
        // to take the process down with it. A panic closes this peer only.
        let written = catch_unwind(AssertUnwindSafe(|| {
            let write = RtpWrite::new(pt, SeqNo::from(rw.seq), rw.timestamp, now, payload)
                .marker(rw.marker)
                .csrc(&[pkt.csrc])
                .ext_vals(pkt.ext.clone());
            if !self.rtc.direct_api().write_rtp(mid, None, write) {
                return Wrote::Nothing;
            }
            // Our str0m releases the packet in this drain with no timeout
            // fed, and the write wakes only its send path, not every event
            // source or deadline (third_party/str0m/PATCHES.md, patches 1
            // and 6).
            self.drain(out);
            wrote
        }));
        match written {
            Ok(w) => Ok(w),
            Err(_) => {
                self.connected = false;
                self.close_after_panic("writing a packet", out);
                Err(Panicked)
            }
        }
    }

    /// Says goodbye (DTLS close_notify) if the peer got that far; what it
    /// sends goes to `out.transmits`, anything else is dropped.
    pub fn close(&mut self, out: &mut Outbox) {
        if !self.connected {
            return;
        }
        let rtc = &mut self.rtc;
        if catch_unwind(AssertUnwindSafe(|| rtc.close())).is_ok() {
            let mut scratch = Outbox::default();
            self.drain(&mut scratch);
            out.transmits.append(&mut scratch.transmits);
        }
    }

    // ---- timers ----

    /// Which of the peer's timers has expired at `now`, most final first.
    pub fn expired(&self, now: Instant) -> Option<PeerTimer> {
        if self.connect_at.is_some_and(|t| now >= t) {
            Some(PeerTimer::Connect)
        } else if now >= self.last_rx + self.limits.idle {
            Some(PeerTimer::Idle)
        } else if now >= self.rtc_at {
            Some(PeerTimer::Rtc)
        } else {
            None
        }
    }

    /// The earliest of the peer's timers.
    pub fn next_deadline(&self) -> Instant {
        let d = self.rtc_at.min(self.last_rx + self.limits.idle);
        self.connect_at.map_or(d, |c| d.min(c))
    }

    /// The deadline armed in the heap; the facade compares a popped entry
    /// with it to tell live from stale.
    pub fn armed(&self) -> Option<Instant> {
        self.armed
    }

    /// Records what is armed in the heap (`None` when it popped).
    pub fn set_armed(&mut self, at: Option<Instant>) {
        self.armed = at;
    }

    /// Puts the peer's next deadline in the heap if it is earlier than the
    /// one already armed (later ones are found when the armed entry pops).
    pub fn arm(&mut self, timers: &mut TimerHeap) {
        let d = self.next_deadline();
        if self.armed.is_none_or(|a| d < a) {
            self.armed = Some(d);
            timers.push(d, TimerKey::Peer(self.id));
        }
    }

    // ---- internals ----

    /// str0m panicked while doing `what` with this peer's input: the `Rtc`
    /// is not trusted any more, so this peer (and only it) closes.
    fn close_after_panic(&self, what: &str, out: &mut Outbox) {
        warn!("{}: str0m panicked {what}; closing the peer", self.label());
        out.pending.push_back(Pending::Close(
            self.id,
            CloseReason::Failed(PeerFailure::Panicked),
        ));
    }

    /// Drains the `Rtc` to its timeout.
    fn drain(&mut self, out: &mut Outbox) {
        let id = self.id;
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.rtc_at = t;
                    break;
                }
                Ok(Output::Transmit(t)) => out.transmits.push_back(t),
                Ok(Output::Event(e)) => match e {
                    RtcEvent::RtpPacket(p) => out.pending.push_back(Pending::Rtp(id, p)),
                    RtcEvent::Connected => out.pending.push_back(Pending::Connected(id)),
                    RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected)
                    | RtcEvent::Closed => out
                        .pending
                        .push_back(Pending::Close(id, CloseReason::Disconnected)),
                    _ => {}
                },
                Err(e) => {
                    out.pending.push_back(Pending::Close(
                        id,
                        CloseReason::Failed(PeerFailure::Rtc(e.to_string())),
                    ));
                    break;
                }
            }
        }
        if !self.rtc.is_alive() {
            out.pending
                .push_back(Pending::Close(id, CloseReason::Disconnected));
        }
    }

    /// The peer's payload types for Opus on `mid`, and for RED if it was
    /// negotiated.
    fn slot_pts(&self, mid: Mid) -> Option<SlotPts> {
        let remote = self.rtc.media(mid).map(|m| m.remote_pts()).unwrap_or(&[]);
        let offered = |pt: Pt| remote.is_empty() || remote.contains(&pt);
        let opus = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .filter(|p| p.spec().codec == Codec::Opus);
        let mut first = None;
        for p in opus {
            // str0m folds RED into the Opus parameters it negotiated (kept
            // only if the remote offered RED too), not into the m-line's
            // payload types.
            let pts = SlotPts {
                opus: p.pt(),
                red: p.red(),
            };
            if offered(p.pt()) {
                return Some(pts);
            }
            first.get_or_insert(pts);
        }
        first
    }
}
