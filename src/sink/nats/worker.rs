//! The thread that makes the blocking NATS calls for the sink, one at a
//! time: a publish (JetStream's waits for the server's acknowledgement), or
//! a flush, the round trip that proves the server has everything published
//! before it. The sink thread waits for it only a bounded time.

#![allow(deprecated)] // the synchronous `nats` crate the owner named

use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::warn;

/// One blocking call.
pub(super) enum Job {
    /// Publish `data` on `subject`.
    Publish(String, Vec<u8>),
    /// Wait for the server's answer to a PING, at most this long.
    Flush(Duration),
}

/// The worker's queue ends and what is in flight.
pub(super) struct Worker {
    jobs: Sender<Job>,
    done: Receiver<std::io::Result<()>>,
    /// When the job in flight was handed over.
    pub busy_since: Option<Instant>,
    /// A stall was already reported for the job in flight.
    pub stall_logged: bool,
}

impl Worker {
    /// Starts the thread on `conn`; `None` if it cannot start.
    pub fn start(conn: &nats::Connection, jetstream: bool) -> Option<Worker> {
        let (jobs, job_rx) = crossbeam_channel::bounded::<Job>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let conn = conn.clone();
        let spawned = thread::Builder::new()
            .name("nats-publish".into())
            .spawn(move || {
                let js = jetstream.then(|| nats::jetstream::new(conn.clone()));
                for job in job_rx {
                    let res = match job {
                        Job::Publish(subject, data) => match &js {
                            Some(js) => js.publish(&subject, &data).map(|_ack| ()).map_err(|e| {
                                std::io::Error::other(format!(
                                    "JetStream did not acknowledge on {subject} ({e}); is there a stream on it?"
                                ))
                            }),
                            None => conn.publish(&subject, &data),
                        },
                        Job::Flush(wait) => conn.flush_timeout(wait),
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

    /// Hands a job over; false if the thread is gone.
    pub fn send(&mut self, job: Job) -> bool {
        if self.jobs.send(job).is_err() {
            return false;
        }
        self.busy_since = Some(Instant::now());
        true
    }

    /// The result of the job in flight, waiting at most `wait`: `None` if
    /// it has not finished (or nothing is in flight).
    pub fn result(&mut self, wait: Duration) -> Option<std::io::Result<()>> {
        self.busy_since?;
        let r = self.done.recv_timeout(wait).ok()?;
        self.busy_since = None;
        self.stall_logged = false;
        Some(r)
    }
}
