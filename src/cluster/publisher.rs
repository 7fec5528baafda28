//! The publisher thread: takes what the loop queued, publishes it in turns
//! (one `MediaBatch` per receiving node per turn, one flush per turn), and
//! keeps joins in a small bounded queue while NATS is away.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use prost::Message;

use super::{subscribe, ClusterSide, Outgoing};
use crate::command::LoopHandle;
use crate::proto::cluster::{Heartbeat, Join, MediaBatch, RelayedPacket};
use crate::sfu::{Member, Presence};

/// Messages taken from the queue per turn.
const TURN: usize = 1024;
/// Joins kept while NATS is away (oldest dropped beyond).
const PENDING_JOINS: usize = 1024;
/// Longest a flush may wait for the server's answer.
const FLUSH_WAIT: Duration = Duration::from_millis(500);
/// How long an idle publisher sleeps before looking for the connection.
const IDLE: Duration = Duration::from_millis(100);

struct Publisher {
    side: ClusterSide,
    conn: Option<nats::Connection>,
    connected: Arc<AtomicBool>,
    joins: VecDeque<Member>,
    media: HashMap<Arc<str>, Vec<RelayedPacket>>,
}

/// Runs until the loop says goodbye (or its queue closes).
pub(super) fn run(
    side: ClusterSide,
    conn_rx: Receiver<nats::Connection>,
    connected: Arc<AtomicBool>,
    handle: LoopHandle,
) {
    let mut p = Publisher {
        side,
        conn: None,
        connected,
        joins: VecDeque::new(),
        media: HashMap::new(),
    };
    let mut turn = Vec::with_capacity(TURN);
    loop {
        if p.conn.is_none() {
            if let Ok(c) = conn_rx.try_recv() {
                p.take_connection(c, &handle);
            }
        }
        match p.side.out.recv_timeout(IDLE) {
            Ok(first) => turn.push(first),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while turn.len() < TURN {
            match p.side.out.try_recv() {
                Ok(m) => turn.push(m),
                Err(_) => break,
            }
        }
        let mut goodbye = false;
        for m in turn.drain(..) {
            match m {
                Outgoing::Goodbye => goodbye = true,
                m => p.take(m),
            }
        }
        p.publish_turn(goodbye);
        if goodbye {
            info!("cluster: said goodbye");
            return;
        }
    }
}

impl Publisher {
    fn up(&self) -> bool {
        self.conn.is_some() && self.connected.load(Ordering::SeqCst)
    }

    fn take_connection(&mut self, conn: nats::Connection, handle: &LoopHandle) {
        match subscribe(&conn, &self.side, handle) {
            Ok(()) => {
                info!(
                    "cluster: node {} connected to NATS at {}",
                    self.side.config.node, self.side.config.url
                );
                self.connected.store(true, Ordering::SeqCst);
                self.side.metrics.cluster_connected.set(1);
                self.conn = Some(conn);
            }
            Err(e) => warn!("cluster: cannot subscribe: {e}; this node stays alone"),
        }
    }

    /// Sorts one message into this turn's work.
    fn take(&mut self, m: Outgoing) {
        let up = self.up();
        match m {
            Outgoing::Relay(to, packet) if up => {
                if let Some((last, rest)) = to.split_last() {
                    for node in rest {
                        self.media
                            .entry(node.clone())
                            .or_default()
                            .push(packet.clone());
                    }
                    self.media.entry(last.clone()).or_default().push(packet);
                }
            }
            Outgoing::Relay(..) => self.side.metrics.cluster_drop("media", "disconnected"),
            Outgoing::Join(m) => {
                if self.joins.len() >= PENDING_JOINS {
                    self.joins.pop_front();
                    self.side.metrics.cluster_drop("join", "queue_full");
                }
                self.joins.push_back(m);
            }
            Outgoing::Heartbeat(p) if up => self.publish_heartbeat(p, false),
            Outgoing::Heartbeat(_) => self.side.metrics.cluster_drop("heartbeat", "disconnected"),
            Outgoing::Goodbye => {}
        }
    }

    /// Publishes what this turn gathered, then flushes once.
    fn publish_turn(&mut self, goodbye: bool) {
        if !self.up() {
            return;
        }
        let Some(conn) = self.conn.clone() else {
            return;
        };
        let node = self.side.config.node.clone();
        while let Some(m) = self.joins.pop_front() {
            let msg = Join {
                node: node.clone(),
                member: Some(m),
            };
            if let Err(e) = conn.publish(&self.side.config.subject("join"), msg.encode_to_vec()) {
                warn!("cluster: publishing a join failed: {e}");
                self.side.metrics.cluster_drop("join", "publish_error");
            }
        }
        for (to, packets) in self.media.drain() {
            let batch = MediaBatch {
                node: node.clone(),
                packets,
            };
            if let Err(e) =
                conn.publish(&self.side.config.media_subject(&to), batch.encode_to_vec())
            {
                debug!("cluster: publishing media to {to} failed: {e}");
                self.side.metrics.cluster_drop("media", "publish_error");
            }
        }
        if goodbye {
            self.publish_heartbeat(Presence::default(), true);
        }
        if let Err(e) = conn.flush_timeout(FLUSH_WAIT) {
            debug!("cluster: flush: {e}");
        }
    }

    fn publish_heartbeat(&mut self, p: Presence, goodbye: bool) {
        let Some(conn) = &self.conn else { return };
        let msg = Heartbeat {
            node: self.side.config.node.clone(),
            conversations: p.conversations,
            users: p.users,
            goodbye,
        };
        if let Err(e) = conn.publish(&self.side.config.subject("heartbeat"), msg.encode_to_vec()) {
            debug!("cluster: publishing the heartbeat failed: {e}");
            self.side.metrics.cluster_drop("heartbeat", "publish_error");
        }
    }
}
