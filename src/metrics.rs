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

use crate::sfu::CoreStats;

/// Label for counters split by a reason or outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why (or how it ended).
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
    /// Datagrams received on the media socket.
    pub datagrams_in: Counter,
    /// Bytes received on the media socket.
    pub bytes_in: Counter,
    /// Datagrams sent on the media socket.
    pub datagrams_out: Counter,
    /// Bytes sent on the media socket.
    pub bytes_out: Counter,
    /// RTP packets received from peers.
    pub rtp_in: Counter,
    /// RTP packets forwarded to subscribers.
    pub forwarded: Counter,
    /// Datagrams dropped, by reason.
    pub dropped: Family<Reason, Counter>,
    /// Timer wakes that advanced a peer's `Rtc`.
    pub rtc_timeouts: Counter,
    /// Times the media loop woke from `poll`.
    pub loop_wakes: Counter,
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
    /// Bites waiting for NATS.
    pub bite_backlog: Gauge,
    /// Bytes waiting for NATS.
    pub bite_backlog_bytes: Gauge,
    /// 1 while connected to NATS.
    pub nats_connected: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beep_sfu");
        let m = Metrics {
            peers: Gauge::default(),
            peers_connected: Gauge::default(),
            conversations: Gauge::default(),
            datagrams_in: Counter::default(),
            bytes_in: Counter::default(),
            datagrams_out: Counter::default(),
            bytes_out: Counter::default(),
            rtp_in: Counter::default(),
            forwarded: Counter::default(),
            dropped: Family::default(),
            rtc_timeouts: Counter::default(),
            loop_wakes: Counter::default(),
            peer_events: Family::default(),
            permission_checks: Family::default(),
            permission_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
            ]),
            signalling_connections: Gauge::default(),
            signalling_outcomes: Family::default(),
            commands_dropped: Counter::default(),
            bites: Counter::default(),
            bites_published: Counter::default(),
            bite_bytes_published: Counter::default(),
            bites_written: Counter::default(),
            bites_dropped: Family::default(),
            bite_backlog: Gauge::default(),
            bite_backlog_bytes: Gauge::default(),
            nats_connected: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("peers", "Peers, connecting or connected", m.peers.clone());
        r.register(
            "peers_connected",
            "Peers with ICE and DTLS up",
            m.peers_connected.clone(),
        );
        r.register(
            "conversations",
            "Conversations with members or joined users",
            m.conversations.clone(),
        );
        r.register(
            "datagrams_in",
            "Datagrams received on the media socket",
            m.datagrams_in.clone(),
        );
        r.register(
            "bytes_in",
            "Bytes received on the media socket",
            m.bytes_in.clone(),
        );
        r.register(
            "datagrams_out",
            "Datagrams sent on the media socket",
            m.datagrams_out.clone(),
        );
        r.register(
            "bytes_out",
            "Bytes sent on the media socket",
            m.bytes_out.clone(),
        );
        r.register(
            "rtp_packets_in",
            "RTP packets received from peers",
            m.rtp_in.clone(),
        );
        r.register(
            "forwarded_packets",
            "RTP packets forwarded to subscribers",
            m.forwarded.clone(),
        );
        r.register(
            "dropped_datagrams",
            "Datagrams dropped, by reason",
            m.dropped.clone(),
        );
        r.register(
            "loop_wakes",
            "Times the media loop woke from poll (datagrams per wake = datagrams_in / loop_wakes)",
            m.loop_wakes.clone(),
        );
        r.register(
            "rtc_timeouts",
            "Timer wakes that advanced a peer's WebRTC state",
            m.rtc_timeouts.clone(),
        );
        r.register(
            "peer_events",
            "Peers created, connected, closed",
            m.peer_events.clone(),
        );
        r.register(
            "permission_checks",
            "Permission checks by outcome",
            m.permission_checks.clone(),
        );
        r.register(
            "permission_check_seconds",
            "Permission check latency",
            m.permission_latency.clone(),
        );
        r.register(
            "signalling_connections",
            "Open signalling connections",
            m.signalling_connections.clone(),
        );
        r.register(
            "signalling_outcomes",
            "Signalling results by kind",
            m.signalling_outcomes.clone(),
        );
        r.register(
            "commands_dropped",
            "Commands to the media loop dropped on a full queue",
            m.commands_dropped.clone(),
        );
        r.register("bites", "Bites (talk spurts) finished", m.bites.clone());
        r.register(
            "bites_published",
            "Bites published to NATS",
            m.bites_published.clone(),
        );
        r.register(
            "bite_bytes_published",
            "Bytes of Bite and Store messages published to NATS",
            m.bite_bytes_published.clone(),
        );
        r.register(
            "bites_written",
            "Bites written as files",
            m.bites_written.clone(),
        );
        r.register(
            "bites_dropped",
            "Bites dropped, by reason",
            m.bites_dropped.clone(),
        );
        r.register(
            "bite_backlog",
            "Bites waiting for NATS",
            m.bite_backlog.clone(),
        );
        r.register(
            "bite_backlog_bytes",
            "Bytes waiting for NATS",
            m.bite_backlog_bytes.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS",
            m.nats_connected.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Copies the core's counters in (called by the media loop only, which
    /// keeps `last`, what it published before, so no lock is needed).
    pub fn publish_core(
        &self,
        last: &mut CoreStats,
        now: &CoreStats,
        peers: usize,
        connected: usize,
        conversations: usize,
    ) {
        self.peers.set(peers as i64);
        self.peers_connected.set(connected as i64);
        self.conversations.set(conversations as i64);
        if *last == *now {
            return;
        }
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.datagrams_in
            .inc_by(d(now.datagrams_in, last.datagrams_in));
        self.bytes_in.inc_by(d(now.bytes_in, last.bytes_in));
        self.rtp_in.inc_by(d(now.rtp_in, last.rtp_in));
        self.forwarded.inc_by(d(now.forwarded, last.forwarded));
        self.rtc_timeouts
            .inc_by(d(now.rtc_timeouts, last.rtc_timeouts));
        for (reason, a, b) in [
            ("malformed", now.dropped_malformed, last.dropped_malformed),
            (
                "unknown_source",
                now.dropped_unknown_source,
                last.dropped_unknown_source,
            ),
            (
                "rejected_by_peer",
                now.dropped_rejected,
                last.dropped_rejected,
            ),
            (
                "outside_conversation",
                now.rtp_outside_conversation,
                last.rtp_outside_conversation,
            ),
        ] {
            if a > b {
                self.dropped.get_or_create(&Reason { reason }).inc_by(a - b);
            }
        }
        for (reason, a, b) in [
            ("created", now.peers_created, last.peers_created),
            ("connected", now.peers_connected, last.peers_connected),
            ("closed", now.peers_closed, last.peers_closed),
            ("refused_full", now.connects_refused, last.connects_refused),
        ] {
            if a > b {
                self.peer_events
                    .get_or_create(&Reason { reason })
                    .inc_by(a - b);
            }
        }
        *last = *now;
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

    /// Counts one dropped bite.
    pub fn bite_dropped(&self, reason: &'static str) {
        self.bites_dropped.get_or_create(&Reason { reason }).inc();
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
