//! Cutting each speaker's audio into bites: one bite per talk spurt.
//!
//! A bite starts at a speaker's first voiced packet and ends after a silence
//! (no voiced packet for `silence`: low RFC 6464 level, DTX, or no packets at
//! all), when it reaches `max_len` (the next voiced packet starts a new one),
//! or when the speaker leaves, disconnects or the server shuts down.
//!
//! A bite is bounded whatever the sender does: by RTP time, by packets, by
//! bytes and by wall time, and a forward timestamp jump ends it instead of
//! stretching it. Payloads are copied into one growing buffer per bite (no
//! allocation per packet); the Ogg Opus file is written off the media loop,
//! by the sink, from [`FinishedBite::audio`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

mod audio;

use super::clock::UnixClock;
use super::ids::PeerId;
use super::opus::{self, FRAME_TICKS, TICKS_PER_MS};
pub use audio::{BiteAudio, FinishedBite};

/// Segmentation settings.
#[derive(Debug, Clone, Copy)]
pub struct BiteConfig {
    /// Silence that ends a bite (and the largest timestamp step within one).
    pub silence: Duration,
    /// Longest bite; a longer talk spurt continues in a new bite.
    pub max_len: Duration,
    /// Most packets in one bite.
    pub max_packets: usize,
    /// Most payload bytes in one bite.
    pub max_bytes: usize,
}

impl Default for BiteConfig {
    fn default() -> Self {
        BiteConfig {
            silence: Duration::from_millis(600),
            max_len: Duration::from_secs(10),
            // 10 s of 20 ms frames is 500; the media budget allows 100/s.
            max_packets: 1_500,
            // 10 s of 320 kbit/s; keeps each NATS message (the Store
            // message carries the whole Bite) under the default 1 MB
            // max_payload. A faster sender's spurt is split, not lost.
            max_bytes: 400 * 1024,
        }
    }
}

/// Who a bite belongs to, read only when a bite opens.
pub struct Owner<'a> {
    /// Conversation id.
    pub conversation: &'a str,
    /// User id.
    pub userid: &'a str,
    /// Client id.
    pub clientid: &'a str,
    /// The Unix clock a new bite's start time is read from.
    pub clock: &'a UnixClock,
}

struct OpenBite {
    conversation: String,
    userid: String,
    clientid: String,
    start_unix_ms: u64,
    opened: Instant,
    first_ts: u32,
    audio: BiteAudio,
    /// Packets up to this index (exclusive) end with a voiced one.
    voiced_len: usize,
    last_voiced: Instant,
}

/// Where a packet goes relative to the open bite.
enum Fit {
    /// Into it.
    In,
    /// Nowhere: a duplicate or out of order.
    Late,
    /// Into a new bite: this one is full, or the sender jumped in time.
    Next,
}

impl OpenBite {
    fn fit(&self, rtp_ts: u32, payload: usize, now: Instant, c: &BiteConfig) -> Fit {
        let offset = u64::from(rtp_ts.wrapping_sub(self.first_ts));
        let last = self.audio.last_offset().unwrap_or(0);
        if offset >= 1 << 31 || (!self.audio.is_empty() && offset <= last) {
            return Fit::Late;
        }
        let max_ticks = c.max_len.as_millis() as u64 * TICKS_PER_MS;
        let jump_ticks = c.silence.as_millis() as u64 * TICKS_PER_MS;
        let wall_cap = c.max_len + c.silence;
        if offset - last > jump_ticks
            || offset >= max_ticks
            || self.audio.len() >= c.max_packets
            || self.audio.byte_len() + payload > c.max_bytes
            || now.saturating_duration_since(self.opened) >= wall_cap
        {
            Fit::Next
        } else {
            Fit::In
        }
    }
}

/// Open bites of every speaker, keyed by peer.
pub struct BiteAssembler {
    config: BiteConfig,
    open: HashMap<PeerId, OpenBite>,
    dropped_late: u64,
    /// When the earliest open bite may have gone silent.
    next_check: Option<Instant>,
}

impl BiteAssembler {
    /// An assembler with no open bite.
    pub fn new(config: BiteConfig) -> Self {
        BiteAssembler {
            config,
            open: HashMap::new(),
            dropped_late: 0,
            next_check: None,
        }
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
    /// returns the bites it finished (a cap reached, a jump in time).
    pub fn on_packet(
        &mut self,
        peer: PeerId,
        owner: Owner<'_>,
        rtp_ts: u32,
        payload: &[u8],
        voiced: bool,
        now: Instant,
    ) -> Vec<FinishedBite> {
        let mut done = Vec::new();
        if let Some(b) = self.open.get(&peer) {
            match b.fit(rtp_ts, payload.len(), now, &self.config) {
                Fit::In => {}
                Fit::Late => {
                    self.dropped_late += 1;
                    return done;
                }
                Fit::Next => done.extend(self.flush(peer)),
            }
        }
        let bite = match self.open.get_mut(&peer) {
            Some(b) => b,
            None if voiced => {
                let check = now + self.config.silence;
                self.next_check = Some(self.next_check.map_or(check, |t| t.min(check)));
                self.open.entry(peer).or_insert(OpenBite {
                    conversation: owner.conversation.to_string(),
                    userid: owner.userid.to_string(),
                    clientid: owner.clientid.to_string(),
                    start_unix_ms: owner.clock.unix_ms(now),
                    opened: now,
                    first_ts: rtp_ts,
                    audio: BiteAudio::default(),
                    voiced_len: 0,
                    last_voiced: now,
                })
            }
            None => return done,
        };
        let offset = u64::from(rtp_ts.wrapping_sub(bite.first_ts));
        bite.audio.push(offset, payload);
        if voiced {
            bite.voiced_len = bite.audio.len();
            bite.last_voiced = now;
        }
        let samples = u64::from(opus::packet_samples(payload).unwrap_or(FRAME_TICKS));
        let max_ticks = self.config.max_len.as_millis() as u64 * TICKS_PER_MS;
        if offset + samples >= max_ticks {
            done.extend(self.flush(peer));
        }
        done
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
        b.audio.truncate(b.voiced_len);
        if b.audio.is_empty() {
            return None;
        }
        Some(FinishedBite {
            conversation: b.conversation,
            userid: b.userid,
            clientid: b.clientid,
            start_unix_ms: b.start_unix_ms,
            packets: b.audio.len(),
            duration_ms: b.audio.duration_ticks() / TICKS_PER_MS,
            audio: b.audio,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOUD: bool = true;
    const QUIET: bool = false;

    fn owner(clock: &UnixClock) -> Owner<'_> {
        Owner {
            conversation: "conv",
            userid: "u",
            clientid: "c",
            clock,
        }
    }

    fn pkt(i: u8) -> Vec<u8> {
        vec![0xF8, i, 1, 2]
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn spurt_ends_after_silence_and_trailing_quiet_is_trimmed() {
        let t0 = Instant::now();
        let mut a = BiteAssembler::new(BiteConfig::default());
        let clock = UnixClock::new(t0, 1_000_000_000);
        let p = PeerId(1);
        // Quiet packets before speech do not open a bite.
        assert!(a
            .on_packet(p, owner(&clock), 0, &pkt(0), QUIET, t0)
            .is_empty());
        assert_eq!(a.open_count(), 0);
        for i in 1..=10u32 {
            assert!(a
                .on_packet(
                    p,
                    owner(&clock),
                    i * 960,
                    &pkt(i as u8),
                    LOUD,
                    ms(t0, 20 * u64::from(i))
                )
                .is_empty());
        }
        for i in 11..=15u32 {
            a.on_packet(
                p,
                owner(&clock),
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
        let mut a = BiteAssembler::new(cfg);
        let clock = UnixClock::new(t0, 0);
        let p = PeerId(1);
        let mut done = vec![];
        for i in 0..120u32 {
            done.extend(a.on_packet(
                p,
                owner(&clock),
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
        let mut a = BiteAssembler::new(BiteConfig::default());
        let clock = UnixClock::new(t0, 0);
        let p = PeerId(9);
        a.on_packet(p, owner(&clock), 960, &pkt(1), LOUD, t0);
        a.on_packet(p, owner(&clock), 3 * 960, &pkt(3), LOUD, t0);
        a.on_packet(p, owner(&clock), 2 * 960, &pkt(2), LOUD, t0);
        a.on_packet(p, owner(&clock), 3 * 960, &pkt(3), LOUD, t0);
        assert_eq!(a.dropped_late(), 2);
        let b = a.flush(p).unwrap();
        assert_eq!(b.packets, 2);
        assert_eq!(b.duration_ms, 60, "the lost packet's time is kept");
    }

    #[test]
    fn flush_of_unknown_peer_is_nothing() {
        let mut a = BiteAssembler::new(BiteConfig::default());
        assert!(a.flush(PeerId(5)).is_none());
    }
}

#[cfg(test)]
mod caps {
    use super::*;

    fn owner(clock: &UnixClock) -> Owner<'_> {
        Owner {
            conversation: "c",
            userid: "u",
            clientid: "d",
            clock,
        }
    }

    #[test]
    fn one_tick_per_packet_cannot_grow_a_bite_past_its_packet_cap() {
        let t0 = Instant::now();
        let cfg = BiteConfig::default();
        let mut a = BiteAssembler::new(cfg);
        let clock = UnixClock::new(t0, 0);
        let mut done = vec![];
        // Timestamps advance by 1 per packet: the RTP-time cap never fires.
        for i in 0..5_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            done.extend(a.on_packet(PeerId(1), owner(&clock), i, &[0xF8, 1], true, now));
        }
        assert!(!done.is_empty());
        assert!(done.iter().all(|b| b.packets <= cfg.max_packets));
        assert_eq!(
            done.iter().map(|b| b.packets).sum::<usize>() + 5_000 % cfg.max_packets,
            5_000
        );
    }

    #[test]
    fn bytes_cap_a_bite() {
        let t0 = Instant::now();
        let cfg = BiteConfig {
            max_bytes: 10_000,
            ..BiteConfig::default()
        };
        let mut a = BiteAssembler::new(cfg);
        let clock = UnixClock::new(t0, 0);
        let mut done = vec![];
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 20);
            done.extend(a.on_packet(PeerId(1), owner(&clock), i * 960, &[0xF8; 1_000], true, now));
        }
        assert!(done.len() >= 9, "{}", done.len());
        assert!(done.iter().all(|b| b.audio.byte_len() <= 10_000));
    }

    #[test]
    fn a_forward_timestamp_jump_ends_the_bite_instead_of_stretching_it() {
        let t0 = Instant::now();
        let mut a = BiteAssembler::new(BiteConfig::default());
        let clock = UnixClock::new(t0, 0);
        let p = PeerId(1);
        for i in 0..10u32 {
            assert!(a
                .on_packet(p, owner(&clock), i * 960, &[0xF8, 0], true, t0)
                .is_empty());
        }
        // An hour later in RTP time, the next packet.
        let done = a.on_packet(
            p,
            owner(&clock),
            9 * 960 + 48_000 * 3_600,
            &[0xF8, 0],
            true,
            t0,
        );
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].packets, done[0].duration_ms), (10, 200));
        let rest = a.flush(p).unwrap();
        assert_eq!((rest.packets, rest.duration_ms), (1, 20));
    }

    #[test]
    fn wall_time_caps_a_bite_whose_timestamps_crawl() {
        let t0 = Instant::now();
        let cfg = BiteConfig::default();
        let mut a = BiteAssembler::new(cfg);
        let clock = UnixClock::new(t0, 0);
        let mut done = vec![];
        // One packet a second for a minute, timestamps 1 tick apart.
        for i in 0..60u32 {
            let now = t0 + Duration::from_secs(u64::from(i));
            done.extend(a.on_packet(PeerId(1), owner(&clock), i, &[0xF8, 0], true, now));
        }
        assert!(done.len() >= 5, "{}", done.len());
        assert!(done.iter().all(|b| b.packets <= 11));
    }
}
