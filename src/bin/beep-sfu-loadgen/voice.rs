//! Who says what when: the three loads the generator can make.
//!
//! - `everyone`: every talker sends a 20 ms packet every 20 ms for the whole
//!   run. No real room does this; it is the worst case.
//! - `conversation`: rooms take turns. In each room one member talks at a
//!   time, in spurts of exponential length (mean 2 s) separated by pauses
//!   (exponential, mean 0.5 s); everyone not talking sends Opus DTX, one
//!   TOC-only packet per 400 ms, as a browser does once the answer carries
//!   `usedtx=1`.
//! - `large-room`: one room of everyone, 10 talkers and the rest listening
//!   with one slot each, the shape of LiveKit's published audio benchmark.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Shape;

/// Which load to make.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Everyone (or the `--talkers` share) talking all the time.
    Everyone,
    /// Rooms taking turns, the silent sending DTX.
    Conversation,
    /// One room, 10 talkers, everyone else listening on one slot.
    LargeRoom,
}

/// What a participant sends at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voice {
    /// A 20 ms packet of speech (counted, timed).
    Talk,
    /// Silence in DTX: a TOC-only packet if 400 ms have passed since the last.
    Dtx,
    /// Nothing.
    Quiet,
}

/// Talkers in a large room.
pub const LARGE_ROOM_TALKERS: usize = 10;
/// Mean spurt and pause in a conversation.
const SPURT_MEAN: f64 = 2.0;
const PAUSE_MEAN: f64 = 0.5;
/// One DTX packet per this long (libopus and WebRTC's DTX update interval).
pub const DTX_INTERVAL: Duration = Duration::from_millis(400);
/// A DTX frame: the TOC byte of a 20 ms SILK frame and nothing else.
pub const DTX_FRAME: [u8; 1] = [0x08];

/// How many of `n` participants talk (all the time, for `everyone` and
/// `large-room`; by turns, for `conversation`).
pub fn talker_count(shape: &Shape, n: usize) -> usize {
    match shape.load {
        Load::Everyone => (n as f64 * shape.talkers.clamp(0.0, 1.0)).round() as usize,
        Load::LargeRoom => LARGE_ROOM_TALKERS.min(n),
        Load::Conversation => n,
    }
}

/// One room's turn-taking: who talks until when.
struct Turns {
    rng: StdRng,
    /// The member talking (index within the room), or `None` in a pause.
    talker: Option<usize>,
    until: Instant,
}

impl Turns {
    fn new(room: usize, start: Instant) -> Turns {
        Turns {
            rng: StdRng::seed_from_u64(0x5eed ^ room as u64),
            talker: None,
            until: start,
        }
    }

    fn exp(&mut self, mean: f64) -> Duration {
        let u: f64 = self.rng.random_range(0.0..1.0);
        Duration::from_secs_f64(-mean * (1.0 - u).ln())
    }

    /// Who is talking at `now` in a room of `size`.
    fn at(&mut self, now: Instant, size: usize) -> Option<usize> {
        while now >= self.until {
            if self.talker.is_some() {
                self.talker = None;
                let pause = self.exp(PAUSE_MEAN);
                self.until += pause;
            } else {
                self.talker = Some(self.rng.random_range(0..size.max(1)));
                let spurt = self.exp(SPURT_MEAN);
                self.until += spurt;
            }
        }
        self.talker
    }
}

/// What participant `i` sends at `now`, for the shape's load.
pub fn voice_fn(shape: &Shape) -> impl Fn(usize, Instant) -> Voice {
    let load = shape.load;
    let talkers = talker_count(shape, shape.participants);
    let size = shape.room_size.max(1);
    let turns: RefCell<Vec<Turns>> = RefCell::new(Vec::new());
    let start = Instant::now();
    move |i, now| match load {
        Load::Everyone | Load::LargeRoom => {
            if i < talkers {
                Voice::Talk
            } else {
                Voice::Quiet
            }
        }
        Load::Conversation => {
            let room = i / size;
            let mut t = turns.borrow_mut();
            while t.len() <= room {
                let r = t.len();
                t.push(Turns::new(r, start));
            }
            if t[room].at(now, size) == Some(i % size) {
                Voice::Talk
            } else {
                Voice::Dtx
            }
        }
    }
}

/// Whether a participant in DTX that last sent at `last` sends now.
pub fn dtx_due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < DTX_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}
