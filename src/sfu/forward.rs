//! The forwarding path, from a decrypted packet to every listener's `Rtc`:
//! the packet is admitted and, if it came wrapped in RED, unwrapped (with
//! what its uplink lost recovered from the redundancy); then the
//! conversation decides who hears it and on which slot, the bite assembler
//! keeps it, and each listener's peer rewrites and writes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use str0m::rtp::{ExtensionValues, RtpPacket};

use super::bite::Owner;
use super::ids::{ConvKey, PeerId, SpeakerId};
use super::opus;
use super::peer::budget::Overrun;
use super::peer::slot::Incoming;
use super::peer::table::FanOut;
use super::peer::{Carried, Forward, Refused};
use super::red::{self, History, Redundancy};
use super::stats::CoreStats;
use super::{bite_event, relay, Sfu};
use crate::log_limit::LogLimit;

/// Malformed RED is logged at most once a second (it is counted always).
static RED_MALFORMED: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));

/// A local speaker's packet once admitted: who sent it, in which
/// conversation, and under which CSRC.
#[derive(Clone, Copy)]
struct From {
    src: PeerId,
    key: ConvKey,
    csrc: u32,
}

impl Sfu {
    /// The forwarding path for a local peer's packet: admission, RED
    /// unwrapping and recovery, then [`Sfu::take`] for each Opus packet.
    pub(super) fn on_rtp(&mut self, src: PeerId, pkt: RtpPacket, now: Instant) {
        self.stats.rtp_in += 1;
        let Some(key) = self.convs.of(src) else {
            self.stats.rtp_outside_conversation += 1;
            return;
        };
        let (admitted, csrc) = match self.peers.get_mut(src) {
            Some(peer) => (peer.admit(&pkt, now), peer.csrc()),
            None => return,
        };
        let carried = match admitted {
            Ok(c) => c,
            Err(refused) => {
                count_refused(&mut self.stats, refused);
                return;
            }
        };
        let from = From { src, key, csrc };
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            ..Default::default()
        };
        let incoming = Incoming {
            speaker: SpeakerId::from(src),
            ssrc: *pkt.header.ssrc,
            seq: *pkt.seq_no,
            timestamp: pkt.header.timestamp,
            marker: pkt.header.marker,
        };
        let Carried::Red { opus_pt } = carried else {
            self.take(from, incoming, &ext, &pkt.payload, false, now);
            return;
        };
        self.stats.red_in += 1;
        let unwrapped = match red::unwrap(&pkt.payload, opus_pt) {
            Ok(u) => u,
            Err(why) => {
                self.stats.dropped_red_malformed += 1;
                RED_MALFORMED.log(now, |more| {
                    warn!(
                        "peer {}: malformed RED dropped: {why:?} ({more} more since the last line)",
                        src.0
                    )
                });
                return;
            }
        };
        // What the uplink lost and this packet's redundancy carries goes
        // first, in order, as if it had arrived: bites keep it, listeners
        // hear it.
        let recovered = self
            .histories
            .get(&incoming.speaker)
            .map(|h| h.recoverable(incoming.ssrc, incoming.seq, incoming.timestamp, &unwrapped))
            .unwrap_or_default();
        for r in recovered {
            let charged = match self.peers.get_mut(src) {
                Some(peer) => peer.admit_recovered(r.payload.len(), now),
                None => return,
            };
            if let Err(refused) = charged {
                count_refused(&mut self.stats, refused);
                continue;
            }
            self.stats.red_recovered += 1;
            let inc = Incoming {
                seq: r.seq,
                timestamp: r.ts,
                marker: false,
                ..incoming
            };
            self.take(from, inc, &ext, &r.payload, true, now);
        }
        let primary: Arc<[u8]> = Arc::from(unwrapped.primary);
        self.take(from, incoming, &ext, &primary, false, now);
    }

    /// One admitted Opus packet of a local speaker (or one `recovered`
    /// from redundancy): selection, bite, relay, fan-out.
    fn take(
        &mut self,
        from: From,
        incoming: Incoming,
        ext: &ExtensionValues,
        payload: &Arc<[u8]>,
        recovered: bool,
        now: Instant,
    ) {
        let speaker = incoming.speaker;
        let heard_level = opus::heard_level(ext.audio_level, payload);
        let red = remember(
            &mut self.histories,
            self.config.red_distance,
            &incoming,
            payload,
        );
        let Some(heard) = self.convs.on_packet(from.key, speaker, heard_level, now) else {
            return;
        };
        let voiced = self.config.speaker.is_voiced(heard_level);
        if let Some(peer) = self.peers.get(from.src) {
            let owner = Owner {
                conversation: heard.name,
                userid: &peer.claim().userid,
                clientid: &peer.claim().clientid,
                clock: &self.clock,
            };
            let ts = incoming.timestamp;
            let done = self
                .bites
                .on_packet(from.src, owner, ts, payload, voiced, now);
            self.events.extend(done.into_iter().map(bite_event));
        }
        // Other nodes with members of this conversation (none, and no cost,
        // when the conversation lives on this node alone), if the packet can
        // matter to their selection: a voiced packet, or one from a speaker
        // active here. (Silence from a speaker nobody hears cannot.) They
        // get plain Opus and build their listeners' RED themselves.
        let relay = (voiced || heard.active)
            .then(|| self.nodes.relay_targets(heard.name))
            .flatten()
            .map(|to| (to.clone(), heard.name.to_string()));
        let fwd = Forward {
            incoming,
            csrc: from.csrc,
            ext,
            payload,
            red: &red,
            recovered,
        };
        let n = self
            .peers
            .fan_out(heard.listeners, &fwd, now, &mut self.timers, &mut self.out);
        count_fan_out(&mut self.stats, n);
        if let Some((to, name)) = relay {
            let packet = relay::relayed(name, speaker, from.csrc, &incoming, ext, payload);
            self.relay_out(to, packet);
        }
    }
}

/// Keeps a speaker's packet for the redundancy of the packets after it,
/// and returns this packet's own (nothing when RED is off).
pub(super) fn remember(
    histories: &mut HashMap<SpeakerId, History>,
    distance: usize,
    incoming: &Incoming,
    payload: &Arc<[u8]>,
) -> Redundancy {
    if distance == 0 {
        return Redundancy::alone(payload);
    }
    let h = histories.entry(incoming.speaker).or_default();
    let red = h.redundancy(incoming.ssrc, incoming.timestamp, payload, distance);
    h.push(
        incoming.ssrc,
        incoming.seq,
        incoming.timestamp,
        payload,
        distance,
    );
    red
}

/// Adds one fan-out to the counters.
pub(super) fn count_fan_out(s: &mut CoreStats, n: FanOut) {
    s.forwarded += n.written;
    s.red_written += n.red;
    s.forward_panics += n.panicked;
}

/// Counts a packet the peer's admission refused, by reason.
fn count_refused(s: &mut CoreStats, refused: Refused) {
    match refused {
        Refused::NotSource => s.dropped_not_source += 1,
        Refused::NotOpus => s.dropped_not_opus += 1,
        Refused::Over(Overrun::Packets) => s.dropped_over_packet_rate += 1,
        Refused::Over(Overrun::Bytes) => s.dropped_over_byte_rate += 1,
        Refused::Over(Overrun::TooBig) => s.dropped_payload_too_big += 1,
    }
}
