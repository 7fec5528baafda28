//! Many processes, one SFU: the NATS side of a cluster of beep-sfu nodes.
//!
//! The core decides (`sfu/nodes.rs`, `sfu/relay.rs`); this module only
//! moves bytes, on side threads, so the media loop never waits on NATS:
//!
//! - the media loop hands heartbeats, joins and relayed packets to a bounded
//!   queue ([`ClusterPort`]) with `try_send`; what does not fit is counted;
//! - one publisher thread drains it, groups a turn's relayed packets into
//!   `MediaBatch`es per receiving node, seals every message (`seal.rs`),
//!   splits what would exceed the server's `max_payload`, publishes, and
//!   flushes once per turn;
//! - the client's subscription handlers (`inbound.rs`) authenticate,
//!   decrypt, decode and validate (`validate.rs`) what arrives and hand it
//!   to the loop through a queue bounded in messages and in bytes.
//!
//! Nothing is trusted: a message that fails authentication is dropped
//! before it is decoded, and one from an authenticated node is still held
//! to the local limits. A node joins a cluster only with a cluster key.
//!
//! Subjects, under `--cluster-subject` (default `beep.sfu`):
//! `<prefix>.heartbeat` and `<prefix>.join` (every node), and
//! `<prefix>.media.<node>` (the packets that node must hear). While NATS is
//! away, media is dropped (counted, never queued: late audio is useless),
//! heartbeats are skipped, and joins wait in a small bounded queue.

// The owner named the synchronous `nats` crate (see sink/nats.rs).
#![allow(deprecated)]

mod inbound;
mod open;
mod publisher;
pub(crate) mod seal;
pub(crate) mod validate;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{info, warn};

use crate::command::LoopHandle;
use crate::metrics::Metrics;
use crate::nats_connect::{self, Connecting, Dial, NatsAuth};
use crate::sfu::{ClusterInput, Member, Presence, RelayedPacket};
use seal::ClusterKey;

/// Messages the loop may have waiting for the publisher.
const OUT_QUEUE: usize = 16_384;
/// Decoded messages that may wait for the loop.
const IN_QUEUE: usize = 8_192;
/// Bytes (approximate heap of decoded messages) that may wait for the loop.
const IN_QUEUE_BYTES: usize = 8 << 20;

/// Where a node meets the others.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    /// The NATS server.
    pub url: String,
    /// Credentials and TLS trust for it.
    pub auth: NatsAuth,
    /// This node's id (a NATS subject token).
    pub node: String,
    /// Subject prefix shared by every node of the cluster.
    pub prefix: String,
    /// The cluster keys: the first seals, all are accepted (at least one).
    pub keys: Vec<ClusterKey>,
}

impl ClusterConfig {
    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }

    fn media_subject(&self, node: &str) -> String {
        format!("{}.media.{node}", self.prefix)
    }
}

/// What the loop hands the publisher.
enum Outgoing {
    Heartbeat(Presence),
    Join(Member),
    Relay(Arc<[Arc<str>]>, RelayedPacket),
    Goodbye,
}

/// One checked input waiting for the loop, with its cost in bytes.
struct Inbound {
    input: ClusterInput,
    cost: usize,
}

/// State both ends share: bytes waiting for the loop, and whether another
/// process uses this node's id.
#[derive(Default)]
struct Shared {
    queued_bytes: AtomicUsize,
    duplicate: AtomicBool,
}

/// The media loop's end: never blocks, counts what it cannot hand over.
pub(crate) struct ClusterPort {
    inputs: Receiver<Inbound>,
    out: Sender<Outgoing>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
}

impl ClusterPort {
    /// The next thing other nodes said, with its cost in bytes (for the
    /// loop's per-turn budget), if any waits.
    pub fn take(&self) -> Option<(ClusterInput, usize)> {
        let Inbound { input, cost } = self.inputs.try_recv().ok()?;
        self.shared.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
        Some((input, cost))
    }

    /// True if more inputs wait.
    pub fn has_more(&self) -> bool {
        !self.inputs.is_empty()
    }

    /// Relays a local speaker's packet to the nodes in `to`.
    pub fn relay(&self, to: Arc<[Arc<str>]>, packet: RelayedPacket) {
        self.offer(Outgoing::Relay(to, packet), "media");
    }

    /// Tells every node about a join accepted here.
    pub fn joined(&self, m: Member) {
        self.offer(Outgoing::Join(m), "join");
    }

    /// This node's heartbeat.
    pub fn heartbeat(&self, p: Presence) {
        self.offer(Outgoing::Heartbeat(p), "heartbeat");
    }

    /// Says goodbye (the node is stopping), so others drop it at once.
    pub fn goodbye(&self) {
        self.offer(Outgoing::Goodbye, "heartbeat");
    }

    fn offer(&self, msg: Outgoing, kind: &'static str) {
        if self.shared.duplicate.load(Ordering::Relaxed) {
            self.metrics.cluster_drop(kind, "duplicate_node_id");
            return;
        }
        match self.out.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.cluster_drop(kind, "queue_full"),
            Err(TrySendError::Disconnected(_)) => self.metrics.cluster_drop(kind, "stopped"),
        }
    }
}

/// The side threads' ends of the queues, until [`ClusterSide::start`].
pub(crate) struct ClusterSide {
    config: ClusterConfig,
    /// This process's boot of the node: random, so a second process with
    /// the same node id is told apart.
    instance: u64,
    inputs: Sender<Inbound>,
    out: Receiver<Outgoing>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
}

/// The queues between the loop and the NATS threads.
pub(crate) fn channels(config: ClusterConfig, metrics: Arc<Metrics>) -> (ClusterPort, ClusterSide) {
    let (in_tx, in_rx) = crossbeam_channel::bounded(IN_QUEUE);
    let (out_tx, out_rx) = crossbeam_channel::bounded(OUT_QUEUE);
    let shared = Arc::new(Shared::default());
    (
        ClusterPort {
            inputs: in_rx,
            out: out_tx,
            metrics: metrics.clone(),
            shared: shared.clone(),
        },
        ClusterSide {
            config,
            instance: rand::random(),
            inputs: in_tx,
            out: out_rx,
            metrics,
            shared,
        },
    )
}

impl ClusterSide {
    /// Starts connecting (in the background: NATS's connect blocks) and
    /// the publisher thread; `handle` wakes the loop when input arrives.
    /// The returned thread ends after the goodbye is sent.
    pub fn start(self, handle: LoopHandle) -> std::io::Result<JoinHandle<()>> {
        let (m_down, m_up) = (self.metrics.clone(), self.metrics.clone());
        let Connecting {
            conn: conn_rx,
            connected,
        } = nats_connect::start(Dial {
            thread: "cluster-connect",
            client: "beep-sfu cluster",
            url: self.config.url.clone(),
            auth: self.config.auth.clone(),
            // Media is never worth buffering across an outage; joins wait
            // in the publisher's own queue.
            reconnect_buffer: Some(1 << 20),
            on_down: move || {
                m_down.cluster_connected.set(0);
                warn!("cluster: NATS connection lost; local calls go on, cross-node audio stops until it is back");
            },
            on_up: move || {
                m_up.cluster_connected.set(1);
                info!("cluster: NATS reconnected; cross-node audio resumes");
            },
        });
        let side = self;
        thread::Builder::new()
            .name("cluster-publish".into())
            .spawn(move || publisher::run(side, conn_rx, connected, handle))
    }
}

/// Longest node id.
pub(crate) const MAX_NODE_ID: usize = 64;

/// A node id is one NATS subject token: letters, digits, `-` and `_`.
pub(crate) fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The default node id: the host name, the process id, and a random
/// suffix (in containers the pid is often 1 on every replica).
pub(crate) fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let host: String = host.chars().take(MAX_NODE_ID - 20).collect();
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_single_subject_tokens() {
        assert!(valid_node_id("sfu-1_a"));
        for bad in ["", "a.b", "a*", ">", "a b", "a/b"] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
        assert!(valid_node_id(&default_node_id()));
    }
}
