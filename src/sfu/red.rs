//! RFC 2198 redundancy (RED) for Opus, the loss protection of an audio SFU.
//!
//! Incoming: a client that negotiated RED (Chromium does) sends each packet
//! wrapped with copies of its previous ones. [`unwrap`] checks the wrapping
//! block by block and yields the primary Opus packet and the redundant ones;
//! the core keeps the primary and, when its own uplink lost a packet,
//! recovers it from the next packet's redundancy ([`History::recoverable`]).
//!
//! Outgoing: each speaker's last few packets are kept ([`History`]), and a
//! listener that negotiated RED gets every packet wrapped with up to
//! `distance` of them ([`Redundancy`]), built once per packet and per
//! number of blocks, shared by all listeners. A slot never carries a block
//! older than the start of its current run, so the previous speaker's audio
//! never rides on the next one's packets.

use std::cell::OnceCell;
use std::collections::VecDeque;
use std::sync::Arc;

use str0m::rtp::{RedBlock, RedDecoder};

/// Most redundant blocks we send per packet (`--red-distance` is bounded by
/// it): three covers a burst of three lost packets at 4x the bitrate.
pub(crate) const MAX_DISTANCE: usize = 3;

/// Most redundant blocks accepted in an incoming RED packet. Real senders
/// use one or two (libwebrtc one, str0m's default one); more is refused as
/// malformed so a hostile sender cannot multiply the work per packet.
const MAX_IN_BLOCKS: usize = 4;

/// Most packets recovered from one incoming RED packet.
const MAX_RECOVERED: usize = 2;

/// RFC 2198's 14-bit timestamp offset.
const MAX_TS_OFFSET: u32 = 0x3fff;

/// RFC 2198's 10-bit block length.
const MAX_BLOCK_LEN: usize = 0x3ff;

/// Largest RED payload we build: with the RTP header, its extensions and
/// the SRTP tag it stays inside a 1,200-byte datagram. Older blocks are left
/// out until it fits.
const MAX_RED_PAYLOAD: usize = 1_100;

/// Why an incoming RED packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// The block headers or lengths do not add up to the payload.
    Structure,
    /// More redundant blocks than [`MAX_IN_BLOCKS`].
    TooManyBlocks,
    /// A block is not the negotiated Opus.
    NotOpus,
    /// A redundant block's timestamp offset is zero or not older than the
    /// block after it.
    Offsets,
    /// The primary block is empty.
    EmptyPrimary,
}

/// An incoming RED packet, checked: the primary and its redundant blocks
/// (str0m's parse, kept as it is: no second list per packet).
#[derive(Debug)]
pub(crate) struct Unwrapped<'a> {
    /// The primary Opus packet.
    pub primary: &'a [u8],
    /// Every block, the primary last.
    blocks: Vec<RedBlock<'a>>,
}

impl<'a> Unwrapped<'a> {
    /// Redundant blocks, oldest first: (timestamp offset, Opus packet).
    /// Empty blocks (a sender with nothing to repeat) are left out.
    pub fn redundant(&self) -> impl DoubleEndedIterator<Item = (u32, &'a [u8])> + '_ {
        self.blocks[..self.blocks.len() - 1]
            .iter()
            .filter(|b| !b.payload.is_empty())
            .map(|b| (b.timestamp_offset, b.payload))
    }
}

/// Checks an incoming RED payload block by block and splits it.
pub(crate) fn unwrap(data: &[u8], opus_pt: u8) -> Result<Unwrapped<'_>, Malformed> {
    let blocks = RedDecoder::decode(data).map_err(|_| Malformed::Structure)?;
    let Some((primary, redundant)) = blocks.split_last() else {
        return Err(Malformed::Structure);
    };
    let primary = primary.payload;
    if redundant.len() > MAX_IN_BLOCKS {
        return Err(Malformed::TooManyBlocks);
    }
    if blocks.iter().any(|b| b.pt != opus_pt) {
        return Err(Malformed::NotOpus);
    }
    if primary.is_empty() {
        return Err(Malformed::EmptyPrimary);
    }
    let mut previous = u32::MAX;
    for b in redundant {
        if b.timestamp_offset == 0 || b.timestamp_offset >= previous {
            return Err(Malformed::Offsets);
        }
        previous = b.timestamp_offset;
    }
    Ok(Unwrapped { primary, blocks })
}

/// One kept packet of a speaker.
#[derive(Debug, Clone)]
struct Kept {
    seq: u64,
    ts: u32,
    payload: Arc<[u8]>,
}

/// A speaker's last packets, newest last, for the redundancy its RED
/// listeners get and to tell what its uplink lost.
#[derive(Debug, Default)]
pub(crate) struct History {
    ssrc: u32,
    kept: VecDeque<Kept>,
}

/// A packet recovered from redundancy: its inferred sequence number, its
/// timestamp and the Opus packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recovered {
    pub seq: u64,
    pub ts: u32,
    pub payload: Arc<[u8]>,
}

/// `a` is after `b` in RTP timestamp order (within half the space).
fn after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 31
}

impl History {
    /// Keeps a packet if it is the speaker's newest, at most `keep` of them.
    /// A new SSRC (the sender restarted) forgets the old stream.
    pub fn push(&mut self, ssrc: u32, seq: u64, ts: u32, payload: &Arc<[u8]>, keep: usize) {
        if ssrc != self.ssrc {
            self.kept.clear();
            self.ssrc = ssrc;
        }
        if self
            .kept
            .back()
            .is_some_and(|k| seq <= k.seq || !after(ts, k.ts))
        {
            return;
        }
        while self.kept.len() >= keep.max(1) {
            self.kept.pop_front();
        }
        self.kept.push_back(Kept {
            seq,
            ts,
            payload: payload.clone(),
        });
    }

    /// The packets the speaker's uplink lost between the newest kept one and
    /// this packet (`seq`, `ts`) that its redundancy carries, oldest first.
    /// Blocks are matched to the missing sequence numbers newest first, as
    /// senders repeat their immediately previous packets.
    pub fn recoverable(&self, ssrc: u32, seq: u64, ts: u32, u: &Unwrapped<'_>) -> Vec<Recovered> {
        let Some(newest) = self.kept.back().filter(|_| ssrc == self.ssrc) else {
            return Vec::new();
        };
        let missing = seq.saturating_sub(newest.seq + 1);
        if missing == 0 || missing > MAX_DISTANCE as u64 * 4 {
            return Vec::new();
        }
        let mut out: Vec<Recovered> = u
            .redundant()
            .rev()
            .map(|(offset, data)| (ts.wrapping_sub(offset), data))
            .take_while(|&(block_ts, _)| after(block_ts, newest.ts))
            .take((missing as usize).min(MAX_RECOVERED))
            .enumerate()
            .map(|(i, (block_ts, data))| Recovered {
                seq: seq - 1 - i as u64,
                ts: block_ts,
                payload: Arc::from(data),
            })
            .collect();
        out.reverse();
        out
    }

    /// The redundancy for the packet (`ssrc`, `ts`) about to be kept: up to
    /// `distance` kept packets of the same stream that fit RFC 2198's fields.
    pub fn redundancy(
        &self,
        ssrc: u32,
        ts: u32,
        primary: &Arc<[u8]>,
        distance: usize,
    ) -> Redundancy {
        let mut r = Redundancy::alone(primary);
        if ssrc != self.ssrc {
            return r;
        }
        let mut budget = MAX_RED_PAYLOAD.saturating_sub(primary.len() + 1);
        for k in self.kept.iter().rev() {
            if r.count >= distance.min(MAX_DISTANCE) {
                break;
            }
            let offset = ts.wrapping_sub(k.ts);
            if !after(ts, k.ts) || offset > MAX_TS_OFFSET {
                break;
            }
            let cost = k.payload.len() + 4;
            if k.payload.len() > MAX_BLOCK_LEN || cost > budget {
                break;
            }
            budget -= cost;
            r.blocks[r.count] = Some((offset, k.payload.clone()));
            r.count += 1;
        }
        r
    }
}

/// One packet's redundancy for every RED listener: the primary, the blocks
/// that may go with it (newest first), and each RED payload built at most
/// once per number of blocks.
#[derive(Debug, Default)]
pub(crate) struct Redundancy {
    primary: Arc<[u8]>,
    blocks: [Option<(u32, Arc<[u8]>)>; MAX_DISTANCE],
    count: usize,
    built: [OnceCell<(u8, Arc<[u8]>)>; MAX_DISTANCE + 1],
}

impl Redundancy {
    /// A packet with no redundancy (RED off, or nothing to repeat).
    pub fn alone(primary: &Arc<[u8]>) -> Self {
        Redundancy {
            primary: primary.clone(),
            ..Redundancy::default()
        }
    }

    /// How many blocks a slot may carry whose run began `since_run` ticks
    /// before this packet: only blocks from the same run.
    pub fn allowed(&self, since_run: u32) -> usize {
        self.blocks[..self.count]
            .iter()
            .take_while(|b| b.as_ref().is_some_and(|(o, _)| *o <= since_run))
            .count()
    }

    /// The RED payload with the newest `n` blocks, for a listener whose
    /// Opus payload type is `opus_pt`.
    pub fn payload(&self, n: usize, opus_pt: u8) -> Arc<[u8]> {
        let n = n.min(self.count);
        let cell = &self.built[n];
        match cell.get() {
            Some((pt, p)) if *pt == opus_pt => p.clone(),
            Some(_) => self.encode(n, opus_pt),
            None => cell
                .get_or_init(|| (opus_pt, self.encode(n, opus_pt)))
                .1
                .clone(),
        }
    }

    /// Encodes RFC 2198: `n` block headers (oldest first), the primary's
    /// one-byte header, then the blocks and the primary.
    fn encode(&self, n: usize, opus_pt: u8) -> Arc<[u8]> {
        let blocks = || self.blocks[..n].iter().rev().flatten();
        let len = blocks().map(|(_, p)| p.len() + 4).sum::<usize>() + 1 + self.primary.len();
        let mut out = Vec::with_capacity(len);
        for (offset, p) in blocks() {
            let l = p.len() as u32;
            out.push(0x80 | (opus_pt & 0x7f));
            out.push((offset >> 6) as u8);
            out.push((((offset & 0x3f) << 2) | (l >> 8)) as u8);
            out.push((l & 0xff) as u8);
        }
        out.push(opus_pt & 0x7f);
        for (_, p) in blocks() {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(&self.primary);
        out.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT: u8 = 111;

    fn arc(b: &[u8]) -> Arc<[u8]> {
        Arc::from(b)
    }

    fn history(n: u64) -> History {
        let mut h = History::default();
        for i in 0..n {
            h.push(7, i, i as u32 * 960, &arc(&[i as u8; 30]), 2);
        }
        h
    }

    #[test]
    fn what_we_build_str0m_decodes_and_we_unwrap() {
        let h = history(5);
        let r = h.redundancy(7, 5 * 960, &arc(&[5; 40]), 2);
        assert_eq!(r.allowed(u32::MAX), 2);
        let p = r.payload(2, PT);
        let u = unwrap(&p, PT).unwrap();
        assert_eq!(u.primary, &[5; 40]);
        assert_eq!(
            u.redundant().collect::<Vec<_>>(),
            vec![(1920, &[3u8; 30][..]), (960, &[4u8; 30][..])]
        );
        // Built once per block count, shared.
        assert!(Arc::ptr_eq(&p, &r.payload(2, PT)));
        // One block: the newest; none: just the primary's header.
        assert_eq!(
            unwrap(&r.payload(1, PT), PT)
                .unwrap()
                .redundant()
                .collect::<Vec<_>>(),
            vec![(960, &[4u8; 30][..])]
        );
        assert_eq!(&r.payload(0, PT)[..], &[&[PT][..], &[5; 40]].concat()[..]);
        // Another listener's Opus payload type gets its own headers.
        assert_eq!(
            unwrap(&r.payload(2, 109), 109).unwrap().redundant().count(),
            2
        );
    }

    #[test]
    fn a_slot_gets_no_block_from_before_its_run() {
        let r = history(5).redundancy(7, 5 * 960, &arc(&[5; 40]), 2);
        assert_eq!(r.allowed(0), 0);
        assert_eq!(r.allowed(959), 0);
        assert_eq!(r.allowed(960), 1);
        assert_eq!(r.allowed(1920), 2);
        // Another stream of the speaker (a restart) has no redundancy.
        assert_eq!(
            history(5)
                .redundancy(8, 5 * 960, &arc(&[5]), 2)
                .allowed(u32::MAX),
            0
        );
    }

    #[test]
    fn blocks_too_far_back_or_too_big_are_left_out() {
        let mut h = History::default();
        h.push(1, 1, 0, &arc(&[1; 30]), 2);
        // 400 ms later (a DTX gap) is past the 14-bit offset.
        h.push(1, 2, 19_200, &arc(&[2; 1_000]), 2);
        let r = h.redundancy(1, 20_160, &arc(&[3; 200]), 2);
        // The 1,000-byte block does not fit beside a 200-byte primary.
        assert_eq!(r.allowed(u32::MAX), 0);
        let r = h.redundancy(1, 20_160, &arc(&[3; 20]), 2);
        assert_eq!(r.allowed(u32::MAX), 1);
    }

    #[test]
    fn malformed_red_is_refused_with_a_reason() {
        let good = history(3)
            .redundancy(7, 3 * 960, &arc(&[9; 10]), 2)
            .payload(2, PT);
        assert!(unwrap(&good, PT).is_ok());
        assert_eq!(
            unwrap(&good[..good.len() - 11], PT).unwrap_err(),
            Malformed::Structure
        );
        assert_eq!(unwrap(&[], PT).unwrap_err(), Malformed::Structure);
        assert_eq!(unwrap(&good, 100).unwrap_err(), Malformed::NotOpus);
        assert_eq!(unwrap(&[PT], PT).unwrap_err(), Malformed::EmptyPrimary);
        // Offsets out of order (newest block claims to be older).
        let mut bad = good.to_vec();
        bad.swap(1, 5);
        bad.swap(2, 6);
        assert_eq!(unwrap(&bad, PT).unwrap_err(), Malformed::Offsets);
        // Five redundant empty blocks.
        let mut many = [0x80 | PT, 0, 4, 0].repeat(5);
        many.extend([PT, 1]);
        assert_eq!(unwrap(&many, PT).unwrap_err(), Malformed::TooManyBlocks);
    }

    #[test]
    fn an_uplink_loss_is_recovered_from_the_next_packets_redundancy() {
        let sender = history(10); // seq 0..=9, we got them all
        let mut ours = history(8); // we lost 8 and 9
        let red = sender
            .redundancy(7, 10 * 960, &arc(&[10; 40]), 2)
            .payload(2, PT);
        let u = unwrap(&red, PT).unwrap();
        let rec = ours.recoverable(7, 10, 10 * 960, &u);
        assert_eq!(
            rec.iter()
                .map(|r| (r.seq, r.ts, r.payload[0]))
                .collect::<Vec<_>>(),
            vec![(8, 8 * 960, 8), (9, 9 * 960, 9)]
        );
        // Nothing missing: nothing recovered.
        ours.push(7, 8, 8 * 960, &arc(&[8]), 2);
        ours.push(7, 9, 9 * 960, &arc(&[9]), 2);
        assert!(ours.recoverable(7, 10, 10 * 960, &u).is_empty());
        // Another SSRC, or no history: nothing.
        assert!(History::default()
            .recoverable(7, 10, 10 * 960, &u)
            .is_empty());
        assert!(history(8).recoverable(9, 10, 10 * 960, &u).is_empty());
    }
}
