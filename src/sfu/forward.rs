//! The forwarding path, from a decrypted packet to every listener's `Rtc`:
//! the conversation decides who hears it and on which slot, the bite
//! assembler keeps it, and each listener's peer rewrites and writes it.

use std::time::Instant;

use str0m::rtp::{ExtensionValues, RtpPacket};

use super::bite::Owner;
use super::ids::{PeerId, SpeakerId};
use super::opus;
use super::peer::budget::Overrun;
use super::peer::slot::Incoming;
use super::peer::{Forward, Refused};
use super::stats::CoreStats;
use super::{bite_event, relay, Sfu};

impl Sfu {
    /// The forwarding path: the conversation decides who hears the packet,
    /// the bite assembler keeps it, and each listener's peer writes it.
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
        if let Err(refused) = admitted {
            count_refused(&mut self.stats, refused);
            return;
        }
        let level = pkt.header.ext_vals.audio_level;
        let speaker = SpeakerId::from(src);
        let heard_level = opus::heard_level(level, &pkt.payload);
        let Some(heard) = self.convs.on_packet(key, speaker, heard_level, now) else {
            return;
        };
        let voiced = self.config.speaker.is_voiced(heard_level);
        if let Some(peer) = self.peers.get(src) {
            let owner = Owner {
                conversation: heard.name,
                userid: &peer.claim().userid,
                clientid: &peer.claim().clientid,
                clock: &self.clock,
            };
            let ts = pkt.header.timestamp;
            let done = self
                .bites
                .on_packet(src, owner, ts, &pkt.payload, voiced, now);
            self.events.extend(done.into_iter().map(bite_event));
        }
        let ext = ExtensionValues {
            audio_level: level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            ..Default::default()
        };
        let incoming = Incoming {
            speaker,
            ssrc: *pkt.header.ssrc,
            seq: *pkt.seq_no,
            timestamp: pkt.header.timestamp,
            marker: pkt.header.marker,
        };
        // Other nodes with members of this conversation (none, and no cost,
        // when the conversation lives on this node alone), if the packet can
        // matter to their selection: a voiced packet, or one from a speaker
        // active here. (Silence from a speaker nobody hears cannot.)
        let relay = (voiced || heard.active)
            .then(|| self.nodes.relay_targets(heard.name))
            .flatten()
            .map(|to| (to.clone(), heard.name.to_string()));
        let fwd = Forward {
            incoming,
            csrc,
            ext: &ext,
            payload: &pkt.payload,
        };
        let (written, panicked) =
            self.peers
                .fan_out(heard.listeners, &fwd, now, &mut self.timers, &mut self.out);
        self.stats.forwarded += written;
        self.stats.forward_panics += panicked;
        if let Some((to, name)) = relay {
            let packet = relay::relayed(name, speaker, csrc, &incoming, &ext, &pkt.payload);
            self.relay_out(to, packet);
        }
    }
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
