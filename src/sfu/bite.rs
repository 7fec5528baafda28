//! Cutting each speaker's audio into bites: one bite per talk spurt.
//!
//! A bite starts at a speaker's first voiced packet and ends after a silence
//! (no voiced packet for `silence`: low RFC 6464 level, DTX, or no packets at
//! all), when it reaches `max_len` (the next voiced packet starts a new one),
//! or when the speaker leaves, disconnects or the server shuts down. Payloads
//! are kept by reference (`Arc`), so assembling costs no copy per packet; the
//! Ogg Opus file is written once, when the bite is finished.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::PeerId;
use crate::ogg_opus::{self, TimedPacket, FRAME_TICKS, TICKS_PER_MS};

/// Segmentation settings.
#[derive(Debug, Clone, Copy)]
pub struct BiteConfig {
    /// Silence that ends a bite.
    pub silence: Duration,
    /// Longest bite; a longer talk spurt continues in a new bite.
    pub max_len: Duration,
}

impl Default for BiteConfig {
    fn default() -> Self {
        BiteConfig {
            silence: Duration::from_millis(600),
            max_len: Duration::from_secs(10),
        }
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
    /// The Ogg Opus file.
    pub ogg: Vec<u8>,
}

/// Who a bite belongs to, read only when a bite opens.
pub struct Owner<'a> {
    /// Conversation id.
    pub conversation: &'a str,
    /// User id.
    pub userid: &'a str,
    /// Client id.
    pub clientid: &'a str,
}

struct OpenBite {
    conversation: String,
    userid: String,
    clientid: String,
    start_unix_ms: u64,
    first_ts: u32,
    /// (offset from first_ts, payload); offsets strictly increase.
    packets: Vec<(u64, Arc<[u8]>)>,
    /// Packets up to this index (exclusive) end with a voiced one.
    voiced_len: usize,
    last_voiced: Instant,
}

/// Open bites of every speaker, keyed by peer.
pub struct BiteAssembler {
    config: BiteConfig,
    open: HashMap<PeerId, OpenBite>,
    /// Maps the core's `Instant`s to Unix microseconds.
    clock: (Instant, u64),
    dropped_late: u64,
    /// When the earliest open bite may have gone silent.
    next_check: Option<Instant>,
}

impl BiteAssembler {
    /// An assembler whose `clock_base` says which Unix microsecond an `Instant` was.
    pub fn new(config: BiteConfig, clock_base: (Instant, u64)) -> Self {
        BiteAssembler {
            config,
            open: HashMap::new(),
            clock: clock_base,
            dropped_late: 0,
            next_check: None,
        }
    }

    /// Re-anchors the Unix clock (the wall clock may be slewed by NTP).
    pub fn set_clock(&mut self, clock: (Instant, u64)) {
        self.clock = clock;
    }

    /// Number of bites being assembled.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Packets dropped as duplicate or out of order within a bite.
    pub fn dropped_late(&self) -> u64 {
        self.dropped_late
    }

    /// Records one packet (`voiced` as the speaker selector judged it);
    /// returns a bite if this packet finished one (max length).
    pub fn on_packet(
        &mut self,
        peer: PeerId,
        owner: Owner<'_>,
        rtp_ts: u32,
        payload: &Arc<[u8]>,
        voiced: bool,
        now: Instant,
    ) -> Option<FinishedBite> {
        let bite = match self.open.get_mut(&peer) {
            Some(b) => b,
            None if voiced => {
                let unix_us =
                    self.clock.1 + now.saturating_duration_since(self.clock.0).as_micros() as u64;
                let check = now + self.config.silence;
                self.next_check = Some(self.next_check.map_or(check, |t| t.min(check)));
                self.open.entry(peer).or_insert(OpenBite {
                    conversation: owner.conversation.to_string(),
                    userid: owner.userid.to_string(),
                    clientid: owner.clientid.to_string(),
                    start_unix_ms: unix_us / 1000,
                    first_ts: rtp_ts,
                    packets: Vec::with_capacity(64),
                    voiced_len: 0,
                    last_voiced: now,
                })
            }
            None => return None,
        };
        let offset = rtp_ts.wrapping_sub(bite.first_ts);
        let in_order = offset < (1 << 31)
            && bite
                .packets
                .last()
                .is_none_or(|(last, _)| u64::from(offset) > *last);
        if !in_order {
            self.dropped_late += 1;
            return None;
        }
        bite.packets.push((u64::from(offset), payload.clone()));
        if voiced {
            bite.voiced_len = bite.packets.len();
            bite.last_voiced = now;
        }
        let samples = u64::from(ogg_opus::packet_samples(payload).unwrap_or(FRAME_TICKS));
        let max_ticks = self.config.max_len.as_millis() as u64 * TICKS_PER_MS;
        if u64::from(offset) + samples >= max_ticks {
            return self.flush(peer);
        }
        None
    }

    /// When [`BiteAssembler::handle_timeout`] must next run: the moment the
    /// earliest open bite may have gone silent.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_check
    }

    /// Finishes every bite whose speaker has been silent long enough and
    /// works out the next check.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<FinishedBite>) {
        if self.next_check.is_none_or(|t| t > now) {
            return;
        }
        let silence = self.config.silence;
        let mut next: Option<Instant> = None;
        let mut done = Vec::new();
        for (p, b) in &self.open {
            let ends = b.last_voiced + silence;
            if ends <= now {
                done.push(*p);
            } else {
                next = Some(next.map_or(ends, |t| t.min(ends)));
            }
        }
        self.next_check = next;
        for p in done {
            out.extend(self.flush(p));
        }
    }

    /// Finishes a speaker's bite now (leave, disconnect, shutdown).
    pub fn flush(&mut self, peer: PeerId) -> Option<FinishedBite> {
        let mut b = self.open.remove(&peer)?;
        // A bite is the talk spurt: trailing unvoiced packets are not part of it.
        b.packets.truncate(b.voiced_len);
        if b.packets.is_empty() {
            return None;
        }
        let timed: Vec<TimedPacket<'_>> = b
            .packets
            .iter()
            .map(|(offset, data)| TimedPacket {
                offset: *offset,
                data,
            })
            .collect();
        let ogg = ogg_opus::encode(&timed, rand::random());
        let last = b
            .packets
            .last()
            .map(|(o, d)| o + u64::from(ogg_opus::packet_samples(d).unwrap_or(FRAME_TICKS)));
        Some(FinishedBite {
            conversation: b.conversation,
            userid: b.userid,
            clientid: b.clientid,
            start_unix_ms: b.start_unix_ms,
            packets: b.packets.len(),
            duration_ms: last.unwrap_or(0) / TICKS_PER_MS,
            ogg,
        })
    }
}

/// Now, as an `Instant` and Unix microseconds read back to back (the
/// anchor bite start times are computed from).
pub fn unix_clock_now() -> (Instant, u64) {
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    (Instant::now(), unix_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOUD: bool = true;
    const QUIET: bool = false;

    fn owner() -> Owner<'static> {
        Owner {
            conversation: "conv",
            userid: "u",
            clientid: "c",
        }
    }

    fn pkt(i: u8) -> Arc<[u8]> {
        Arc::from(vec![0xF8, i, 1, 2].into_boxed_slice())
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn spurt_ends_after_silence_and_trailing_quiet_is_trimmed() {
        let t0 = Instant::now();
        let mut a = BiteAssembler::new(BiteConfig::default(), (t0, 1_000_000_000));
        let p = PeerId(1);
        // Quiet packets before speech do not open a bite.
        assert!(a.on_packet(p, owner(), 0, &pkt(0), QUIET, t0).is_none());
        assert_eq!(a.open_count(), 0);
        for i in 1..=10u32 {
            assert!(a
                .on_packet(
                    p,
                    owner(),
                    i * 960,
                    &pkt(i as u8),
                    LOUD,
                    ms(t0, 20 * u64::from(i))
                )
                .is_none());
        }
        for i in 11..=15u32 {
            a.on_packet(
                p,
                owner(),
                i * 960,
                &pkt(i as u8),
                QUIET,
                ms(t0, 20 * u64::from(i)),
            );
        }
        let mut out = vec![];
        a.handle_timeout(ms(t0, 200 + 500), &mut out);
        assert!(out.is_empty(), "not yet 600 ms of silence");
        a.handle_timeout(ms(t0, 200 + 600), &mut out);
        assert_eq!(out.len(), 1);
        let b = &out[0];
        assert_eq!(b.packets, 10);
        assert_eq!(b.start_unix_ms, 1_000_020);
        assert_eq!(b.duration_ms, 200);
        assert_eq!(
            (
                b.conversation.as_str(),
                b.userid.as_str(),
                b.clientid.as_str()
            ),
            ("conv", "u", "c")
        );
        assert_eq!(a.open_count(), 0);
    }

    #[test]
    fn long_spurt_is_split_at_max_length_and_continues() {
        let t0 = Instant::now();
        let cfg = BiteConfig {
            max_len: Duration::from_secs(1),
            ..BiteConfig::default()
        };
        let mut a = BiteAssembler::new(cfg, (t0, 0));
        let p = PeerId(1);
        let mut done = vec![];
        for i in 0..120u32 {
            done.extend(a.on_packet(
                p,
                owner(),
                5000 + i * 960,
                &pkt(i as u8),
                LOUD,
                ms(t0, 20 * u64::from(i)),
            ));
        }
        assert_eq!(done.len(), 2, "two full one-second bites");
        assert!(done
            .iter()
            .all(|b| b.packets == 50 && b.duration_ms == 1000));
        assert_eq!(done[1].start_unix_ms, 1000);
        assert_eq!(done[0].start_unix_ms, 0);
        let rest = a.flush(p).expect("the rest of the spurt");
        assert_eq!(rest.packets, 20);
    }

    #[test]
    fn late_and_duplicate_packets_are_dropped_and_gaps_kept() {
        let t0 = Instant::now();
        let mut a = BiteAssembler::new(BiteConfig::default(), (t0, 0));
        let p = PeerId(9);
        a.on_packet(p, owner(), 960, &pkt(1), LOUD, t0);
        a.on_packet(p, owner(), 3 * 960, &pkt(3), LOUD, t0);
        a.on_packet(p, owner(), 2 * 960, &pkt(2), LOUD, t0);
        a.on_packet(p, owner(), 3 * 960, &pkt(3), LOUD, t0);
        assert_eq!(a.dropped_late(), 2);
        let b = a.flush(p).unwrap();
        assert_eq!(b.packets, 2);
        assert_eq!(b.duration_ms, 60, "the lost packet's time is kept");
    }

    #[test]
    fn flush_of_unknown_peer_is_nothing() {
        let mut a = BiteAssembler::new(BiteConfig::default(), (Instant::now(), 0));
        assert!(a.flush(PeerId(5)).is_none());
    }
}
