//! A slot: one audio m-line on which the server sends to a subscriber.
//!
//! The speaker behind a slot changes as the conversation's active speakers
//! change, but what the subscriber sees stays one valid RTP stream: str0m's
//! SSRC for that m-line, sequence numbers that continue across a switch, and
//! timestamps that keep advancing with wall-clock time. This module holds only
//! that arithmetic; it knows nothing about sockets or `Rtc`.

use std::time::Instant;

use str0m::media::{Mid, Pt};

use super::conversation::SpeakerId;
use crate::ogg_opus::{CLOCK_RATE, FRAME_TICKS};

/// Sequence jumps larger than this are treated as a sender restart.
const MAX_SEQ_JUMP: i64 = 1_000;
/// Packets later than this many sequence numbers are dropped.
const MAX_LATE: i64 = 100;

/// One outgoing stream of a subscriber and the source currently mapped to it.
#[derive(Debug)]
pub struct Slot {
    /// The m-line this slot sends on.
    pub mid: Mid,
    /// The subscriber's payload type for Opus on this m-line, learned lazily.
    pub pt: Option<Pt>,
    seq: SeqState,
}

/// Where the rewritten stream is, and what the last forwarded input was.
#[derive(Debug)]
struct SeqState {
    /// Next outgoing extended sequence number if nothing is lost.
    next_seq: u64,
    /// Last outgoing timestamp and when it was sent.
    last_out: Option<(u32, Instant)>,
    /// Timestamp of the very first packet of the stream.
    initial_ts: u32,
    /// The source, input sequence and timestamp offset of the current run.
    run: Option<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    source: SpeakerId,
    /// Last input extended sequence number forwarded.
    last_in_seq: u64,
    /// Outgoing sequence number of that packet.
    last_out_seq: u64,
    /// Added (wrapping) to input timestamps.
    ts_offset: u32,
}

/// The header fields of one forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Outgoing extended sequence number.
    pub seq: u64,
    /// Outgoing RTP timestamp.
    pub timestamp: u32,
    /// Set on the first packet after a speaker switch (start of a talk spurt).
    pub marker: bool,
}

impl Slot {
    /// A slot on `mid`, its outgoing stream starting at `first_seq`/`first_ts`
    /// (random in production so streams are not predictable).
    pub fn new(mid: Mid, first_seq: u16, first_ts: u32) -> Self {
        Slot {
            mid,
            pt: None,
            seq: SeqState {
                // Stay below 2^15 so the first ROC is 0 and no wrap is near.
                next_seq: u64::from(first_seq & 0x7fff),
                last_out: None,
                initial_ts: first_ts,
                run: None,
            },
        }
    }

    /// Computes the outgoing header for a packet from `source` with the given
    /// input extended sequence number and timestamp. `None` means drop it
    /// (duplicate or far too late).
    pub fn rewrite(
        &mut self,
        source: SpeakerId,
        in_seq: u64,
        in_ts: u32,
        now: Instant,
    ) -> Option<Rewritten> {
        let st = &mut self.seq;
        match st.run {
            Some(run) if run.source == source => {
                let delta = in_seq as i64 - run.last_in_seq as i64;
                let (out_seq, advance) = if delta > 0 && delta <= MAX_SEQ_JUMP {
                    (run.last_out_seq + delta as u64, true)
                } else if !(-MAX_SEQ_JUMP..=MAX_SEQ_JUMP).contains(&delta) {
                    // The sender restarted its sequence space: continue ours.
                    return Some(st.start_run(source, in_seq, in_ts, now));
                } else if delta < 0 && -delta <= MAX_LATE && run.last_out_seq as i64 + delta >= 0 {
                    ((run.last_out_seq as i64 + delta) as u64, false)
                } else {
                    return None;
                };
                let ts = in_ts.wrapping_add(run.ts_offset);
                if advance {
                    st.run = Some(Run {
                        last_in_seq: in_seq,
                        last_out_seq: out_seq,
                        ..run
                    });
                    st.next_seq = out_seq + 1;
                    st.last_out = Some((ts, now));
                }
                Some(Rewritten {
                    seq: out_seq,
                    timestamp: ts,
                    marker: false,
                })
            }
            // A new speaker on this slot.
            _ => Some(st.start_run(source, in_seq, in_ts, now)),
        }
    }
}

impl SeqState {
    /// Starts a run of `source` at the next sequence number, its timestamps
    /// continuing ours; the first packet carries the marker bit.
    fn start_run(&mut self, source: SpeakerId, in_seq: u64, in_ts: u32, now: Instant) -> Rewritten {
        let out_seq = self.next_seq;
        let ts = self.continued_ts(now);
        self.run = Some(Run {
            source,
            last_in_seq: in_seq,
            last_out_seq: out_seq,
            ts_offset: ts.wrapping_sub(in_ts),
        });
        self.next_seq = out_seq + 1;
        self.last_out = Some((ts, now));
        Rewritten {
            seq: out_seq,
            timestamp: ts,
            marker: true,
        }
    }

    /// The timestamp for the first packet of a new run: the last outgoing
    /// timestamp advanced by the wall-clock time since (at least one frame),
    /// so the receiver's jitter buffer sees time moving forward.
    fn continued_ts(&self, now: Instant) -> u32 {
        match self.last_out {
            None => self.initial_ts,
            Some((ts, at)) => {
                let elapsed = now.saturating_duration_since(at);
                let ticks = (elapsed.as_micros() as u64 * u64::from(CLOCK_RATE) / 1_000_000)
                    .min(u64::from(u32::MAX / 2)) as u32;
                ts.wrapping_add(ticks.max(FRAME_TICKS))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mid() -> Mid {
        Mid::from("0")
    }

    #[test]
    fn same_source_keeps_gaps_and_offsets() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 100, 5000);
        let a = SpeakerId(1);
        let r1 = s.rewrite(a, 10, 1000, t0).unwrap();
        assert_eq!(
            r1,
            Rewritten {
                seq: 100,
                timestamp: 5000,
                marker: true
            }
        );
        let r2 = s.rewrite(a, 11, 1960, t0).unwrap();
        assert_eq!(
            r2,
            Rewritten {
                seq: 101,
                timestamp: 5960,
                marker: false
            }
        );
        // A loss of one packet stays visible as a gap.
        let r3 = s.rewrite(a, 13, 3880, t0).unwrap();
        assert_eq!(r3.seq, 103);
        // The late packet fills the gap without moving the stream on.
        let r4 = s.rewrite(a, 12, 2920, t0).unwrap();
        assert_eq!(r4.seq, 102);
        assert_eq!(s.rewrite(a, 14, 4840, t0).unwrap().seq, 104);
        // A duplicate is dropped.
        assert_eq!(s.rewrite(a, 14, 4840, t0), None);
    }

    #[test]
    fn switch_continues_sequence_and_timestamp() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 7, 0);
        let (a, b) = (SpeakerId(1), SpeakerId(2));
        for i in 0..5u64 {
            s.rewrite(
                a,
                500 + i,
                77_000 + i as u32 * 960,
                t0 + Duration::from_millis(20 * i),
            )
            .unwrap();
        }
        let t_switch = t0 + Duration::from_millis(200);
        let r = s.rewrite(b, 40_000, 123, t_switch).unwrap();
        assert_eq!(r.seq, 12);
        assert!(r.marker);
        // 200 ms - 80 ms since the last packet = 120 ms = 5760 ticks.
        assert_eq!(r.timestamp, 4 * 960 + 5760);
        let r2 = s.rewrite(b, 40_001, 123 + 960, t_switch).unwrap();
        assert_eq!(
            (r2.seq, r2.timestamp, r2.marker),
            (13, 4 * 960 + 5760 + 960, false)
        );
    }

    #[test]
    fn sender_restart_continues_stream() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 0, 0);
        let a = SpeakerId(1);
        s.rewrite(a, 60_000, 10, t0).unwrap();
        let r = s.rewrite(a, 3, 99, t0 + Duration::from_millis(20)).unwrap();
        assert_eq!(r.seq, 1);
        assert_eq!(r.timestamp, 960);
    }

    #[test]
    fn slot_streams_stay_valid_under_random_speaker_switches_and_loss() {
        let mut seed = 0xfeed_beef_cafe_f00du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let t0 = Instant::now();
        let mut slot = Slot::new(mid(), 1234, 777);
        let mut in_seq = [0u64; 4];
        let mut in_ts = [0u32; 4];
        let mut last: Option<(u64, u32)> = None;
        let mut now = t0;
        let mut source = 0usize;
        let mut lost_since_forwarded = 0u64;
        for _ in 0..50_000 {
            now += Duration::from_millis(20);
            if next().is_multiple_of(50) {
                let next = (next() % 4) as usize;
                if next != source {
                    lost_since_forwarded = 0;
                }
                source = next;
            }
            // Each source's own stream advances, with occasional loss.
            in_seq[source] += 1;
            in_ts[source] = in_ts[source].wrapping_add(960);
            if next().is_multiple_of(20) {
                lost_since_forwarded += 1;
                continue;
            }
            let out = slot
                .rewrite(SpeakerId(source as u64), in_seq[source], in_ts[source], now)
                .expect("in-order packets are forwarded");
            if let Some((seq, ts)) = last {
                if out.marker {
                    // A new speaker: the stream continues with the next number.
                    assert_eq!(out.seq, seq + 1, "no gap across a speaker switch");
                } else {
                    // Same speaker: the gap is exactly its lost packets.
                    assert_eq!(out.seq, seq + 1 + lost_since_forwarded, "gaps mirror loss");
                }
                assert!(
                    out.timestamp.wrapping_sub(ts) as i32 > 0,
                    "timestamps only grow"
                );
            }
            lost_since_forwarded = 0;
            last = Some((out.seq, out.timestamp));
        }
    }
}
