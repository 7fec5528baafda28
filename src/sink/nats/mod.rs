//! Publishes bites to NATS: `Bite` on the bite subject and
//! `Store{type:"bite", bite}` on the store subject.
//!
//! Uses the synchronous `nats` crate the owner named. It can reconnect
//! forever and buffer while reconnecting, but its first `connect` blocks
//! until a server answers, so it runs on a connector thread of its own, and
//! every blocking call runs on a worker thread (`worker.rs`) the sink waits
//! for only a bounded time.
//!
//! A bite counts as published only when the server has it: with
//! JetStream, once both messages are acknowledged; with core NATS, once a
//! flush round trip after both messages came back within `--nats-ping-secs`.
//! Until then it stays at the front of the backlog, and a bite whose round
//! trip fails is sent again from its first message (so a consumer may see
//! a bite twice, never lose one). The `nats` client's own keep-alive is
//! fixed at two minutes, so the publisher probes an idle connection itself
//! every `--nats-ping-secs` and, after two missed round trips, drops the
//! connection and dials again.
//!
//! The backlog is bounded in bytes: what overflows it is dropped
//! oldest-first among the bites not yet started (never the one in flight),
//! counted and logged. What is left at exit is spooled (`spool.rs`).

// The owner named the synchronous `nats` crate; upstream deprecated it in
// favour of async-nats, but it meets the outage behaviour we need (see the
// README), so the deprecation warnings are silenced here on purpose.
#![allow(deprecated)]

mod backlog;
mod spool;
mod worker;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{info, warn};
use prost::Message;

use crate::metrics::Metrics;
use crate::nats_connect::{self, Connecting, Dial, NatsAuth};
use crate::proto::{Bite, Client, Store};
use crate::sfu::FinishedBite;
use worker::{Job, Worker};

/// Longest the sink waits for one call before it gets on with its work
/// (the call stays in flight and is checked again on the next pump).
const PUBLISH_WAIT: Duration = Duration::from_millis(500);
/// After this long in flight, a call is reported as stalled (once).
const STALL_WARNING: Duration = Duration::from_secs(5);
/// Round trips missed in a row before the connection is dropped and dialled
/// again.
const MAX_MISSED: u32 = 2;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), e.g. `nats://localhost:4222`.
    pub url: String,
    /// Subject for `Bite` messages.
    pub bite_subject: String,
    /// Subject for `Store` messages.
    pub store_subject: String,
    /// Most bytes kept while NATS is unreachable.
    pub backlog_bytes: usize,
    /// Where bites NATS did not take before exit are written, and read back
    /// (and published) at the next start.
    pub spool_dir: Option<PathBuf>,
    /// Publish through JetStream and wait for each acknowledgement
    /// (at-least-once; needs a stream on both subjects).
    pub jetstream: bool,
    /// Credentials and TLS trust besides the URL.
    pub auth: NatsAuth,
    /// How long a round trip to the server may take, and how often an idle
    /// connection is probed.
    pub ping: Duration,
}

/// How far the bite at the front of the backlog has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing sent yet (or sending again from the start).
    Bite,
    /// The `Bite` message went out; the `Store` message is next.
    Store,
    /// Both went out (core NATS): a flush round trip confirms them.
    Confirm,
}

/// The two encoded messages of one bite.
struct Encoded {
    bite: Vec<u8>,
    store: Vec<u8>,
    stage: Stage,
    /// JetStream acknowledged the `Bite` message (only `Store` is left,
    /// even after a restart).
    bite_acked: bool,
    /// The spool file it was read from, removed once it is published.
    spooled: Option<PathBuf>,
}

impl Encoded {
    fn size(&self) -> usize {
        self.bite.len() + self.store.len()
    }

    fn new(bite: &Bite, bite_acked: bool, spooled: Option<PathBuf>) -> Encoded {
        let store = Store {
            r#type: "bite".into(),
            bite: Some(bite.clone()),
        };
        Encoded {
            bite: bite.encode_to_vec(),
            store: store.encode_to_vec(),
            stage: if bite_acked {
                Stage::Store
            } else {
                Stage::Bite
            },
            bite_acked,
            spooled,
        }
    }
}

/// What the worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    /// A step of the front bite.
    Front(Stage),
    /// A round trip on an idle connection.
    Probe,
}

/// Encodes a finished bite, with its Ogg file, as the wire `Bite`.
pub fn to_proto(b: &FinishedBite, ogg: &[u8]) -> Bite {
    Bite {
        key: b.conversation.clone(),
        start: b.start_unix_ms,
        data: ogg.to_vec(),
        client: Some(Client {
            key: b.userid.clone(),
            client: b.clientid.clone(),
        }),
    }
}

/// The publisher's state, owned by the sink thread.
pub struct NatsPublisher {
    config: NatsConfig,
    conn: Option<nats::Connection>,
    worker: Option<Worker>,
    in_flight: Option<InFlight>,
    /// Round trips missed in a row.
    missed: u32,
    last_probe: Instant,
    /// The server's largest message (1 MiB until it says).
    max_payload: usize,
    connecting: Receiver<nats::Connection>,
    connected: Arc<AtomicBool>,
    backlog: VecDeque<Encoded>,
    backlog_bytes: usize,
    metrics: Arc<Metrics>,
}

/// Starts a connector for `config`, whose callbacks keep `metrics` true.
fn dial(config: &NatsConfig, metrics: &Arc<Metrics>) -> Connecting {
    let (m_down, m_up) = (metrics.clone(), metrics.clone());
    nats_connect::start(Dial {
        thread: "nats-connect",
        client: "beep-sfu",
        url: config.url.clone(),
        auth: config.auth.clone(),
        reconnect_buffer: None,
        on_down: move || {
            m_down.nats_connected.set(0);
            warn!("NATS connection lost; keeping bites in the backlog until it is back");
        },
        on_up: move || {
            m_up.nats_connected.set(1);
            info!("NATS reconnected");
        },
    })
}

impl NatsPublisher {
    /// Starts connecting in the background; returns at once.
    pub fn start(config: NatsConfig, metrics: Arc<Metrics>) -> Self {
        let Connecting {
            conn: rx,
            connected,
        } = dial(&config, &metrics);
        info!(
            "publishing bites to NATS {} (subjects {}, {})",
            config.url, config.bite_subject, config.store_subject
        );
        let mut publisher = NatsPublisher {
            config,
            conn: None,
            worker: None,
            in_flight: None,
            missed: 0,
            last_probe: Instant::now(),
            max_payload: 1 << 20,
            connecting: rx,
            connected,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            metrics,
        };
        publisher.load_spool();
        publisher
    }

    /// True while the client has a live connection.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some() && self.connected.load(Ordering::SeqCst)
    }

    /// Bites waiting to be published (the one in flight included).
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Publishes as much of the backlog as the connection takes. Each call
    /// goes through the worker thread; the sink waits at most
    /// [`PUBLISH_WAIT`] for it, so a stalled server never holds the sink.
    pub fn pump(&mut self) {
        if self.conn.is_none() && !self.take_connection() {
            return;
        }
        while self.finish_in_flight() && self.send_next() {}
        self.probe_if_idle();
        self.publish_gauges();
    }

    /// Takes the connection once the connector made it; false if not yet.
    fn take_connection(&mut self) -> bool {
        match self.connecting.try_recv() {
            Ok(c) => {
                info!("NATS connected to {}", self.config.url);
                self.connected.store(true, Ordering::SeqCst);
                self.metrics.nats_connected.set(1);
                self.worker = Worker::start(&c, self.config.jetstream);
                self.in_flight = None;
                self.missed = 0;
                self.max_payload = c.max_payload();
                self.conn = Some(c);
                true
            }
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => false,
        }
    }

    /// Waits (bounded) for the call in flight and moves on from its
    /// result. True if the next call may be made.
    fn finish_in_flight(&mut self) -> bool {
        let Some(worker) = &mut self.worker else {
            return false;
        };
        let Some(what) = self.in_flight else {
            return true;
        };
        let Some(result) = worker.result(PUBLISH_WAIT) else {
            if let Some(since) = worker.busy_since {
                if !worker.stall_logged && since.elapsed() >= STALL_WARNING {
                    worker.stall_logged = true;
                    warn!(
                        "a NATS call has not returned for {} s; the server may be stalled. Bites stay in the backlog",
                        since.elapsed().as_secs()
                    );
                }
            }
            return false;
        };
        self.in_flight = None;
        match (what, result) {
            (InFlight::Probe, Ok(())) => {
                self.missed = 0;
                true
            }
            (InFlight::Front(stage), Ok(())) => {
                self.advance(stage);
                true
            }
            (what, Err(e)) => {
                if let Some(front) = self.backlog.front_mut() {
                    // What is not known to have reached the server goes
                    // again: with JetStream, from the first message not
                    // acknowledged; with core NATS, both.
                    front.stage = if front.bite_acked {
                        Stage::Store
                    } else {
                        Stage::Bite
                    };
                }
                let round_trip = matches!(what, InFlight::Probe | InFlight::Front(Stage::Confirm));
                if round_trip {
                    self.missed += 1;
                }
                warn!("NATS did not confirm ({e}); bites stay in the backlog and are sent again");
                if self.missed >= MAX_MISSED {
                    self.redial();
                }
                false
            }
        }
    }

    /// The front bite's `stage` went through.
    fn advance(&mut self, stage: Stage) {
        let jetstream = self.config.jetstream;
        let Some(front) = self.backlog.front_mut() else {
            return;
        };
        match stage {
            Stage::Bite => {
                front.bite_acked = jetstream;
                front.stage = Stage::Store;
                return;
            }
            Stage::Store if !jetstream => {
                front.stage = Stage::Confirm;
                return;
            }
            Stage::Store | Stage::Confirm => {}
        }
        self.missed = 0;
        let Some(done) = self.backlog.pop_front() else {
            return;
        };
        if let Some(path) = &done.spooled {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(
                    "published spooled bite {} but cannot remove it: {e}",
                    path.display()
                );
            }
        }
        self.backlog_bytes -= done.size();
        self.metrics.bites_published.inc();
        self.metrics.bite_bytes_published.inc_by(done.size() as u64);
    }

    /// Hands the front bite's next step to the worker; false if there is
    /// nothing to send or no way to send it.
    fn send_next(&mut self) -> bool {
        if !self.connected.load(Ordering::SeqCst) {
            return false;
        }
        loop {
            let Some(front) = self.backlog.front() else {
                return false;
            };
            if front.store.len() + 16 <= self.max_payload {
                break;
            }
            // Queued before the server said its limit, and too big for it:
            // drop it rather than block every bite behind it.
            let size = front.size();
            self.backlog.pop_front();
            self.backlog_bytes -= size;
            self.metrics.bite_dropped("too_large_for_nats");
            warn!(
                "a bite of {size} bytes queued before connecting is over NATS max_payload {}; dropped",
                self.max_payload
            );
        }
        let (Some(front), Some(worker)) = (self.backlog.front(), &mut self.worker) else {
            return false;
        };
        let job = match front.stage {
            Stage::Bite => Job::Publish(self.config.bite_subject.clone(), front.bite.clone()),
            Stage::Store => Job::Publish(self.config.store_subject.clone(), front.store.clone()),
            Stage::Confirm => Job::Flush(self.config.ping),
        };
        if !worker.send(job) {
            warn!("the NATS publisher thread is gone; bites stay in the backlog");
            return false;
        }
        self.in_flight = Some(InFlight::Front(front.stage));
        true
    }

    /// Proves an idle connection alive every `ping`: the `nats` client
    /// would notice a silent server only after minutes.
    fn probe_if_idle(&mut self) {
        if self.in_flight.is_some()
            || !self.backlog.is_empty()
            || !self.is_connected()
            || self.last_probe.elapsed() < self.config.ping
        {
            return;
        }
        self.last_probe = Instant::now();
        if let Some(w) = &mut self.worker {
            if w.send(Job::Flush(self.config.ping)) {
                self.in_flight = Some(InFlight::Probe);
            }
        }
    }

    /// The server missed [`MAX_MISSED`] round trips: drops the connection
    /// (closed on a thread of its own: closing may block) and dials again.
    fn redial(&mut self) {
        warn!(
            "NATS missed {} round trips of {:?}; dropping the connection and dialling again",
            self.missed, self.config.ping
        );
        self.metrics.nats_connected.set(0);
        self.missed = 0;
        self.in_flight = None;
        self.worker = None;
        if let Some(old) = self.conn.take() {
            let _ = thread::Builder::new()
                .name("nats-close".into())
                .spawn(move || old.close());
        }
        let Connecting { conn, connected } = dial(&self.config, &self.metrics);
        self.connecting = conn;
        self.connected = connected;
    }

    /// Makes sure what was published reached the server (bounded wait).
    pub fn flush(&self, timeout: Duration) -> bool {
        match &self.conn {
            Some(c) if self.connected.load(Ordering::SeqCst) => c.flush_timeout(timeout).is_ok(),
            _ => false,
        }
    }

    fn publish_gauges(&self) {
        self.metrics.bite_backlog.set(self.backlog.len() as i64);
        self.metrics
            .bite_backlog_bytes
            .set(self.backlog_bytes as i64);
    }
}

#[cfg(test)]
mod tests;
