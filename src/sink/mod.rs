//! Where finished bites go: a side thread fed by a bounded queue, publishing
//! to NATS (`nats`) and/or writing `.ogg` files (`files`). The media loop
//! only ever `try_send`s into the queue; what does not fit is counted and
//! logged, never waited for.

pub(crate) mod bite_file;
pub mod files;
pub mod nats;
mod ogg_opus;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use log::{debug, error, info, warn};

use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::sfu::FinishedBite;
use nats::{NatsConfig, NatsPublisher};

/// Bites that may wait between the media loop and the sink thread.
pub const QUEUE: usize = 1024;
/// How often the sink thread retries publishing while idle.
const TICK: Duration = Duration::from_millis(50);

/// A full sink queue is logged at most once a second (the loop calls this,
/// and the limiter takes no lock).
static QUEUE_FULL: LogLimit = LogLimit::new(Duration::from_secs(1));

/// What the sink does with bites.
#[derive(Debug, Clone, Default)]
pub struct SinkConfig {
    /// Publish to NATS.
    pub nats: Option<NatsConfig>,
    /// Also write files here.
    pub dir: Option<PathBuf>,
}

enum SinkMsg {
    Bite(FinishedBite),
    /// These last bites, then publish what is left until the deadline
    /// (spooling what NATS did not take), then stop.
    Finish(Vec<FinishedBite>, Instant),
    /// The process is about to exit on a failure: take what is queued,
    /// spool the backlog, and say how many bites were kept.
    Spool(Sender<usize>),
}

/// The media loop's end of the queue.
#[derive(Clone)]
pub struct BiteQueue {
    tx: Sender<SinkMsg>,
    metrics: Arc<Metrics>,
}

impl BiteQueue {
    /// Hands a bite to the sink thread without waiting.
    pub fn offer(&self, b: FinishedBite) {
        self.metrics.bites.inc();
        match self.tx.try_send(SinkMsg::Bite(b)) {
            Ok(()) => {}
            Err(TrySendError::Full(SinkMsg::Bite(b))) => {
                self.metrics.bite_dropped("sink_queue_full");
                QUEUE_FULL.log(Instant::now(), |more| {
                    warn!(
                        "bite sink queue full: dropped a bite of {}/{} in {} ({more} more dropped since the last line)",
                        b.userid, b.clientid, b.conversation
                    )
                });
            }
            Err(_) => self.metrics.bite_dropped("sink_stopped"),
        }
    }

    /// Asks the sink thread to take what is queued and spool its backlog,
    /// waiting at most `wait`; how many bites it kept, or `None` in time.
    /// For the failure exits only (the sink then takes no more bites).
    pub fn spool_now(&self, wait: Duration) -> Option<usize> {
        let deadline = Instant::now() + wait;
        let (ack, done) = crossbeam_channel::bounded(1);
        self.tx.send_timeout(SinkMsg::Spool(ack), wait).ok()?;
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// A queue nobody reads (no sink configured): bites are counted as dropped.
    pub fn disconnected(metrics: Arc<Metrics>) -> Self {
        let (tx, _) = crossbeam_channel::bounded(1);
        BiteQueue { tx, metrics }
    }
}

/// The running sink thread.
pub struct Sink {
    tx: Sender<SinkMsg>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Starts the sink thread.
    pub fn start(config: SinkConfig, metrics: Arc<Metrics>) -> std::io::Result<(Sink, BiteQueue)> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let m = metrics.clone();
        let thread = thread::Builder::new()
            .name("bite-sink".into())
            .spawn(move || run(config, rx, m))?;
        Ok((
            Sink {
                tx: tx.clone(),
                thread: Some(thread),
            },
            BiteQueue { tx, metrics },
        ))
    }

    /// Takes the bites finished while stopping, publishes what is queued
    /// (waiting at most until `deadline`), spools the rest, and stops.
    pub fn finish(mut self, last: Vec<FinishedBite>, deadline: Instant) {
        let n = last.len();
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        if self
            .tx
            .send_timeout(SinkMsg::Finish(last, deadline), wait)
            .is_err()
        {
            error!("the bite sink did not take the last {n} bite(s); they are lost");
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline + Duration::from_millis(500) {
                thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!("bite sink did not finish in time");
            }
        }
    }
}

fn run(config: SinkConfig, rx: Receiver<SinkMsg>, metrics: Arc<Metrics>) {
    let mut nats = config
        .nats
        .clone()
        .map(|c| NatsPublisher::start(c, metrics.clone()));
    if let Some(dir) = &config.dir {
        info!("writing bites to {}", dir.display());
    }
    let mut finish_by = None;
    loop {
        match rx.recv_timeout(TICK) {
            Ok(SinkMsg::Bite(b)) => store_bite(&config, nats.as_mut(), &metrics, &b),
            Ok(SinkMsg::Finish(last, deadline)) => {
                for b in &last {
                    store_bite(&config, nats.as_mut(), &metrics, b);
                }
                finish_by = Some(deadline);
            }
            Ok(SinkMsg::Spool(ack)) => {
                // Bites queued before the request are the ones to keep.
                while let Ok(SinkMsg::Bite(b)) = rx.try_recv() {
                    store_bite(&config, nats.as_mut(), &metrics, &b);
                }
                let kept = nats.as_mut().map_or(0, NatsPublisher::spool);
                let _ = ack.send(kept);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => finish_by = finish_by.or(Some(Instant::now())),
        }
        if let Some(n) = &mut nats {
            n.pump();
        }
        if let Some(deadline) = finish_by {
            // Drain whatever is still queued first.
            while let Ok(SinkMsg::Bite(b)) = rx.try_recv() {
                store_bite(&config, nats.as_mut(), &metrics, &b);
            }
            let Some(n) = &mut nats else { return };
            n.pump();
            if n.backlog_len() == 0 || Instant::now() >= deadline {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                let flushed = n.flush(left);
                let left_over = n.backlog_len();
                if left_over > 0 || !flushed {
                    warn!(
                        "stopping with {left_over} bite(s) not delivered to NATS (connected: {})",
                        n.is_connected()
                    );
                }
                if left_over > 0 {
                    let spooled = n.spool();
                    if spooled > 0 {
                        info!("spooled {spooled} bite(s); they are published at the next start");
                    }
                    for _ in spooled..left_over {
                        metrics.bite_dropped("shutdown_undelivered");
                    }
                }
                return;
            }
        }
    }
}

/// Writes a bite's file (if configured) and queues it for NATS (if
/// configured), counting and logging what fails.
fn store_bite(
    config: &SinkConfig,
    nats: Option<&mut NatsPublisher>,
    metrics: &Metrics,
    b: &FinishedBite,
) {
    // Written here, on the sink thread, never on the media loop.
    let ogg = bite_file::to_ogg(&b.audio);
    if let Some(dir) = &config.dir {
        match files::write_bite(dir, b, &ogg) {
            Ok(p) => {
                metrics.bites_written.inc();
                debug!("wrote {}", p.display());
            }
            Err(e) => {
                metrics.bite_dropped("file_write_error");
                warn!("could not write a bite under {}: {e}", dir.display());
            }
        }
    }
    if let Some(n) = nats {
        n.enqueue(b, &ogg);
    }
}
