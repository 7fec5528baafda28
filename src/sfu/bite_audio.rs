//! What a finished bite carries: its audio as one buffer (payloads back to
//! back, no allocation per packet), the Ogg Opus file made from it off the
//! media loop, and the split of a bite too large for its transport.

use crate::ogg_opus::{self, TimedPacket, FRAME_TICKS, TICKS_PER_MS};

/// The audio of a bite: payloads back to back, and where each one starts in
/// RTP time and ends in the buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BiteAudio {
    data: Vec<u8>,
    /// (48 kHz ticks since the first packet, end of the payload in `data`);
    /// offsets strictly increase.
    frames: Vec<(u64, usize)>,
}

impl BiteAudio {
    pub(super) fn push(&mut self, offset: u64, payload: &[u8]) {
        self.data.extend_from_slice(payload);
        self.frames.push((offset, self.data.len()));
    }

    pub(super) fn last_offset(&self) -> Option<u64> {
        self.frames.last().map(|(o, _)| *o)
    }

    pub(super) fn truncate(&mut self, packets: usize) {
        self.frames.truncate(packets);
        let end = self.frames.last().map_or(0, |(_, e)| *e);
        self.data.truncate(end);
    }

    /// Splits after the first `n` packets; the second part's offsets start
    /// at 0 again. Returns the second part's first offset too.
    fn split_at(&self, n: usize) -> (BiteAudio, BiteAudio, u64) {
        let mut first = BiteAudio::default();
        let mut second = BiteAudio::default();
        let mut base = 0;
        for (i, p) in self.packets().enumerate() {
            if i < n {
                first.push(p.offset, p.data);
            } else {
                if i == n {
                    base = p.offset;
                }
                second.push(p.offset - base, p.data);
            }
        }
        (first, second, base)
    }

    /// The packets with their offsets.
    pub fn packets(&self) -> impl Iterator<Item = TimedPacket<'_>> {
        let mut start = 0;
        self.frames.iter().map(move |&(offset, end)| {
            let data = &self.data[start..end];
            start = end;
            TimedPacket { offset, data }
        })
    }

    /// Payload bytes held.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Number of packets.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True if there is no packet.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Duration by RTP time: the last packet's offset plus its own length.
    pub(super) fn duration_ticks(&self) -> u64 {
        self.packets().last().map_or(0, |p| {
            p.offset + u64::from(ogg_opus::packet_samples(p.data).unwrap_or(FRAME_TICKS))
        })
    }

    /// The Ogg Opus file (RFC 7845), written when it is needed, off the loop.
    pub fn to_ogg(&self) -> Vec<u8> {
        let packets: Vec<TimedPacket<'_>> = self.packets().collect();
        ogg_opus::encode(&packets, rand::random())
    }
}

/// A finished bite, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedBite {
    /// The conversation id.
    pub conversation: String,
    /// Who spoke.
    pub userid: String,
    /// From which device.
    pub clientid: String,
    /// Unix time of the first packet, milliseconds.
    pub start_unix_ms: u64,
    /// Number of Opus packets in it.
    pub packets: usize,
    /// Audio duration by RTP timestamps, milliseconds.
    pub duration_ms: u64,
    /// The packets; [`BiteAudio::to_ogg`] makes the file.
    pub audio: BiteAudio,
}

impl FinishedBite {
    /// Two bites from one, split at the middle packet, the second starting
    /// when its first packet did: for a transport that cannot take the whole.
    /// `None` for a bite of one packet.
    pub fn split(&self) -> Option<(FinishedBite, FinishedBite)> {
        if self.audio.len() < 2 {
            return None;
        }
        let (a, b, base) = self.audio.split_at(self.audio.len() / 2);
        let part = |audio: BiteAudio, start_unix_ms| FinishedBite {
            conversation: self.conversation.clone(),
            userid: self.userid.clone(),
            clientid: self.clientid.clone(),
            start_unix_ms,
            packets: audio.len(),
            duration_ms: audio.duration_ticks() / TICKS_PER_MS,
            audio,
        };
        Some((
            part(a, self.start_unix_ms),
            part(b, self.start_unix_ms + base / TICKS_PER_MS),
        ))
    }
}
