//! Active-speaker selection for one conversation.
//!
//! Each packet's RFC 6464 audio level feeds a smoothed loudness per member.
//! The selector keeps a short, *ranked* list of active speakers (as many as
//! the largest subscriber can hear, plus one so a subscriber who is speaking
//! still has someone to hear). A subscriber with `k` slots hears the first `k`
//! of that list other than itself. A speaker overtakes the one ranked just
//! above it (or displaces the last when the list is full) only when that one
//! has gone quiet, or when it is louder by a margin and the other has held its
//! rank for a minimum dwell time: that hysteresis stops slots from flapping
//! between two voices.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sfu::ids::SpeakerId;

/// Tuning of the selector.
#[derive(Debug, Clone, Copy)]
pub struct SpeakerConfig {
    /// Loudness (127 minus the RFC 6464 level, so 0 is silence) below which a
    /// packet counts as silent. Default 127-60: quieter than -60 dBov is silence.
    pub voiced_loudness: f32,
    /// How much louder (smoothed) a newcomer must be to displace a speaker.
    pub margin: f32,
    /// How long a speaker keeps its place before a louder one may displace it.
    pub min_dwell: Duration,
    /// After this long without a voiced packet a speaker counts as silent and
    /// may be displaced at once.
    pub silence_hold: Duration,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        SpeakerConfig {
            voiced_loudness: 67.0,
            margin: 6.0,
            min_dwell: Duration::from_millis(800),
            silence_hold: Duration::from_millis(1000),
        }
    }
}

/// Loudness of a packet: 127 + level (level in -127..=0 dBov). Packets without
/// the extension are assumed voiced at a moderate level so they are still heard.
pub(crate) fn loudness(audio_level: Option<i8>) -> f32 {
    match audio_level {
        Some(l) => f32::from(127i16.saturating_add(i16::from(l)).clamp(0, 127) as u8),
        None => 80.0,
    }
}

/// The CSRC that names a speaker in every packet forwarded from them: the
/// first 4 bytes, big-endian, of SHA-256 of their user id (UTF-8). A client
/// that knows a conversation's member ids maps a CSRC to a person with no
/// extra message (browsers report it in `getContributingSources()`). Two
/// members collide with probability about N²/2³³.
pub fn speaker_csrc(userid: &str) -> u32 {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, userid.as_bytes());
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl SpeakerConfig {
    /// True if a packet at this level counts as speech (for the selector
    /// and for bites alike).
    pub(crate) fn is_voiced(&self, audio_level: Option<i8>) -> bool {
        loudness(audio_level) >= self.voiced_loudness
    }
}

#[derive(Debug, Clone, Copy)]
struct Score {
    smoothed: f32,
    last_voiced: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Active {
    speaker: SpeakerId,
    since: Instant,
}

/// The active speakers of one conversation.
#[derive(Debug)]
pub struct SpeakerSelector {
    config: SpeakerConfig,
    capacity: usize,
    scores: HashMap<SpeakerId, Score>,
    active: Vec<Active>,
}

impl SpeakerSelector {
    /// A selector that keeps at most `capacity` active speakers.
    pub fn new(config: SpeakerConfig, capacity: usize) -> Self {
        SpeakerSelector {
            config,
            capacity: capacity.max(1),
            scores: HashMap::new(),
            active: Vec::new(),
        }
    }

    /// Changes how many speakers are kept; returns true if the active set
    /// changed (shrinking drops the weakest).
    pub fn set_capacity(&mut self, capacity: usize, now: Instant) -> bool {
        self.capacity = capacity.max(1);
        let mut changed = false;
        while self.active.len() > self.capacity {
            if let Some(i) = self.weakest(now) {
                self.active.remove(i);
                changed = true;
            }
        }
        changed
    }

    /// Records one packet of `speaker`; returns true if the ranking changed.
    pub fn on_packet(&mut self, speaker: SpeakerId, audio_level: Option<i8>, now: Instant) -> bool {
        let l = loudness(audio_level);
        let voiced = self.config.is_voiced(audio_level);
        let score = self.scores.entry(speaker).or_insert(Score {
            smoothed: 0.0,
            last_voiced: None,
        });
        score.smoothed = score.smoothed * 0.8 + if voiced { l } else { 0.0 } * 0.2;
        if voiced {
            score.last_voiced = Some(now);
        }
        if !voiced {
            return false;
        }
        match self.active.iter().position(|a| a.speaker == speaker) {
            Some(0) => false,
            Some(i) => self.promote(i, now),
            None if self.active.len() < self.capacity => {
                self.active.push(Active {
                    speaker,
                    since: now,
                });
                self.promote(self.active.len() - 1, now);
                true
            }
            None => {
                let Some(w) = self.weakest(now) else {
                    return false;
                };
                if self.overtakes(speaker, self.active[w], now) {
                    self.active.remove(w);
                    self.active.push(Active {
                        speaker,
                        since: now,
                    });
                    self.promote(self.active.len() - 1, now);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Moves the speaker at rank `i` up past every speaker it overtakes;
    /// returns true if it moved.
    fn promote(&mut self, mut i: usize, now: Instant) -> bool {
        let start = i;
        while i > 0 && self.overtakes(self.active[i].speaker, self.active[i - 1], now) {
            self.active.swap(i - 1, i);
            self.active[i - 1].since = now;
            self.active[i].since = now;
            i -= 1;
        }
        i != start
    }

    /// True if `speaker` may take `incumbent`'s place: the incumbent went
    /// quiet, or `speaker` is louder by the margin after the dwell time.
    fn overtakes(&self, speaker: SpeakerId, incumbent: Active, now: Instant) -> bool {
        let theirs = self.effective(incumbent.speaker, now);
        let ours = self.effective(speaker, now);
        let dwell_over = now.saturating_duration_since(incumbent.since) >= self.config.min_dwell;
        theirs == 0.0 || (dwell_over && ours > theirs + self.config.margin)
    }

    /// Forgets a member; returns true if it was an active speaker.
    pub fn remove(&mut self, speaker: SpeakerId) -> bool {
        self.scores.remove(&speaker);
        let before = self.active.len();
        self.active.retain(|a| a.speaker != speaker);
        before != self.active.len()
    }

    /// True if `speaker` is currently an active speaker.
    pub fn is_active(&self, speaker: SpeakerId) -> bool {
        self.active.iter().any(|a| a.speaker == speaker)
    }

    /// Fills `out` with the first `n` ranked active speakers other than `except`.
    pub fn top_for(&self, except: SpeakerId, n: usize, out: &mut Vec<SpeakerId>) {
        out.clear();
        out.extend(
            self.active
                .iter()
                .map(|a| a.speaker)
                .filter(|p| *p != except)
                .take(n),
        );
    }

    fn effective(&self, speaker: SpeakerId, now: Instant) -> f32 {
        match self.scores.get(&speaker) {
            Some(Score {
                smoothed,
                last_voiced: Some(t),
            }) if now.saturating_duration_since(*t) < self.config.silence_hold => *smoothed,
            _ => 0.0,
        }
    }

    fn weakest(&self, now: Instant) -> Option<usize> {
        self.active
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                self.effective(a.speaker, now)
                    .total_cmp(&self.effective(b.speaker, now))
            })
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrc_is_the_start_of_the_sha256_of_the_user_id() {
        // sha256("alice") = 2bd806c9 7f0e00af 1a1fc332 8fa763a9 ...
        assert_eq!(speaker_csrc("alice"), 0x2bd8_06c9);
        assert_ne!(speaker_csrc("alice"), speaker_csrc("bob"));
    }

    const LOUD: Option<i8> = Some(-20);
    const SOFT: Option<i8> = Some(-50);
    const SILENT: Option<i8> = Some(-127);

    #[test]
    fn fills_capacity_then_needs_margin_and_dwell() {
        let t0 = Instant::now();
        let mut s = SpeakerSelector::new(SpeakerConfig::default(), 1);
        assert!(s.on_packet(SpeakerId(1), SOFT, t0));
        // Silence never enters.
        assert!(!s.on_packet(SpeakerId(3), SILENT, t0));
        // A louder newcomer must wait out the dwell time.
        assert!(!s.on_packet(SpeakerId(2), LOUD, t0 + Duration::from_millis(100)));
        let mut t = t0 + Duration::from_millis(100);
        let mut switched = false;
        // Long enough for two overtakes, each after a dwell time.
        for _ in 0..120 {
            t += Duration::from_millis(20);
            s.on_packet(SpeakerId(1), SOFT, t);
            if s.on_packet(SpeakerId(2), LOUD, t) {
                switched = true;
                break;
            }
        }
        assert!(switched);
        assert!(t >= t0 + SpeakerConfig::default().min_dwell);
        assert!(s.is_active(SpeakerId(2)) && !s.is_active(SpeakerId(1)));
    }

    #[test]
    fn silent_speaker_is_displaced_at_once() {
        let t0 = Instant::now();
        let mut s = SpeakerSelector::new(SpeakerConfig::default(), 1);
        assert!(s.on_packet(SpeakerId(1), LOUD, t0));
        let later = t0 + Duration::from_millis(1500);
        assert!(s.on_packet(SpeakerId(2), SOFT, later));
        let mut out = vec![];
        s.top_for(SpeakerId(9), 3, &mut out);
        assert_eq!(out, vec![SpeakerId(2)]);
    }

    #[test]
    fn top_for_excludes_self_and_orders_by_loudness() {
        let t0 = Instant::now();
        let mut s = SpeakerSelector::new(SpeakerConfig::default(), 3);
        let mut t = t0;
        // Long enough for two overtakes, each after a dwell time.
        for _ in 0..120 {
            t += Duration::from_millis(20);
            s.on_packet(SpeakerId(1), SOFT, t);
            s.on_packet(SpeakerId(2), LOUD, t);
            s.on_packet(SpeakerId(3), Some(-35), t);
        }
        let mut out = vec![];
        s.top_for(SpeakerId(2), 5, &mut out);
        assert_eq!(out, vec![SpeakerId(3), SpeakerId(1)]);
        s.top_for(SpeakerId(7), 1, &mut out);
        assert_eq!(out, vec![SpeakerId(2)]);
        assert!(s.remove(SpeakerId(2)));
        assert!(!s.is_active(SpeakerId(2)));
    }
}
