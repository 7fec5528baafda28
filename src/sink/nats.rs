//! Publishes bites to NATS: `Bite` on the bite subject and
//! `Store{type:"bite", bite}` on the store subject.
//!
//! Uses the synchronous `nats` crate the owner named. It can reconnect
//! forever and buffer while reconnecting, but its first `connect` blocks
//! until a server answers, so it runs on a connector thread of its own.
//! The publisher keeps its own bounded backlog (in bytes), publishes from it
//! only while connected (tracked through the client's disconnect and
//! reconnect callbacks), and removes a bite only once both messages were
//! handed to the client. What overflows the backlog is dropped oldest-first,
//! counted and logged.

// The owner named the synchronous `nats` crate; upstream deprecated it in
// favour of async-nats, but it meets the outage behaviour we need (see the
// README), so the deprecation warnings are silenced here on purpose.
#![allow(deprecated)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use log::{debug, info, warn};
use prost::Message;

use crate::metrics::Metrics;
use crate::nats_connect::{self, Connecting, Dial, NatsAuth};
use crate::proto::{Bite, Client, Store};
use crate::sfu::FinishedBite;

/// Longest the sink waits for one publish before it gets on with its work
/// (the publish stays in flight and is checked again on the next pump).
const PUBLISH_WAIT: Duration = Duration::from_millis(500);
/// After this long in flight, a publish is reported as stalled (once).
const STALL_WARNING: Duration = Duration::from_secs(5);

/// The thread that calls the blocking `publish` (or JetStream's, which
/// waits for the server's acknowledgement), one message at a time.
struct Worker {
    jobs: Sender<(String, Vec<u8>)>,
    done: Receiver<std::io::Result<()>>,
    busy_since: Option<Instant>,
    stall_logged: bool,
}

impl Worker {
    fn start(conn: &nats::Connection, jetstream: bool) -> Option<Worker> {
        let (jobs, job_rx) = crossbeam_channel::bounded::<(String, Vec<u8>)>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let conn = conn.clone();
        let spawned = thread::Builder::new()
            .name("nats-publish".into())
            .spawn(move || {
                let js = jetstream.then(|| nats::jetstream::new(conn.clone()));
                for (subject, data) in job_rx {
                    let res = match &js {
                        Some(js) => js.publish(&subject, &data).map(|_ack| ()).map_err(|e| {
                            std::io::Error::other(format!(
                                "JetStream did not acknowledge on {subject} ({e}); is there a stream on it?"
                            ))
                        }),
                        None => conn.publish(&subject, &data),
                    };
                    if done_tx.send(res).is_err() {
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Worker {
                jobs,
                done,
                busy_since: None,
                stall_logged: false,
            }),
            Err(e) => {
                warn!("cannot start the NATS publisher thread: {e}");
                None
            }
        }
    }
}

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
}

/// The two encoded messages of one bite.
struct Encoded {
    bite: Vec<u8>,
    store: Vec<u8>,
    /// The `bite` message already went out (only `store` is left).
    bite_sent: bool,
    /// The spool file it was read from, removed once it is published.
    spooled: Option<PathBuf>,
}

impl Encoded {
    fn size(&self) -> usize {
        self.bite.len() + self.store.len()
    }
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
    /// The server's largest message (1 MiB until it says).
    max_payload: usize,
    connecting: Receiver<nats::Connection>,
    connected: Arc<AtomicBool>,
    backlog: VecDeque<Encoded>,
    backlog_bytes: usize,
    metrics: Arc<Metrics>,
}

impl NatsPublisher {
    /// Starts connecting in the background; returns at once.
    pub fn start(config: NatsConfig, metrics: Arc<Metrics>) -> Self {
        let (m_down, m_up) = (metrics.clone(), metrics.clone());
        let Connecting {
            conn: rx,
            connected,
        } = nats_connect::start(Dial {
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
        });
        info!(
            "publishing bites to NATS {} (subjects {}, {})",
            config.url, config.bite_subject, config.store_subject
        );
        let mut publisher = NatsPublisher {
            config,
            conn: None,
            worker: None,
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

    /// Bites waiting to be published.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Queues a bite, dropping the oldest ones if the backlog is over its bound.
    /// A bite whose message would exceed the server's `max_payload` is
    /// split in two (recursively) rather than refused by the server.
    pub fn enqueue(&mut self, b: &FinishedBite, ogg: &[u8]) {
        let bite = to_proto(b, ogg);
        // The Store message carries the whole Bite, so it is the larger.
        let size = bite.encoded_len() + 16;
        if size > self.max_payload {
            match super::bite_file::split(b) {
                Some((x, y)) => {
                    debug!(
                        "bite of {} bytes is over NATS max_payload {}: split",
                        size, self.max_payload
                    );
                    self.metrics.bites_split.inc();
                    self.enqueue(&x, &super::bite_file::to_ogg(&x.audio));
                    self.enqueue(&y, &super::bite_file::to_ogg(&y.audio));
                }
                None => {
                    self.metrics.bite_dropped("too_large_for_nats");
                    warn!(
                        "a one-packet bite of {size} bytes is over NATS max_payload {}; dropped",
                        self.max_payload
                    );
                }
            }
            return;
        }
        let store = Store {
            r#type: "bite".into(),
            bite: Some(bite.clone()),
        };
        let e = Encoded {
            bite: bite.encode_to_vec(),
            store: store.encode_to_vec(),
            bite_sent: false,
            spooled: None,
        };
        self.push(e);
    }

    fn push(&mut self, e: Encoded) {
        self.backlog_bytes += e.size();
        self.backlog.push_back(e);
        while self.backlog_bytes > self.config.backlog_bytes && self.backlog.len() > 1 {
            if let Some(old) = self.backlog.pop_front() {
                self.backlog_bytes -= old.size();
                self.metrics.bite_dropped("nats_backlog_full");
                warn!(
                    "NATS backlog over {} bytes: dropped the oldest bite ({} bytes)",
                    self.config.backlog_bytes,
                    old.size()
                );
            }
        }
        self.publish_gauges();
    }

    /// Publishes as much of the backlog as the connection takes. Each
    /// message goes through the publisher thread; the sink waits at most
    /// [`PUBLISH_WAIT`] for it, so a stalled server never holds the sink.
    pub fn pump(&mut self) {
        if self.conn.is_none() && !self.take_connection() {
            return;
        }
        while self.finish_in_flight() && self.send_next() {}
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
                self.max_payload = c.max_payload();
                self.conn = Some(c);
                true
            }
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => false,
        }
    }

    /// Waits (bounded) for the message in flight; when it went out, moves
    /// the backlog on. True if the next message may be sent.
    fn finish_in_flight(&mut self) -> bool {
        let Some(worker) = &mut self.worker else {
            return false;
        };
        let Some(since) = worker.busy_since else {
            return true;
        };
        match worker.done.recv_timeout(PUBLISH_WAIT) {
            Ok(Ok(())) => {
                worker.busy_since = None;
                worker.stall_logged = false;
            }
            Ok(Err(e)) => {
                worker.busy_since = None;
                warn!("NATS publish failed: {e}; will retry");
                return false;
            }
            Err(_) => {
                if !worker.stall_logged && since.elapsed() >= STALL_WARNING {
                    worker.stall_logged = true;
                    warn!(
                        "a NATS publish has not returned for {} s; the server may be stalled. Bites stay in the backlog",
                        since.elapsed().as_secs()
                    );
                }
                return false;
            }
        }
        let Some(front) = self.backlog.front_mut() else {
            return true;
        };
        if !front.bite_sent {
            front.bite_sent = true;
            return true;
        }
        let size = front.size();
        if let Some(done) = self.backlog.pop_front().and_then(|e| e.spooled) {
            if let Err(e) = std::fs::remove_file(&done) {
                warn!(
                    "published spooled bite {} but cannot remove it: {e}",
                    done.display()
                );
            }
        }
        self.backlog_bytes -= size;
        self.metrics.bites_published.inc();
        self.metrics.bite_bytes_published.inc_by(size as u64);
        true
    }

    /// Hands the front message to the publisher thread; false if there is
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
        let job = if front.bite_sent {
            (self.config.store_subject.clone(), front.store.clone())
        } else {
            (self.config.bite_subject.clone(), front.bite.clone())
        };
        if worker.jobs.send(job).is_err() {
            warn!("the NATS publisher thread is gone; bites stay in the backlog");
            return false;
        }
        worker.busy_since = Some(Instant::now());
        true
    }

    /// Makes sure what was published reached the server (bounded wait).
    pub fn flush(&self, timeout: Duration) -> bool {
        match &self.conn {
            Some(c) if self.connected.load(Ordering::SeqCst) => c.flush_timeout(timeout).is_ok(),
            _ => false,
        }
    }

    /// Writes what is still in the backlog to the spool directory (one file
    /// per bite, the `Bite` message; `.store` if only the `Store` message is
    /// left to send). Returns how many bites were spooled; the rest are lost
    /// and counted.
    pub fn spool(&mut self) -> usize {
        let Some(dir) = self.config.spool_dir.clone() else {
            return 0;
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!("cannot create the spool directory {}: {e}", dir.display());
            return 0;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut written = 0;
        while let Some(e) = self.backlog.pop_front() {
            self.backlog_bytes -= e.size();
            if e.spooled.is_some() {
                written += 1; // still on disk from the last run
                continue;
            }
            let ext = if e.bite_sent { "store" } else { "bite" };
            let path = dir.join(format!("{stamp}-{written:06}.{ext}"));
            let tmp = path.with_extension("part");
            match std::fs::write(&tmp, &e.bite).and_then(|_| std::fs::rename(&tmp, &path)) {
                Ok(()) => written += 1,
                Err(err) => {
                    self.metrics.bite_dropped("spool_write_error");
                    warn!("cannot spool a bite to {}: {err}", path.display());
                }
            }
        }
        self.publish_gauges();
        written
    }

    /// Puts the bites spooled by an earlier run at the front of the backlog.
    fn load_spool(&mut self) {
        let Some(dir) = self.config.spool_dir.clone() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("bite" | "store")
                )
            })
            .collect();
        files.sort();
        for path in files {
            let bite_sent = path.extension().is_some_and(|x| x == "store");
            let decoded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| Bite::decode(b.as_slice()).map_err(|e| e.to_string()));
            match decoded {
                Ok(bite) => {
                    let store = Store {
                        r#type: "bite".into(),
                        bite: Some(bite.clone()),
                    };
                    self.push(Encoded {
                        bite: bite.encode_to_vec(),
                        store: store.encode_to_vec(),
                        bite_sent,
                        spooled: Some(path),
                    });
                }
                Err(e) => warn!("skipping unreadable spool file {}: {e}", path.display()),
            }
        }
        if !self.backlog.is_empty() {
            info!(
                "{} spooled bite(s) from an earlier run will be published",
                self.backlog.len()
            );
        }
    }

    fn publish_gauges(&self) {
        self.metrics.bite_backlog.set(self.backlog.len() as i64);
        self.metrics
            .bite_backlog_bytes
            .set(self.backlog_bytes as i64);
    }
}
