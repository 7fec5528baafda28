//! The media loop's pulse: it records each turn, `/healthz` reports the age
//! of the last one, and a watchdog ends the process when the loop has
//! stalled or died, so its supervisor restarts it instead of a liveness probe
//! guessing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};

/// Exit status when the media loop panicked or stalled (EX_SOFTWARE).
pub(crate) const EXIT_LOOP_FAILED: i32 = 70;
/// Longest the failure exits wait for the sink to spool its backlog.
const SPOOL_ON_EXIT: Duration = Duration::from_secs(3);

/// What a failure exit does before it ends the process: spools the bites
/// not yet delivered, within a deadline; returns how many were kept.
pub(crate) type LastRites = Box<dyn Fn(Duration) -> Option<usize> + Send>;

/// When the loop last turned, whether it is stopping on purpose, and what
/// to save before a failure exit.
pub(crate) struct LoopHealth {
    epoch: Instant,
    last_turn_ms: AtomicU64,
    stopping: AtomicBool,
    last_rites: Mutex<Option<LastRites>>,
}

impl LoopHealth {
    /// A pulse that just beat.
    pub fn new() -> Self {
        LoopHealth {
            epoch: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            last_rites: Mutex::new(None),
        }
    }

    /// What to save before a failure exit (the server sets the sink's
    /// spool here once it runs).
    pub fn set_last_rites(&self, f: LastRites) {
        if let Ok(mut r) = self.last_rites.lock() {
            *r = Some(f);
        }
    }

    /// Ends the process with [`EXIT_LOOP_FAILED`] after spooling what the
    /// sink holds, waiting at most [`SPOOL_ON_EXIT`]. Never returns.
    pub fn fail(&self) -> ! {
        self.set_stopping();
        let rites = self.last_rites.lock().ok().and_then(|mut r| r.take());
        if let Some(spool) = rites {
            match spool(SPOOL_ON_EXIT) {
                Some(n) => {
                    info!("spooled {n} bite(s) before exiting; the next start publishes them")
                }
                None => warn!(
                    "the bite sink did not spool within {SPOOL_ON_EXIT:?}; its bites are lost"
                ),
            }
        }
        std::process::exit(EXIT_LOOP_FAILED);
    }

    /// The loop turned (one relaxed store).
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last turn.
    pub fn age(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_turn_ms.load(Ordering::Relaxed)))
    }

    /// The loop is stopping on purpose: the watchdog stands down.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// True once [`LoopHealth::set_stopping`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// Starts the watchdog: if the loop goes `stall` without a turn while not
/// stopping, logs why and exits the process with [`EXIT_LOOP_FAILED`].
pub(crate) fn watch(health: std::sync::Arc<LoopHealth>, stall: Duration) -> std::io::Result<()> {
    thread::Builder::new()
        .name("loop-watchdog".into())
        .spawn(move || loop {
            thread::sleep(Duration::from_millis(250).min(stall));
            if health.is_stopping() {
                return;
            }
            let age = health.age();
            if age >= stall {
                error!(
                    "the media loop has not turned for {} ms (limit {} ms); exiting so the supervisor restarts the service",
                    age.as_millis(),
                    stall.as_millis()
                );
                health.fail();
            }
        })
        .map(|_| ())
}
