//! Many processes, one SFU: the NATS side of a cluster of beep-sfu nodes.
//!
//! The core decides (`sfu/cluster.rs`, `sfu/relay.rs`); this module only
//! moves bytes, on side threads, so the media loop never waits on NATS:
//!
//! - the media loop hands heartbeats, joins and relayed packets to a bounded
//!   queue ([`ClusterPort`]) with `try_send`; what does not fit is counted;
//! - one publisher thread drains it, groups a turn's relayed packets into
//!   one `MediaBatch` per receiving node, publishes, and flushes once per
//!   turn (the `nats` client would otherwise hold writes for up to 5 ms);
//! - the client's subscription handlers decode heartbeats, joins and media
//!   and hand them to the loop through a bounded queue and its waker.
//!
//! Subjects, under `--cluster-subject` (default `beep.sfu`):
//! `<prefix>.heartbeat` and `<prefix>.join` (every node), and
//! `<prefix>.media.<node>` (the packets that node must hear). While NATS is
//! away, media is dropped (counted, never queued: late audio is useless),
//! heartbeats are skipped, and joins wait in a small bounded queue.

// The owner named the synchronous `nats` crate (see sink/nats.rs).
#![allow(deprecated)]

mod publisher;

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{info, warn};
use prost::Message;

use crate::command::LoopHandle;
use crate::metrics::Metrics;
use crate::nats_connect::{self, Connecting, Dial};
use crate::proto::cluster::{Heartbeat, Join, MediaBatch};
use crate::sfu::{ClusterInput, Member, Presence, RelayedPacket};

/// Messages the loop may have waiting for the publisher.
const OUT_QUEUE: usize = 16_384;
/// Decoded messages that may wait for the loop.
const IN_QUEUE: usize = 8_192;

/// Where a node meets the others.
#[derive(Debug, Clone)]
pub(crate) struct ClusterConfig {
    /// The NATS server.
    pub url: String,
    /// This node's id (a NATS subject token).
    pub node: String,
    /// Subject prefix shared by every node of the cluster.
    pub prefix: String,
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

/// The media loop's end: never blocks, counts what it cannot hand over.
pub(crate) struct ClusterPort {
    /// What other nodes said, decoded, for the core.
    pub inputs: Receiver<ClusterInput>,
    out: Sender<Outgoing>,
    metrics: Arc<Metrics>,
}

impl ClusterPort {
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
    inputs: Sender<ClusterInput>,
    out: Receiver<Outgoing>,
    metrics: Arc<Metrics>,
}

/// The queues between the loop and the NATS threads.
pub(crate) fn channels(config: ClusterConfig, metrics: Arc<Metrics>) -> (ClusterPort, ClusterSide) {
    let (in_tx, in_rx) = crossbeam_channel::bounded(IN_QUEUE);
    let (out_tx, out_rx) = crossbeam_channel::bounded(OUT_QUEUE);
    (
        ClusterPort {
            inputs: in_rx,
            out: out_tx,
            metrics: metrics.clone(),
        },
        ClusterSide {
            config,
            inputs: in_tx,
            out: out_rx,
            metrics,
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

/// Subscribes the three subjects; each handler decodes and hands the input
/// to the loop (ignoring this node's own broadcasts).
fn subscribe(
    conn: &nats::Connection,
    side: &ClusterSide,
    handle: &LoopHandle,
) -> std::io::Result<()> {
    let me = side.config.node.clone();
    let hb = handler(side, handle, "heartbeat", move |data| {
        let h = Heartbeat::decode(data).ok()?;
        if h.node == me {
            return Some(None);
        }
        Some(Some(if h.goodbye {
            ClusterInput::Goodbye { node: h.node }
        } else {
            ClusterInput::Heartbeat {
                node: h.node,
                conversations: h.conversations,
                users: h.users,
            }
        }))
    });
    conn.subscribe(&side.config.subject("heartbeat"))?
        .with_handler(hb);
    let me = side.config.node.clone();
    let join = handler(side, handle, "join", move |data| {
        let j = Join::decode(data).ok()?;
        if j.node == me {
            return Some(None);
        }
        Some(j.member.map(ClusterInput::Join))
    });
    conn.subscribe(&side.config.subject("join"))?
        .with_handler(join);
    let media = handler(side, handle, "media", |data| {
        let b = MediaBatch::decode(data).ok()?;
        Some(Some(ClusterInput::Media {
            node: b.node,
            packets: b.packets,
        }))
    });
    conn.subscribe(&side.config.media_subject(&side.config.node))?
        .with_handler(media);
    Ok(())
}

/// A subscription handler: `decode` gives `None` for a malformed message,
/// `Some(None)` for one to ignore, `Some(Some(input))` for the loop.
fn handler(
    side: &ClusterSide,
    handle: &LoopHandle,
    kind: &'static str,
    decode: impl Fn(&[u8]) -> Option<Option<ClusterInput>> + Send + 'static,
) -> impl Fn(nats::Message) -> std::io::Result<()> + Send + 'static {
    let (tx, metrics, handle) = (side.inputs.clone(), side.metrics.clone(), handle.clone());
    move |msg| {
        match decode(&msg.data) {
            None => {
                metrics.cluster_drop(kind, "malformed");
                warn!(
                    "cluster: dropped a malformed {kind} message on {}",
                    msg.subject
                );
            }
            Some(None) => {}
            Some(Some(input)) => match tx.try_send(input) {
                Ok(()) => handle.wake(),
                Err(_) => metrics.cluster_drop(kind, "input_queue_full"),
            },
        }
        Ok(())
    }
}

/// A node id is one NATS subject token: letters, digits, `-` and `_`.
pub(crate) fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The default node id: the host name and the process id.
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
    format!("{host}-{}", std::process::id())
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
