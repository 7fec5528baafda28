//! What a finished bite carries: its audio as one buffer (payloads back to
//! back, no allocation per packet) with each packet's RTP timing. The Ogg
//! Opus file and any split for a transport are made from it by the sink,
//! off the media loop.

use crate::sfu::opus::{self, TimedPacket, FRAME_TICKS};

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
    pub(crate) fn push(&mut self, offset: u64, payload: &[u8]) {
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
    pub(crate) fn duration_ticks(&self) -> u64 {
        self.packets().last().map_or(0, |p| {
            p.offset + u64::from(opus::packet_samples(p.data).unwrap_or(FRAME_TICKS))
        })
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
    /// The packets with their timing; the sink makes the Ogg file.
    pub audio: BiteAudio,
}
