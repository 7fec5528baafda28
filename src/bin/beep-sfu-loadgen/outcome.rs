//! What one measured window yields ([`Outcome`]), how the tallies of every
//! participant are summarised into it, and how outcomes are printed and
//! written as JSON (the files `scripts/chart` reads).

use serde_json::{json, Value};

use crate::participant::Tally;
use crate::voice::{self, Load};
use crate::Shape;

/// Results of one measured window.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) kind: &'static str,
    pub(crate) participants: usize,
    pub(crate) room_size: usize,
    pub(crate) talkers: usize,
    pub(crate) setup_ms_p50: Option<f64>,
    pub(crate) setup_ms_max: Option<f64>,
    pub(crate) window_s: f64,
    pub(crate) pps_in: f64,
    pub(crate) pps_out: f64,
    pub(crate) cpu_percent: Option<f64>,
    /// The generator's own CPU over the window, % of a core.
    pub(crate) generator_cpu_percent: Option<f64>,
    pub(crate) cpu_us_per_forwarded: Option<f64>,
    pub(crate) loss_percent: f64,
    pub(crate) latency_ms_p50: f64,
    pub(crate) latency_ms_p99: f64,
    pub(crate) latency_ms_max: f64,
    pub(crate) rss_per_participant_kib: Option<f64>,
    /// The server's RSS at the end of the window.
    pub(crate) rss_kib: Option<f64>,
    /// Latency of packets whose sender is on another node (p50, p99).
    pub(crate) cross_ms: Option<(f64, f64)>,
    /// Latency of packets whose sender is on the listener's node.
    pub(crate) same_ms: Option<(f64, f64)>,
    /// Packets received from other nodes per second (all nodes).
    pub(crate) relay_pps_in: Option<f64>,
}

pub(crate) fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// `all` without one occurrence of each value in `remove`.
pub(crate) fn multiset_minus(mut all: Vec<u32>, remove: &[u32]) -> Vec<u32> {
    let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for v in remove {
        *counts.entry(*v).or_default() += 1;
    }
    all.retain(|v| match counts.get_mut(v) {
        Some(n) if *n > 0 => {
            *n -= 1;
            false
        }
        _ => true,
    });
    all
}

/// Members per room when `n` participants fill rooms of `size` in order.
pub(crate) fn room_sizes(n: usize, size: usize) -> Vec<usize> {
    let size = size.max(1);
    (0..n).map(|i| (n - (i / size) * size).min(size)).collect()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn summarise(
    kind: &'static str,
    tallies: Vec<Tally>,
    shape: &Shape,
    n: usize,
    hearers: usize,
    room_of: Vec<usize>,
    elapsed: f64,
    (packets_in, forwarded): (f64, f64),
    cpu: Option<f64>,
    setup: Option<&[f64]>,
    rss_kib: Option<f64>,
) -> Outcome {
    let talkers = voice::talker_count(shape, n);
    let mut latencies: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    // Every packet sent in the window should reach each other member of the
    // sender's room that can hear it.
    let expected: f64 = if shape.load == Load::LargeRoom {
        // Each participant hears as many of the talkers (not itself) as
        // it has slots, each sending what the average talker sent.
        let sent: f64 = tallies.iter().map(|t| t.sent_in_window as f64).sum();
        let per_talker = sent / talkers.max(1) as f64;
        (0..n)
            .map(|i| hearers.min(talkers - usize::from(i < talkers)) as f64 * per_talker)
            .sum()
    } else {
        tallies
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.sent_in_window as f64 * hearers.min(room_of[i].saturating_sub(1)) as f64
            })
            .sum()
    };
    let received: f64 = tallies.iter().map(|t| t.received_in_window as f64).sum();
    let loss = if expected > 0.0 {
        (1.0 - received / expected).max(0.0) * 100.0
    } else {
        0.0
    };
    let pct = |s: &[f64], q: f64| {
        s.get(((s.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
    };
    Outcome {
        kind,
        participants: n,
        room_size: shape.room_size,
        talkers,
        setup_ms_p50: setup.and_then(|s| pct(s, 0.5)),
        setup_ms_max: setup.and_then(|s| s.last().copied()),
        window_s: elapsed,
        pps_in: packets_in / elapsed,
        pps_out: forwarded / elapsed,
        cpu_percent: cpu.map(|c| c / elapsed * 100.0),
        generator_cpu_percent: None,
        cpu_us_per_forwarded: cpu.filter(|_| forwarded > 0.0).map(|c| c / forwarded * 1e6),
        loss_percent: loss,
        latency_ms_p50: percentile(&latencies, 0.5),
        latency_ms_p99: percentile(&latencies, 0.99),
        latency_ms_max: latencies
            .last()
            .map(|v| f64::from(*v) / 1000.0)
            .unwrap_or(0.0),
        rss_per_participant_kib: rss_kib,
        rss_kib: None,
        cross_ms: None,
        same_ms: None,
        relay_pps_in: None,
    }
}

pub(crate) fn report(results: &[Outcome], json_path: Option<&std::path::Path>) {
    println!(
        "{:<15} {:>6} {:>3} {:>7} {:>9} {:>9} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9}",
        "kind",
        "P",
        "R",
        "talkers",
        "pps in",
        "pps out",
        "cpu %",
        "µs/fwd",
        "loss %",
        "p50 ms",
        "p99 ms",
        "max ms",
        "setup ms",
        "RSS/P KiB"
    );
    let opt = |v: Option<f64>, prec: usize| {
        v.map(|v| format!("{v:.prec$}"))
            .unwrap_or_else(|| "-".into())
    };
    for o in results {
        println!(
            "{:<15} {:>6} {:>3} {:>7} {:>9.0} {:>9.0} {:>7} {:>9} {:>7.3} {:>7.2} {:>7.2} {:>7.2} {:>9} {:>9} {:>7}",
            o.kind,
            o.participants,
            o.room_size,
            o.talkers,
            o.pps_in,
            o.pps_out,
            opt(o.cpu_percent, 1),
            opt(o.cpu_us_per_forwarded, 2),
            o.loss_percent,
            o.latency_ms_p50,
            o.latency_ms_p99,
            o.latency_ms_max,
            opt(o.setup_ms_p50, 1),
            opt(o.rss_per_participant_kib, 1),
            opt(o.generator_cpu_percent, 1),
        );
    }
    for o in results {
        if let (Some(c), Some(sm)) = (o.cross_ms, o.same_ms) {
            println!(
                "  per path (P={}): same node p50/p99 {:.2}/{:.2} ms, cross node {:.2}/{:.2} ms, relayed in {:.0} pps",
                o.participants, sm.0, sm.1, c.0, c.1, o.relay_pps_in.unwrap_or(0.0)
            );
        } else if let Some(c) = o.cross_ms {
            println!("  cross node p50/p99 {:.2}/{:.2} ms", c.0, c.1);
        }
    }
    if let Some(path) = json_path {
        let v: Vec<Value> = results
            .iter()
            .map(|o| {
                json!({
                    "kind": o.kind, "participants": o.participants, "room_size": o.room_size,
                    "talkers": o.talkers, "window_s": o.window_s, "pps_in": o.pps_in, "pps_out": o.pps_out,
                    "cpu_percent": o.cpu_percent, "cpu_us_per_forwarded": o.cpu_us_per_forwarded,
                    "loss_percent": o.loss_percent, "latency_ms_p50": o.latency_ms_p50,
                    "latency_ms_p99": o.latency_ms_p99, "latency_ms_max": o.latency_ms_max,
                    "setup_ms_p50": o.setup_ms_p50, "setup_ms_max": o.setup_ms_max,
                    "rss_per_participant_kib": o.rss_per_participant_kib,
                    "generator_cpu_percent": o.generator_cpu_percent, "rss_kib": o.rss_kib,
                    "cross_ms_p50_p99": o.cross_ms, "same_ms_p50_p99": o.same_ms,
                    "relay_pps_in": o.relay_pps_in,
                })
            })
            .collect();
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default()) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}
