//! The publisher thread: takes what the loop queued, publishes it in turns
//! (`MediaBatch`es per receiving node per turn, one flush per turn), seals
//! every message, keeps every message under the server's `max_payload`
//! (splitting heartbeats and batches), and keeps joins in a small bounded
//! queue while NATS is away.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};
use prost::Message;

use super::inbound::{subscribe, MAX_MESSAGE};
use super::seal::{Kind, Sealer};
use super::validate::{MAX_BATCH_PACKETS, MAX_HEARTBEAT_ITEMS};
use super::{ClusterSide, Outgoing};
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
    sealer: Sealer,
    /// Most body bytes one message may carry (the server's `max_payload`
    /// less the envelope), learnt when the connection arrives.
    max_body: usize,
    conn: Option<nats::Connection>,
    connected: Arc<AtomicBool>,
    joins: VecDeque<Member>,
    /// True once this node left the cluster over a duplicate node id.
    left: bool,
    media: HashMap<Arc<str>, Vec<RelayedPacket>>,
}

/// Runs until the loop says goodbye (or its queue closes).
pub(super) fn run(
    side: ClusterSide,
    conn_rx: Receiver<nats::Connection>,
    connected: Arc<AtomicBool>,
    handle: LoopHandle,
) {
    let sealer = match side.config.keys.first() {
        Some(k) => Sealer::new(k, &side.config.node, side.instance),
        None => {
            warn!("cluster: no cluster key; this node stays alone");
            return;
        }
    };
    let max_body = MAX_MESSAGE - 1024 - sealer.overhead();
    let mut p = Publisher {
        side,
        sealer,
        max_body,
        conn: None,
        connected,
        joins: VecDeque::new(),
        left: false,
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
        p.leave_if_duplicate();
        if goodbye {
            info!("cluster: said goodbye");
            return;
        }
    }
}

impl Publisher {
    fn up(&self) -> bool {
        self.conn.is_some()
            && self.connected.load(Ordering::SeqCst)
            && !self.side.shared.duplicate.load(Ordering::Relaxed)
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
                let server = conn.max_payload().min(MAX_MESSAGE - 1024);
                self.max_body = server.saturating_sub(self.sealer.overhead() + 64).max(1024);
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
        while let Some(m) = self.joins.pop_front() {
            let msg = Join { member: Some(m) };
            let subject = self.side.config.subject("join");
            self.publish(&conn, Kind::Join, &subject, &msg.encode_to_vec());
        }
        let max_body = self.max_body;
        for (to, packets) in std::mem::take(&mut self.media) {
            let subject = self.side.config.media_subject(&to);
            for packets in split(packets, max_body, MAX_BATCH_PACKETS, |p| p.encoded_len()) {
                let batch = MediaBatch { packets };
                self.publish(&conn, Kind::Media, &subject, &batch.encode_to_vec());
            }
        }
        if goodbye {
            self.publish_heartbeat(Presence::default(), true);
        }
        if let Err(e) = conn.flush_timeout(FLUSH_WAIT) {
            debug!("cluster: flush: {e}");
        }
    }

    /// Another process uses this node's id: say goodbye once, so every
    /// node drops the id (and the other process, hearing its own id from
    /// another boot, detects the duplicate too), then publish nothing more.
    fn leave_if_duplicate(&mut self) {
        if self.left || !self.side.shared.duplicate.load(Ordering::Relaxed) {
            return;
        }
        self.left = true;
        self.joins.clear();
        self.media.clear();
        if let Some(conn) = self.conn.clone() {
            let subject = self.side.config.subject("heartbeat");
            let msg = Heartbeat {
                goodbye: true,
                ..Default::default()
            };
            self.publish(&conn, Kind::Heartbeat, &subject, &msg.encode_to_vec());
            if let Err(e) = conn.flush_timeout(FLUSH_WAIT) {
                debug!("cluster: flush: {e}");
            }
        }
    }

    /// Seals and publishes one message, counting a failure.
    fn publish(&mut self, conn: &nats::Connection, kind: Kind, subject: &str, body: &[u8]) {
        let sent_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let sealed = self.sealer.seal(kind, subject, sent_ms, body);
        if let Err(e) = conn.publish(subject, sealed) {
            let label = match kind {
                Kind::Heartbeat => "heartbeat",
                Kind::Join => "join",
                Kind::Media => "media",
            };
            debug!("cluster: publishing a {label} on {subject} failed: {e}");
            self.side.metrics.cluster_drop(label, "publish_error");
        }
    }

    /// This node's heartbeat, in as many parts as `max_payload` needs.
    fn publish_heartbeat(&mut self, p: Presence, goodbye: bool) {
        let Some(conn) = self.conn.clone() else {
            return;
        };
        let subject = self.side.config.subject("heartbeat");
        if goodbye {
            let msg = Heartbeat {
                goodbye: true,
                ..Default::default()
            };
            return self.publish(&conn, Kind::Heartbeat, &subject, &msg.encode_to_vec());
        }
        for part in heartbeat_parts(p, self.max_body) {
            self.publish(&conn, Kind::Heartbeat, &subject, &part.encode_to_vec());
        }
    }
}

/// A heartbeat in as many parts as it takes for each to encode under
/// `max_body` bytes: conversations and users each fill up to half a part.
/// One part (`continued` and `more` both false) when it fits.
fn heartbeat_parts(p: Presence, max_body: usize) -> Vec<Heartbeat> {
    let half = max_body / 2;
    let convs = split(p.conversations, half, MAX_HEARTBEAT_ITEMS, String::len);
    let users = split(p.users, half, MAX_HEARTBEAT_ITEMS, |m| m.encoded_len());
    let n = convs.len().max(users.len()).max(1);
    let (mut convs, mut users) = (convs.into_iter(), users.into_iter());
    (0..n)
        .map(|i| Heartbeat {
            conversations: convs.next().unwrap_or_default(),
            users: users.next().unwrap_or_default(),
            goodbye: false,
            continued: i > 0,
            more: i + 1 < n,
        })
        .collect()
}

/// Splits `items` into runs whose encoded size (each item's `len` plus its
/// field tag and length prefix) stays under `max_bytes` and whose count
/// stays under `max_items`; at least one item per run.
fn split<T>(
    items: Vec<T>,
    max_bytes: usize,
    max_items: usize,
    len: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut runs = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let n = len(&item) + 6;
        let full = runs.last().is_some_and(|r: &Vec<T>| {
            !r.is_empty() && (bytes + n > max_bytes || r.len() >= max_items)
        });
        if full {
            runs.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        if let Some(r) = runs.last_mut() {
            r.push(item);
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stay_under_both_bounds_and_keep_every_item() {
        let items: Vec<String> = (0..1000).map(|i| format!("conversation-{i}")).collect();
        let runs = split(items.clone(), 1000, 30, String::len);
        assert!(runs.iter().all(|r| r.len() <= 30));
        assert!(runs
            .iter()
            .all(|r| r.iter().map(|s| s.len() + 6).sum::<usize>() <= 1000));
        assert_eq!(runs.concat(), items);
        assert!(split(Vec::<String>::new(), 10, 10, String::len).is_empty());
        let huge = vec!["x".repeat(5000)];
        assert_eq!(
            split(huge, 1000, 10, String::len).len(),
            1,
            "one item per run at least"
        );
    }

    #[test]
    fn a_heartbeat_of_20000_users_fits_a_64_kib_max_payload_in_parts() {
        let users: Vec<Member> = (0..20_000)
            .map(|i| Member {
                userid: format!("{i:08}-7c1e-4b8a-9f3d-2a6e5b1c0d9f"),
                conversation: format!("conversation-{:08}-0000-4000-8000", i / 4),
                stamp: 1_000 + i,
                origin: "node-with-a-long-name-1".into(),
            })
            .collect();
        let conversations: Vec<String> = (0..5_000)
            .map(|i| format!("conversation-{i:08}-0000-4000-8000"))
            .collect();
        let presence = Presence {
            conversations: conversations.clone(),
            users: users.clone(),
        };
        // What a node reads from a server with max_payload 65536, less the
        // envelope of its longest node id (as take_connection computes it).
        let envelope = 30 + 64 + 16 + 8 + 64;
        let parts = heartbeat_parts(presence, 65_536 - envelope);
        assert!(parts.len() > 1);
        for (i, p) in parts.iter().enumerate() {
            assert!(
                p.encoded_len() + envelope <= 65_536,
                "part {i}: {}",
                p.encoded_len()
            );
            assert_eq!((p.continued, p.more), (i > 0, i + 1 < parts.len()));
        }
        let got_users: Vec<Member> = parts.iter().flat_map(|p| p.users.clone()).collect();
        let got_convs: Vec<String> = parts.iter().flat_map(|p| p.conversations.clone()).collect();
        assert_eq!(
            (got_users, got_convs),
            (users, conversations),
            "nothing lost"
        );
        let one = heartbeat_parts(Presence::default(), 65_536);
        assert_eq!(one.len(), 1);
        assert!(!one[0].continued && !one[0].more);
    }
}
