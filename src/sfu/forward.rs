//! The forwarding path, from a decrypted packet to every listener's `Rtc`:
//! the conversation decides who hears it and on which slot, the bite
//! assembler keeps it, and each listener's peer rewrites and writes it.

use std::time::Instant;

use str0m::rtp::{ExtensionValues, RtpPacket};

use super::bite::Owner;
use super::budget::Overrun;
use super::conversation::SpeakerId;
use super::peer::{Forward, Refused};
use super::slot::Incoming;
use super::{arm, bite_event, PeerId, Sfu};

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
            let s = &mut self.stats;
            match refused {
                Refused::NotSource => s.dropped_not_source += 1,
                Refused::NotOpus => s.dropped_not_opus += 1,
                Refused::Over(Overrun::Packets) => s.dropped_over_packet_rate += 1,
                Refused::Over(Overrun::Bytes) => s.dropped_over_byte_rate += 1,
                Refused::Over(Overrun::TooBig) => s.dropped_payload_too_big += 1,
            }
            return;
        }
        let level = pkt.header.ext_vals.audio_level;
        let speaker = SpeakerId::from(src);
        let Some(heard) = self.convs.on_packet(key, speaker, level, now) else {
            return;
        };
        if let Some(peer) = self.peers.get(src) {
            let owner = Owner {
                conversation: heard.name,
                userid: &peer.claim().userid,
                clientid: &peer.claim().clientid,
            };
            let voiced = self.config.speaker.is_voiced(level);
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
        let fwd = Forward {
            incoming: Incoming {
                speaker,
                ssrc: *pkt.header.ssrc,
                seq: *pkt.seq_no,
                timestamp: pkt.header.timestamp,
                marker: pkt.header.marker,
            },
            csrc,
            ext: &ext,
            payload: &pkt.payload,
        };
        for &(sub, idx) in heard.listeners {
            let Some(peer) = self.peers.get_mut(sub) else {
                continue;
            };
            if peer.forward(idx, &fwd, now, &mut self.out) {
                self.stats.forwarded += 1;
            }
            arm(peer, &mut self.timers);
        }
    }
}
