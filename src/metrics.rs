//! Service metrics, rendered in the OpenMetrics/Prometheus text format by
//! `prometheus-client` for `GET /metrics`.
//!
//! The media loop owns the hot counters as plain integers in the core
//! ([`crate::sfu::CoreStats`]) and publishes them here once per loop
//! iteration ([`Metrics::publish_core`]), so forwarding pays for no atomics.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::sfu::{CoreStats, Export, Snapshot};

/// Label for counters split by a reason or outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why (or how it ended).
    pub reason: &'static str,
}

/// Label for what the cluster side dropped: which kind of message, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterDrop {
    /// media, join, heartbeat, or input (toward the media loop).
    pub kind: &'static str,
    /// queue_full, disconnected, malformed, publish_error.
    pub reason: &'static str,
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    /// Peers (connecting or connected).
    pub peers: Gauge,
    /// Connected peers.
    pub peers_connected: Gauge,
    /// Conversations with members or joined users.
    pub conversations: Gauge,
    /// Bites being assembled.
    pub open_bites: Gauge,
    /// Datagrams sent on the media socket.
    pub datagrams_out: Counter,
    /// Bytes sent on the media socket.
    pub bytes_out: Counter,
    /// Datagrams dropped, by reason.
    pub dropped: Family<Reason, Counter>,
    /// The core's own counters that have a metric of their own, in the
    /// order of [`CoreStats::EXPORTS`] (`None` for those in a family).
    core: Vec<Option<Counter>>,
    /// Times the media loop woke from `poll`.
    pub loop_wakes: Counter,
    /// How long each turn of the media loop took (from waking to the next
    /// poll): a flood that held the loop shows here.
    pub loop_turn_seconds: Histogram,
    /// How long each heap trim after a peak held the loop.
    pub heap_trim_seconds: Histogram,
    /// Peers created, connected and closed.
    pub peer_events: Family<Reason, Counter>,
    /// Permission checks by outcome.
    pub permission_checks: Family<Reason, Counter>,
    /// Permission check latency in seconds.
    pub permission_latency: Histogram,
    /// Open signalling (HTTP/WebSocket) connections.
    pub signalling_connections: Gauge,
    /// HTTP responses and WebSocket outcomes, by kind.
    pub signalling_outcomes: Family<Reason, Counter>,
    /// Commands to the media loop dropped because its queue was full.
    pub commands_dropped: Counter,
    /// Other nodes of the cluster this one hears (not counting itself).
    pub cluster_nodes: Gauge,
    /// Speakers on other nodes currently known.
    pub remote_speakers: Gauge,
    /// 1 while the cluster's NATS connection is up.
    pub cluster_connected: Gauge,
    /// Cluster messages dropped, by kind and reason.
    pub cluster_dropped: Family<ClusterDrop, Counter>,
    /// 1 when another process uses this node's id: the node then refuses
    /// the cluster.
    pub cluster_duplicate_node_id: Gauge,
    /// Bites finished by the core.
    pub bites: Counter,
    /// Bites published to NATS (both subjects).
    pub bites_published: Counter,
    /// Bytes of bite messages published to NATS.
    pub bite_bytes_published: Counter,
    /// Bites written as files.
    pub bites_written: Counter,
    /// Bites dropped, by reason.
    pub bites_dropped: Family<Reason, Counter>,
    /// Bites split in two for NATS's max_payload.
    pub bites_split: Counter,
    /// Open ICE-TCP connections.
    pub tcp_connections: Gauge,
    /// RFC 4571 frames read off ICE-TCP connections.
    pub tcp_frames_in: Counter,
    /// RFC 4571 frames queued onto ICE-TCP connections.
    pub tcp_frames_out: Counter,
    /// ICE-TCP connections or frames dropped, by reason.
    pub tcp_drops: Family<Reason, Counter>,
    /// Bites waiting for NATS.
    pub bite_backlog: Gauge,
    /// Bytes waiting for NATS.
    pub bite_backlog_bytes: Gauge,
    /// 1 while connected to NATS.
    pub nats_connected: Gauge,
}

/// Registers each listed field of a [`Metrics`] under its name and help
/// text (one line per metric instead of a five-line call).
macro_rules! register {
    ($m:ident, $( $field:ident => $name:literal, $help:literal; )*) => {
        $( $m.registry.register($name, $help, $m.$field.clone()); )*
    };
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut m = Self::unregistered();
        register! { m,
            peers => "peers", "Peers, connecting or connected";
            peers_connected => "peers_connected", "Peers with ICE and DTLS up";
            conversations => "conversations", "Conversations with members or joined users";
            open_bites => "open_bites", "Bites (talk spurts) being assembled";
            datagrams_out => "datagrams_out", "Datagrams sent on the media socket";
            bytes_out => "bytes_out", "Bytes sent on the media socket";
            dropped => "dropped_datagrams", "Datagrams dropped, by reason";
            loop_wakes => "loop_wakes", "Times the media loop woke from poll (datagrams per wake = datagrams_in / loop_wakes)";
            loop_turn_seconds => "loop_turn_seconds", "Time each media-loop turn took, from waking to the next poll";
            cluster_nodes => "cluster_nodes", "Other nodes of the cluster this one hears (itself not counted)";
            remote_speakers => "remote_speakers", "Speakers on other nodes currently known";
            cluster_connected => "cluster_connected", "1 while the cluster's NATS connection is up";
            cluster_dropped => "cluster_dropped", "Cluster messages dropped, by kind and reason";
            cluster_duplicate_node_id => "cluster_duplicate_node_id", "1 when another process uses this node's id (the node then stays out of the cluster)";
            heap_trim_seconds => "heap_trim_seconds", "Time the media loop spent giving freed heap back to the kernel after a peak";
            peer_events => "peer_events", "Peers created, connected, closed";
            permission_checks => "permission_checks", "Permission checks by outcome";
            permission_latency => "permission_check_seconds", "Permission check latency";
            signalling_connections => "signalling_connections", "Open signalling connections";
            signalling_outcomes => "signalling_outcomes", "Signalling results by kind";
            commands_dropped => "commands_dropped", "Commands to the media loop dropped on a full queue";
            bites => "bites", "Bites (talk spurts) finished";
            bites_published => "bites_published", "Bites published to NATS";
            bite_bytes_published => "bite_bytes_published", "Bytes of Bite and Store messages published to NATS";
            bites_written => "bites_written", "Bites written as files";
            bites_dropped => "bites_dropped", "Bites dropped, by reason";
            tcp_connections => "tcp_connections", "Open ICE-TCP connections";
            tcp_frames_in => "tcp_frames_in", "RFC 4571 frames read off ICE-TCP connections";
            tcp_frames_out => "tcp_frames_out", "RFC 4571 frames queued onto ICE-TCP connections";
            tcp_drops => "tcp_drops", "ICE-TCP connections or frames dropped, by reason";
            bites_split => "bites_split", "Bites split in two to fit NATS's max_payload";
            bite_backlog => "bite_backlog", "Bites waiting for NATS";
            bite_backlog_bytes => "bite_backlog_bytes", "Bytes waiting for NATS";
            nats_connected => "nats_connected", "1 while connected to NATS";
        }
        let core = CoreStats::EXPORTS
            .iter()
            .map(|e| match e {
                Export::Counter { name, help } => {
                    let c = Counter::default();
                    m.registry.register(*name, *help, c.clone());
                    Some(c)
                }
                _ => None,
            })
            .collect();
        m.core = core;
        m
    }

    /// Every metric at zero, none registered yet.
    fn unregistered() -> Self {
        Metrics {
            peers: Gauge::default(),
            peers_connected: Gauge::default(),
            conversations: Gauge::default(),
            open_bites: Gauge::default(),
            datagrams_out: Counter::default(),
            bytes_out: Counter::default(),
            dropped: Family::default(),
            core: Vec::new(),
            loop_wakes: Counter::default(),
            loop_turn_seconds: Histogram::new([
                0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
            ]),
            heap_trim_seconds: Histogram::new([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]),
            peer_events: Family::default(),
            permission_checks: Family::default(),
            permission_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ]),
            signalling_connections: Gauge::default(),
            signalling_outcomes: Family::default(),
            commands_dropped: Counter::default(),
            cluster_nodes: Gauge::default(),
            remote_speakers: Gauge::default(),
            cluster_connected: Gauge::default(),
            cluster_dropped: Family::default(),
            cluster_duplicate_node_id: Gauge::default(),
            bites: Counter::default(),
            bites_published: Counter::default(),
            bite_bytes_published: Counter::default(),
            bites_written: Counter::default(),
            bites_dropped: Family::default(),
            bites_split: Counter::default(),
            tcp_connections: Gauge::default(),
            tcp_frames_in: Counter::default(),
            tcp_frames_out: Counter::default(),
            tcp_drops: Family::default(),
            bite_backlog: Gauge::default(),
            bite_backlog_bytes: Gauge::default(),
            nats_connected: Gauge::default(),
            registry: Registry::with_prefix("beep_sfu"),
        }
    }

    /// Copies the core's snapshot in (called by the media loop only, which
    /// keeps `last`, the counters it published before, so no lock is needed).
    pub(crate) fn publish_core(&self, last: &mut CoreStats, now: &Snapshot) {
        self.peers.set(now.peers as i64);
        self.peers_connected.set(now.connected as i64);
        self.conversations.set(now.conversations as i64);
        self.open_bites.set(now.open_bites as i64);
        self.cluster_nodes.set(now.cluster_nodes as i64);
        self.remote_speakers.set(now.remote_speakers as i64);
        if *last == now.stats {
            return;
        }
        let deltas = now
            .stats
            .values()
            .zip(last.values())
            .map(|(a, b)| a.saturating_sub(b));
        for ((export, delta), counter) in CoreStats::EXPORTS.iter().zip(deltas).zip(&self.core) {
            if delta == 0 {
                continue;
            }
            match (export, counter) {
                (Export::Counter { .. }, Some(c)) => {
                    c.inc_by(delta);
                }
                (Export::Dropped(reason), _) => {
                    self.dropped.get_or_create(&Reason { reason }).inc_by(delta);
                }
                (Export::PeerEvent(reason), _) => {
                    self.peer_events
                        .get_or_create(&Reason { reason })
                        .inc_by(delta);
                }
                (Export::Counter { .. }, None) => {}
            }
        }
        *last = now.stats;
    }

    /// Counts one datagram sent by the media loop.
    pub fn sent(&self, datagrams: u64, bytes: u64) {
        self.datagrams_out.inc_by(datagrams);
        self.bytes_out.inc_by(bytes);
    }

    /// Counts one dropped datagram or event.
    pub fn drop_one(&self, reason: &'static str) {
        self.dropped.get_or_create(&Reason { reason }).inc();
    }

    /// Counts one ICE-TCP drop.
    pub fn tcp_dropped(&self, reason: &'static str) {
        self.tcp_drops.get_or_create(&Reason { reason }).inc();
    }

    /// Counts one dropped bite.
    pub fn bite_dropped(&self, reason: &'static str) {
        self.bites_dropped.get_or_create(&Reason { reason }).inc();
    }

    /// Counts one dropped cluster message.
    pub fn cluster_drop(&self, kind: &'static str, reason: &'static str) {
        self.cluster_dropped
            .get_or_create(&ClusterDrop { kind, reason })
            .inc();
    }

    /// Counts one signalling outcome.
    pub fn outcome(&self, reason: &'static str) {
        self.signalling_outcomes
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Records one permission check.
    pub fn permission(&self, outcome: &'static str, took: Duration) {
        self.permission_checks
            .get_or_create(&Reason { reason: outcome })
            .inc();
        self.permission_latency.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
