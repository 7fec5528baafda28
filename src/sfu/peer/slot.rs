//! A slot: one audio m-line on which the server sends to a subscriber.
//!
//! The speaker behind a slot changes as the conversation's active speakers
//! change, but what the subscriber sees stays one valid RTP stream: str0m's
//! SSRC for that m-line, sequence numbers that continue across a switch, and
//! timestamps that keep advancing with wall-clock time. This module holds only
//! that arithmetic; it knows nothing about sockets or `Rtc`.

use std::time::Instant;

use str0m::media::{Mid, Pt};

use crate::sfu::ids::SpeakerId;
use crate::sfu::opus::{CLOCK_RATE, FRAME_TICKS};

/// Sequence jumps larger than this are treated as a sender restart.
const MAX_SEQ_JUMP: i64 = 1_000;
/// How many outgoing sequence numbers back a late packet may fill a gap
/// (the width of the sent-window bitmap).
const WINDOW: u64 = 64;

/// One outgoing stream of a subscriber.
#[derive(Debug)]
pub struct Slot {
    /// The m-line this slot sends on.
    pub mid: Mid,
    /// The subscriber's payload types on this m-line, learned lazily.
    pub pts: Option<SlotPts>,
    seq: SeqState,
}

/// What a subscriber negotiated on one m-line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPts {
    /// Its payload type for Opus.
    pub opus: Pt,
    /// Its payload type for RED (RFC 2198) over Opus, if it offered RED.
    pub red: Option<Pt>,
}

/// One incoming packet as the rewriter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// Who is speaking.
    pub speaker: SpeakerId,
    /// The sender's SSRC: a change means the sender restarted its stream.
    pub ssrc: u32,
    /// The sender's extended sequence number.
    pub seq: u64,
    /// The sender's RTP timestamp.
    pub timestamp: u32,
    /// The sender's marker bit (start of a talk spurt).
    pub marker: bool,
}

/// Where the rewritten stream is, and what the last forwarded input was.
#[derive(Debug)]
struct SeqState {
    /// Next fresh outgoing extended sequence number.
    next_seq: u64,
    /// Bit `i` set: outgoing number `next_seq - 1 - i` was sent. A number is
    /// never sent twice: reusing an SRTP index under the same key with other
    /// plaintext breaks AES-GCM, and receivers drop it as a replay.
    sent: u64,
    /// Last outgoing timestamp and when it was sent.
    last_out: Option<(u32, Instant)>,
    /// Timestamp of the very first packet of the stream.
    initial_ts: u32,
    /// The current run: one sender stream mapped onto ours.
    run: Option<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    source: SpeakerId,
    ssrc: u32,
    /// Last input extended sequence number forwarded in order.
    last_in_seq: u64,
    /// Outgoing sequence number of that packet.
    last_out_seq: u64,
    /// First outgoing sequence number of the run: nothing older is sent.
    first_out_seq: u64,
    /// The sender's timestamp of the run's first packet: no redundancy
    /// older than it rides on this run.
    first_in_ts: u32,
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
    /// Set on the first packet of a run and where the sender set it.
    pub marker: bool,
    /// Sender ticks from the run's first packet to this one: redundant
    /// blocks further back than this belong to another speaker or stream.
    pub since_run: u32,
}

impl Slot {
    /// A slot on `mid`, its outgoing stream starting at `first_seq`/`first_ts`
    /// (random in production so streams are not predictable).
    pub fn new(mid: Mid, first_seq: u16, first_ts: u32) -> Self {
        Slot {
            mid,
            pts: None,
            seq: SeqState {
                // Stay below 2^15 so the first ROC is 0 and no wrap is near.
                next_seq: u64::from(first_seq & 0x7fff),
                sent: 0,
                last_out: None,
                initial_ts: first_ts,
                run: None,
            },
        }
    }

    /// Computes the outgoing header for a packet. `None` means drop it: a
    /// duplicate, too late, or older than the run it belongs to.
    pub fn rewrite(&mut self, pkt: Incoming, now: Instant) -> Option<Rewritten> {
        let st = &mut self.seq;
        let run = match st.run {
            Some(run) if run.source == pkt.speaker && run.ssrc == pkt.ssrc => run,
            // A new speaker on this slot, or the sender restarted its stream.
            _ => return Some(st.start_run(pkt, now)),
        };
        // The signed distance in the 64-bit sequence space, wrapping: a
        // sequence number from outside (another node's) may be anywhere.
        let delta = pkt.seq.wrapping_sub(run.last_in_seq) as i64;
        if !(-MAX_SEQ_JUMP..=MAX_SEQ_JUMP).contains(&delta) {
            // The sender jumped in its sequence space: continue ours.
            return Some(st.start_run(pkt, now));
        }
        let ts = pkt.timestamp.wrapping_add(run.ts_offset);
        if delta > 0 {
            let out = run.last_out_seq + delta as u64;
            st.mark_sent(out);
            st.run = Some(Run {
                last_in_seq: pkt.seq,
                last_out_seq: out,
                ..run
            });
            st.last_out = Some((ts, now));
            return Some(Rewritten {
                seq: out,
                timestamp: ts,
                marker: pkt.marker,
                since_run: run.since_start(pkt.timestamp),
            });
        }
        // Late (or a duplicate): it may only fill a gap of this run that was
        // never sent.
        let out = run.last_out_seq.checked_sub(delta.unsigned_abs())?;
        if out < run.first_out_seq || !st.mark_sent(out) {
            return None;
        }
        Some(Rewritten {
            seq: out,
            timestamp: ts,
            marker: pkt.marker,
            since_run: run.since_start(pkt.timestamp),
        })
    }
}

impl Run {
    /// Sender ticks from the run's first packet to `ts` (0 if `ts` is
    /// before it, as a late packet's may be).
    fn since_start(&self, ts: u32) -> u32 {
        let d = ts.wrapping_sub(self.first_in_ts);
        if d < 1 << 31 {
            d
        } else {
            0
        }
    }
}

impl SeqState {
    /// Starts a run of a sender stream at the next fresh sequence number,
    /// its timestamps continuing ours; the first packet carries the marker.
    fn start_run(&mut self, pkt: Incoming, now: Instant) -> Rewritten {
        let out = self.next_seq;
        let ts = self.continued_ts(now);
        self.mark_sent(out);
        self.run = Some(Run {
            source: pkt.speaker,
            ssrc: pkt.ssrc,
            last_in_seq: pkt.seq,
            last_out_seq: out,
            first_out_seq: out,
            first_in_ts: pkt.timestamp,
            ts_offset: ts.wrapping_sub(pkt.timestamp),
        });
        self.last_out = Some((ts, now));
        Rewritten {
            seq: out,
            timestamp: ts,
            marker: true,
            since_run: 0,
        }
    }

    /// Records `seq` as sent; false if it already was or is too old to tell.
    fn mark_sent(&mut self, seq: u64) -> bool {
        if seq >= self.next_seq {
            let shift = seq + 1 - self.next_seq;
            self.sent = if shift >= WINDOW {
                0
            } else {
                self.sent << shift
            };
            self.sent |= 1;
            self.next_seq = seq + 1;
            return true;
        }
        let back = self.next_seq - 1 - seq;
        if back >= WINDOW || self.sent & (1 << back) != 0 {
            return false;
        }
        self.sent |= 1 << back;
        true
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

    /// A packet of speaker `s` (whose SSRC is its id), no marker.
    fn inc(s: SpeakerId, seq: u64, timestamp: u32) -> Incoming {
        Incoming {
            speaker: s,
            ssrc: s.0 as u32,
            seq,
            timestamp,
            marker: false,
        }
    }

    #[test]
    fn same_source_keeps_gaps_and_offsets() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 100, 5000);
        let a = SpeakerId(1);
        let r1 = s.rewrite(inc(a, 10, 1000), t0).unwrap();
        assert_eq!(
            r1,
            Rewritten {
                seq: 100,
                timestamp: 5000,
                marker: true,
                since_run: 0,
            }
        );
        let r2 = s.rewrite(inc(a, 11, 1960), t0).unwrap();
        assert_eq!(
            r2,
            Rewritten {
                seq: 101,
                timestamp: 5960,
                marker: false,
                since_run: 960,
            }
        );
        // A loss of one packet stays visible as a gap.
        let r3 = s.rewrite(inc(a, 13, 3880), t0).unwrap();
        assert_eq!(r3.seq, 103);
        // The late packet fills the gap without moving the stream on.
        let r4 = s.rewrite(inc(a, 12, 2920), t0).unwrap();
        assert_eq!(r4.seq, 102);
        assert_eq!(s.rewrite(inc(a, 14, 4840), t0).unwrap().seq, 104);
        // A duplicate is dropped.
        assert_eq!(s.rewrite(inc(a, 14, 4840), t0), None);
    }

    #[test]
    fn switch_continues_sequence_and_timestamp() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 7, 0);
        let (a, b) = (SpeakerId(1), SpeakerId(2));
        for i in 0..5u64 {
            s.rewrite(
                inc(a, 500 + i, 77_000 + i as u32 * 960),
                t0 + Duration::from_millis(20 * i),
            )
            .unwrap();
        }
        let t_switch = t0 + Duration::from_millis(200);
        let r = s.rewrite(inc(b, 40_000, 123), t_switch).unwrap();
        assert_eq!(r.seq, 12);
        assert!(r.marker);
        // 200 ms - 80 ms since the last packet = 120 ms = 5760 ticks.
        assert_eq!(r.timestamp, 4 * 960 + 5760);
        assert_eq!(r.since_run, 0, "no redundancy from before the switch");
        let r2 = s.rewrite(inc(b, 40_001, 123 + 960), t_switch).unwrap();
        assert_eq!(r2.since_run, 960, "one frame of b's run behind it");
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
        s.rewrite(inc(a, 60_000, 10), t0).unwrap();
        let r = s
            .rewrite(inc(a, 3, 99), t0 + Duration::from_millis(20))
            .unwrap();
        assert_eq!(r.seq, 1);
        assert_eq!(r.timestamp, 960);
    }

    #[test]
    fn slot_streams_stay_valid_under_random_speaker_switches_and_loss() {
        let mut next = crate::sfu::test_rng::xorshift(0xfeed_beef_cafe_f00du64);
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
                .rewrite(
                    inc(SpeakerId(source as u64), in_seq[source], in_ts[source]),
                    now,
                )
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

    #[test]
    fn a_late_packet_right_after_a_switch_never_reuses_a_sequence_number() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 10, 0);
        let (a, b) = (SpeakerId(1), SpeakerId(2));
        for i in 0..5 {
            s.rewrite(inc(a, 100 + i, i as u32 * 960), t0).unwrap();
        }
        // B takes the slot at its packet 50 (out 15); its packet 49 arrives late.
        let first_b = s.rewrite(inc(b, 50, 0), t0).unwrap();
        assert_eq!(first_b.seq, 15);
        assert_eq!(s.rewrite(inc(b, 49, 0), t0), None, "older than the run");
        assert_eq!(s.rewrite(inc(b, 51, 960), t0).unwrap().seq, 16);
    }

    #[test]
    fn the_senders_marker_passes_through() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 0, 0);
        let a = SpeakerId(1);
        s.rewrite(inc(a, 1, 0), t0).unwrap();
        assert!(!s.rewrite(inc(a, 2, 960), t0).unwrap().marker);
        let spurt = Incoming {
            marker: true,
            ..inc(a, 3, 1920)
        };
        assert!(s.rewrite(spurt, t0).unwrap().marker);
    }

    #[test]
    fn an_ssrc_change_or_a_big_backwards_step_restarts_the_run() {
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 0, 0);
        let a = SpeakerId(1);
        s.rewrite(inc(a, 500, 0), t0).unwrap();
        s.rewrite(inc(a, 501, 960), t0).unwrap();
        // Same speaker, new SSRC, sequence numbers from an unrelated space.
        let restarted = Incoming {
            ssrc: 99,
            ..inc(a, 7, 5)
        };
        let r = s
            .rewrite(restarted, t0 + Duration::from_millis(20))
            .unwrap();
        assert_eq!((r.seq, r.marker), (2, true));
        // A large backwards step in the same SSRC restarts too.
        let back = Incoming {
            ssrc: 99,
            ..inc(a, 7 - 5 + 100_000, 5)
        };
        let r = s.rewrite(back, t0 + Duration::from_millis(40)).unwrap();
        assert_eq!((r.seq, r.marker), (3, true));
    }

    #[test]
    fn a_million_random_inputs_never_reuse_an_outgoing_sequence_number() {
        let mut next = crate::sfu::test_rng::xorshift(0x9E37_79B9_7F4A_7C15u64);
        let t0 = Instant::now();
        let mut s = Slot::new(mid(), 12_345, 0);
        let mut seqs = [0u64; 3];
        let mut ssrcs = [1u32, 2, 3];
        let mut seen = std::collections::HashSet::new();
        let mut now = t0;
        let mut forwarded = 0;
        for _ in 0..1_000_000 {
            let r = next();
            let who = (r % 3) as usize;
            // Mostly in order; sometimes late, duplicated, jumping or restarting.
            seqs[who] = match (r >> 8) % 100 {
                0..=79 => seqs[who] + 1,
                80..=89 => seqs[who].saturating_sub((r >> 16) % 80),
                90..=94 => seqs[who],
                95..=97 => seqs[who] + (r >> 16) % 5_000,
                _ => {
                    ssrcs[who] = ssrcs[who].wrapping_add(3);
                    (r >> 16) % 70_000
                }
            };
            now += Duration::from_micros((r >> 40) % 20_000);
            let pkt = Incoming {
                speaker: SpeakerId(who as u64),
                ssrc: ssrcs[who],
                seq: seqs[who],
                timestamp: (seqs[who] as u32).wrapping_mul(960),
                marker: r & 1 == 1,
            };
            if let Some(out) = s.rewrite(pkt, now) {
                forwarded += 1;
                assert!(seen.insert(out.seq), "outgoing {} sent twice", out.seq);
            }
        }
        assert!(
            forwarded > 500_000,
            "most packets are forwarded ({forwarded})"
        );
    }
}
