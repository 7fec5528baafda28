//! What arrives from other nodes, on the NATS client's handler threads:
//! authenticated and decrypted first (`seal.rs`), then decoded and checked
//! (`validate.rs`), then queued for the media loop within a byte budget.
//! Everything refused is counted by kind and reason and logged at most once
//! per interval, never per message.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, warn};

use super::seal::{Kind, Opener};
use super::validate;
use super::{ClusterSide, Inbound, IN_QUEUE_BYTES};
use crate::command::LoopHandle;
use crate::log_limit::LogLimit;

/// Largest message read at all: a little over NATS's default 1 MB
/// `max_payload` (a server configured larger gains nothing: what a node
/// sends is kept under 1 MiB).
pub(super) const MAX_MESSAGE: usize = (1 << 20) + 1024;
/// How often a refused-message warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

static REFUSED: LogLimit = LogLimit::new(WARN_EVERY);
static DUPLICATE: LogLimit = LogLimit::new(WARN_EVERY);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::Heartbeat => "heartbeat",
        Kind::Join => "join",
        Kind::Media => "media",
    }
}

/// Subscribes the three subjects; each handler opens, checks and hands
/// the input to the loop, ignoring this node's own broadcasts.
pub(super) fn subscribe(
    conn: &nats::Connection,
    side: &ClusterSide,
    handle: &LoopHandle,
) -> std::io::Result<()> {
    let opener = Arc::new(Mutex::new(Opener::new(side.config.keys.clone())));
    let subjects = [
        (side.config.subject("heartbeat"), Kind::Heartbeat),
        (side.config.subject("join"), Kind::Join),
        (side.config.media_subject(&side.config.node), Kind::Media),
    ];
    for (subject, kind) in subjects {
        let door = Door {
            kind,
            me: side.config.node.clone(),
            instance: side.instance,
            opener: opener.clone(),
            side: SideRefs {
                inputs: side.inputs.clone(),
                metrics: side.metrics.clone(),
                shared: side.shared.clone(),
            },
            handle: handle.clone(),
        };
        conn.subscribe(&subject)?.with_handler(move |msg| {
            door.receive(&msg.subject, &msg.data);
            Ok(())
        });
    }
    Ok(())
}

struct SideRefs {
    inputs: crossbeam_channel::Sender<Inbound>,
    metrics: Arc<crate::metrics::Metrics>,
    shared: Arc<super::Shared>,
}

/// One subscription's handler state.
struct Door {
    kind: Kind,
    me: String,
    instance: u64,
    opener: Arc<Mutex<Opener>>,
    side: SideRefs,
    handle: LoopHandle,
}

impl Door {
    fn refuse(&self, reason: &'static str, subject: &str) {
        let kind = label(self.kind);
        self.side.metrics.cluster_drop(kind, reason);
        REFUSED.log(Instant::now(), |more| {
            warn!("cluster: refused a {kind} message on {subject}: {reason} ({more} more refused in the last {WARN_EVERY:?}, see beep_sfu_cluster_dropped_total)")
        });
    }

    fn receive(&self, subject: &str, data: &[u8]) {
        if data.len() > MAX_MESSAGE {
            return self.refuse("too_large", subject);
        }
        let shared = &self.side.shared;
        if shared.duplicate.load(Ordering::Relaxed) {
            return self
                .side
                .metrics
                .cluster_drop(label(self.kind), "duplicate_node_id");
        }
        let now_ms = unix_ms();
        let opened = match self.opener.lock() {
            Ok(mut o) => o.open(data, subject, now_ms, Instant::now()),
            Err(_) => return self.refuse("internal", subject),
        };
        let opened = match opened {
            Ok(o) => o,
            Err(r) => return self.refuse(r.label(), subject),
        };
        if opened.kind != self.kind {
            return self.refuse("wrong_subject", subject);
        }
        if opened.node == self.me {
            if opened.instance != self.instance {
                self.duplicate_found();
            }
            return; // this node's own broadcast
        }
        let checked = match validate::check(self.kind, &opened.node, &opened.body) {
            Ok(c) => c,
            Err(e) => return self.refuse(e.label(), subject),
        };
        let queued = shared
            .queued_bytes
            .fetch_add(checked.cost, Ordering::Relaxed);
        if queued + checked.cost > IN_QUEUE_BYTES {
            shared
                .queued_bytes
                .fetch_sub(checked.cost, Ordering::Relaxed);
            return self.refuse("input_queue_full", subject);
        }
        let inbound = Inbound {
            input: checked.input,
            cost: checked.cost,
        };
        match self.side.inputs.try_send(inbound) {
            Ok(()) => self.handle.wake(),
            Err(_) => {
                shared
                    .queued_bytes
                    .fetch_sub(checked.cost, Ordering::Relaxed);
                self.refuse("input_queue_full", subject);
            }
        }
    }

    /// Another process seals with this node's id: both would ignore each
    /// other's messages and split the cluster silently, so this node stays
    /// out of the cluster from now on and says so.
    fn duplicate_found(&self) {
        self.side.shared.duplicate.store(true, Ordering::Relaxed);
        self.side.metrics.cluster_duplicate_node_id.set(1);
        DUPLICATE.log(Instant::now(), |_| {
            error!(
                "cluster: another process uses node id {:?}; this node leaves the cluster (local calls go on). Give every process its own --node-id and restart",
                self.me
            )
        });
    }
}
