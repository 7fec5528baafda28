//! Requests from signalling, applied to the core: a new peer from an offer,
//! a trickled candidate, a join, shutdown. Limits are checked here, before
//! any state exists.

use std::panic::catch_unwind;
use std::time::Instant;

use log::info;
use str0m::change::SdpOffer;
use str0m::format::{Codec, CodecConfig, FormatParams};
use str0m::media::{Frequency, Pt};
use str0m::net::TcpType;
use str0m::rtp::Extension;
use str0m::{Candidate, Input, RtcConfig};

use super::api::{CandidateError, Claim, CloseReason, ConnectError, InternalError, JoinError};
use super::api::{Member, OfferError, SfuEvent};
use super::conversation::membership::Stamp;
use super::ids::PeerId;
use super::peer::{offer, Limits, Peer, Setup};
use super::timer::TimerKey;
use super::Sfu;

/// Our preferred Opus payload type (str0m's and the browsers' usual 111);
/// the answer follows the offer's.
const OPUS_PT: u8 = 111;

/// Our preferred RED payload type (Chromium's usual 63); the answer follows
/// the offer's.
const RED_PT: u8 = 63;

/// The `Rtc` settings every peer shares, with one DTLS certificate for all
/// (generating one per peer would stall the loop for milliseconds). With
/// `red`, Opus may be wrapped in RED (RFC 2198) for peers that offer it;
/// with `dtx`, the answer asks for Opus DTX.
pub(super) fn rtc_config(red: bool, dtx: bool) -> RtcConfig {
    let provider = str0m::crypto::from_feature_flags();
    let mut rtc_config = RtcConfig::new()
        .set_ice_lite(true)
        .clear_codecs()
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
    // Opus as str0m's `enable_opus` offers it (in-band FEC, 10 ms minimum
    // frames), plus DTX: `usedtx=1` in the answer tells the browser it may
    // send one packet per 400 ms in silence instead of fifty a second, which
    // is most of a real conversation (docs/ARCHITECTURE.md, decision 28).
    rtc_config.codec_config().add_config(
        Pt::from(OPUS_PT),
        None,
        Codec::Opus,
        Frequency::FORTY_EIGHT_KHZ,
        Some(2),
        FormatParams {
            min_p_time: Some(10),
            use_inband_fec: Some(true),
            use_dtx: dtx.then_some(true),
            ..Default::default()
        },
    );
    // RED (`red/48000/2`) when the client offers it too: the listener's own
    // loss protection, since Opus FEC only adapts to the sender's uplink
    // (docs/ARCHITECTURE.md, decision 29). str0m keeps it only if offered.
    if red {
        let codecs = rtc_config.codec_config();
        let mut params = codecs.params().to_vec();
        for p in params.iter_mut().filter(|p| p.spec().codec == Codec::Opus) {
            p.set_red(Some(Pt::from(RED_PT)));
        }
        *codecs = CodecConfig::new_from_payload_params(params);
    }
    if let Some(cert) = provider.dtls_provider.generate_certificate() {
        rtc_config = rtc_config.set_dtls_cert(cert);
    }
    rtc_config
}

impl Sfu {
    /// Creates a peer from a client's SDP offer and returns it with the answer.
    pub(super) fn connect(
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
            return Err(ConnectError::ServerFull {
                limit: self.config.max_peers,
            });
        }
        if self.members.client_count(&claim.userid) >= self.config.max_peers_per_user {
            self.stats.connects_refused += 1;
            return Err(ConnectError::UserLimit {
                limit: self.config.max_peers_per_user,
            });
        }
        offer::check(offer)?;
        let offer = SdpOffer::from_sdp_string(offer)
            .map_err(|e| ConnectError::MalformedOffer(OfferError::Unparsable(e.to_string())))?;
        let udp = self.config.candidates.iter().map(|a| {
            Candidate::host(*a, "udp")
                .map_err(|_| ConnectError::Internal(InternalError::ServerCandidate(*a)))
        });
        let tcp = self.config.tcp_candidates.iter().map(|a| {
            Candidate::builder()
                .tcp()
                .host(*a)
                .tcptype(TcpType::Passive)
                .build()
                .map_err(|_| ConnectError::Internal(InternalError::ServerCandidate(*a)))
        });
        let candidates = udp.chain(tcp).collect::<Result<Vec<_>, _>>()?;
        let setup = Setup {
            rtc_config: &self.rtc_config,
            candidates,
            limits: Limits {
                connect: self.config.connect_timeout,
                idle: self.config.idle_timeout,
            },
            budget: self.config.budget,
        };
        let id = self.peers.next_id();
        let peers = &self.peers;
        let (peer, answer) = Peer::accept(now, id, claim, offer, setup, |u| peers.ufrag_taken(u))?;
        self.members.add_peer(&peer.claim().userid, id);
        info!(
            "{} created: {} receiving slot(s), {} sending m-line(s)",
            peer.label(),
            peer.slot_count(),
            peer.sending_mlines()
        );
        self.peers.insert(peer);
        // str0m may report a far-future timeout right after accept_offer until
        // it has seen the current time once.
        if let Some(p) = self.peers.get_mut(id) {
            p.handle_input(Input::Timeout(now), &mut self.out);
            p.arm(&mut self.timers);
        }
        self.process_pending(now);
        if self.peers.get(id).is_none() {
            return Err(ConnectError::Internal(InternalError::FailedAtOnce(id)));
        }
        self.stats.peers_created += 1;
        Ok((id, answer))
    }

    /// Adds a trickled remote ICE candidate (`candidate:…` or `a=candidate:…`).
    /// The server is ICE-lite and learns addresses from STUN checks anyway,
    /// so a candidate that does not parse is reported but harmless.
    pub(super) fn add_candidate(
        &mut self,
        peer: PeerId,
        candidate: &str,
    ) -> Result<(), CandidateError> {
        let text = candidate.trim();
        let text = text.strip_prefix("a=").unwrap_or(text);
        if text.is_empty() {
            // An empty candidate is the end-of-candidates marker.
            return Ok(());
        }
        let parsed = catch_unwind(|| Candidate::from_sdp_string(text))
            .map_err(|_| CandidateError::Unparsable { peer })?
            .map_err(|e| CandidateError::Malformed {
                peer,
                reason: e.to_string(),
            })?;
        let Some(p) = self.peers.get_mut(peer) else {
            return Err(CandidateError::PeerGone(peer));
        };
        p.add_remote_candidate(parsed, &mut self.out);
        p.arm(&mut self.timers);
        Ok(())
    }

    /// Moves every client of `userid` (and those that connect later) into the
    /// conversation `name`, out of any other.
    pub(super) fn join(&mut self, now: Instant, userid: &str, name: &str) -> Result<(), JoinError> {
        if self.shutting_down {
            return Err(JoinError::ShuttingDown);
        }
        let stamp = self.members.next_stamp(userid, &self.config.node_id);
        let member = Member {
            userid: userid.to_string(),
            conversation: name.to_string(),
            stamp: stamp.counter,
            origin: stamp.origin.clone(),
        };
        self.apply_join(now, userid, name, stamp);
        self.stats.joins += 1;
        info!("user {userid} joined conversation {name}");
        // For the other nodes of a cluster (the driver ignores it otherwise).
        self.events.push_back(SfuEvent::Joined(member));
        Ok(())
    }

    /// Points a user at conversation `name` with a membership stamped
    /// `stamp` (unless they have a newer one) and moves their connected
    /// clients; true if anything moved.
    pub(super) fn apply_join(
        &mut self,
        now: Instant,
        userid: &str,
        name: &str,
        stamp: Stamp,
    ) -> bool {
        let key = self.convs.intern(name);
        let Some(moved) = self.members.join_stamped(userid, key, stamp, now) else {
            self.convs.drop_if_abandoned(key);
            return false;
        };
        if let Some(from) = moved.from {
            for &p in &moved.peers {
                self.leave(from, p, now);
            }
            self.convs.user_left(from);
        }
        self.convs.user_entered(key);
        for &p in &moved.peers {
            if let Some(peer) = self.peers.get(p).filter(|p| p.is_connected()) {
                self.convs.add_member(key, p, peer.slot_count(), now);
            }
        }
        if let Some(until) = moved.grace_until {
            self.timers.push(until, TimerKey::Grace(userid.to_string()));
        }
        true
    }

    /// Closes every peer (sending DTLS close and RTCP BYE) and refuses new
    /// work. The driver keeps sending [`Sfu::poll_transmit`] output after it.
    pub(super) fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        for id in self.peers.ids() {
            self.remove_peer(id, CloseReason::Shutdown, now);
        }
    }
}
