//! Clients arriving and leaving, the way a real deployment sees them:
//! `storm` (thousands at once, as after a restart), `churn` (cycles that
//! connect, talk and leave, to show nothing is kept) and `soak` (a steady
//! load held for a long time, one measured window a minute).
//!
//! Signalling blocks, so a pool of threads signals and joins; each
//! participant is then handed to the one `mio` loop that drives ICE, DTLS
//! and media for all of them. Refusals the server asks clients to retry
//! (HTTP 503, close 1013) are retried with a jittered back-off and counted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rand::Rng;
use serde_json::json;

use super::outcome::{report, Outcome};
use super::participant::WebRtcParticipant;
use super::runs::measure;
use super::{probe, Driver, RunArgs, Voice};

/// How long one client keeps retrying before it counts as failed.
const GIVE_UP: Duration = Duration::from_secs(120);
/// How long a signalled client may take to finish ICE and DTLS.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

/// Retries and failures by reason, shared by the signalling threads.
#[derive(Default)]
struct Reasons(Mutex<BTreeMap<String, u64>>);

impl Reasons {
    fn count(&self, reason: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }
    fn take(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What a refusal was, if a client should retry it (the server's words
/// for "later": HTTP 503 with Retry-After, close 1013), and a failure it
/// may also retry (a reset or refused TCP connection, as a browser would).
fn retry_reason(e: &str) -> Option<&'static str> {
    if e.starts_with("http 503") {
        Some("http_503")
    } else if e.starts_with("close 1013") {
        Some("close_1013")
    } else if e.starts_with("join http 503") {
        Some("join_503")
    } else if e.contains("reset") {
        Some("connection_reset")
    } else if e.starts_with("connect:") {
        Some("tcp_connect")
    } else {
        None
    }
}

/// Identifies one run's users and conversations, so runs against the same
/// server never share them.
pub fn run_tag() -> String {
    format!("{}-{}", std::process::id(), rand::rng().random::<u16>())
}

/// What a wave of arrivals needs to know.
struct Wave<'a> {
    a: &'a RunArgs,
    tag: &'a str,
    /// First participant id (ids are global across churn cycles).
    first: u32,
    n: u32,
    threads: usize,
}

/// Starts the signalling threads; each signalled and joined participant
/// (or why it failed) arrives on the returned channel.
fn signal_wave(w: &Wave, retries: &Arc<Reasons>) -> Receiver<Result<WebRtcParticipant, String>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let next = Arc::new(AtomicU32::new(w.first));
    let end = w.first + w.n;
    let slots =
        w.a.slots
            .unwrap_or(w.a.shape.room_size.saturating_sub(1).max(1));
    let room_size = w.a.shape.room_size.max(1) as u32;
    for _ in 0..w.threads.max(1) {
        let (tx, next, retries) = (tx.clone(), next.clone(), retries.clone());
        let (a, bind_ip, tag) = (w.a.clone(), w.a.shape.bind_ip, w.tag.to_string());
        thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= end {
                return;
            }
            let user = format!("load-{tag}-u{i}");
            let room = format!("load-{tag}-room-{}", i / room_size);
            let server = a.http_of(i as usize);
            let r = signal_one(i, server, &user, &room, slots, bind_ip, &retries).map(|mut p| {
                p.placement = a.placement();
                p
            });
            if tx.send(r).is_err() {
                return;
            }
        });
    }
    rx
}

/// Signals and joins one client, retrying what the server asks to retry.
fn signal_one(
    i: u32,
    server: SocketAddr,
    user: &str,
    room: &str,
    slots: usize,
    bind_ip: std::net::IpAddr,
    retries: &Reasons,
) -> Result<WebRtcParticipant, String> {
    let give_up = Instant::now() + GIVE_UP;
    let mut attempt = 0u32;
    let mut retry = |e: String| -> Result<(), String> {
        match retry_reason(&e) {
            Some(reason) if Instant::now() < give_up => {
                retries.count(reason);
                attempt += 1;
                let base = (100 * u64::from(attempt)).min(1000);
                let jitter = rand::rng().random_range(0..=base);
                thread::sleep(Duration::from_millis(base + jitter));
                Ok(())
            }
            _ => Err(e),
        }
    };
    let p = loop {
        match WebRtcParticipant::signal(i, server, user, slots, bind_ip, false) {
            Ok(p) => break p,
            Err(e) => retry(e)?,
        }
    };
    loop {
        match WebRtcParticipant::join(server, user, i, room) {
            Ok(()) => return Ok(p),
            Err(e) => retry(e)?,
        }
    }
}

/// How a wave went.
struct WaveResult {
    connected: usize,
    failed: BTreeMap<String, u64>,
    retries: BTreeMap<String, u64>,
    /// From the first attempt to the last client connected.
    all_within_s: f64,
    setup_ms_p50: f64,
    server_cpu_s: Option<f64>,
}

/// Brings a wave up: signals from the pool while the loop drives every
/// participant already handed over, until all have connected or failed.
fn arrive(d: &mut Driver, ps: &mut Vec<WebRtcParticipant>, w: &Wave) -> Result<WaveResult, String> {
    let start = Instant::now();
    let cpu0 = w.a.cpu();
    let retries = Arc::new(Reasons::default());
    let failed = Reasons::default();
    let rx = signal_wave(w, &retries);
    let first_index = ps.len();
    let mut handed = 0u32;
    let silent = |_: usize, _: Instant| Voice::Quiet;
    loop {
        while let Ok(r) = rx.try_recv() {
            handed += 1;
            match r {
                Ok(mut p) => {
                    d.register(&mut p, ps.len())?;
                    ps.push(p);
                }
                Err(e) => {
                    eprintln!("client failed: {e}");
                    failed.count(e.split(':').next().unwrap_or("other"));
                }
            }
        }
        d.drive(ps, Instant::now() + Duration::from_millis(2), &silent);
        let now = Instant::now();
        let mut pending = 0;
        for p in ps[first_index..].iter_mut() {
            if p.connected_at.is_none() {
                if now.duration_since(p.started) > CONNECT_WITHIN + GIVE_UP {
                    continue;
                }
                pending += 1;
                p.on_tick(d.epoch, None, Voice::Quiet);
            }
        }
        if handed == w.n && pending == 0 {
            break;
        }
    }
    // Arrivals came in any order; put them back in id order (and so in
    // room order, which the loss accounting assumes) with matching tokens.
    ps[first_index..].sort_by_key(|p| p.id);
    for (k, p) in ps.iter_mut().enumerate().skip(first_index) {
        p.link
            .reregister(d.poll.registry(), mio::Token(k))
            .map_err(|e| e.to_string())?;
    }
    let wave = &ps[first_index..];
    let connected = wave.iter().filter(|p| p.connected_at.is_some()).count();
    let not_connected = wave.len() - connected;
    for _ in 0..not_connected {
        failed.count("ice_dtls_not_connected");
    }
    let last = wave.iter().filter_map(|p| p.connected_at).max();
    let mut setup: Vec<f64> = wave
        .iter()
        .filter_map(|p| p.connected_at.map(|c| (c - p.started).as_secs_f64() * 1e3))
        .collect();
    setup.sort_by(f64::total_cmp);
    let cpu1 = w.a.cpu();
    Ok(WaveResult {
        connected,
        failed: failed.take(),
        retries: retries.take(),
        all_within_s: last.map_or(0.0, |l| (l - start).as_secs_f64()),
        setup_ms_p50: setup.get(setup.len() / 2).copied().unwrap_or(0.0),
        server_cpu_s: cpu1.zip(cpu0).map(|(b, a)| b - a),
    })
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// `storm`: every client at once, then (if all came up) a talking window.
pub fn storm(a: &RunArgs, threads: usize) -> Result<(), String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    let tag = run_tag();
    let n = a.shape.participants as u32;
    let w = Wave {
        a,
        tag: &tag,
        first: 0,
        n,
        threads,
    };
    let r = arrive(&mut d, &mut ps, &w)?;
    println!(
        "storm: {n} clients, {threads} signalling threads: {} connected, {} failed {:?}, \
         all connected within {:.1} s (setup p50 {:.0} ms), {} retries {:?}, server CPU {}",
        r.connected,
        total(&r.failed),
        r.failed,
        r.all_within_s,
        r.setup_ms_p50,
        total(&r.retries),
        r.retries,
        r.server_cpu_s
            .map(|c| format!("{c:.1} s ({:.2} ms per client)", c * 1e3 / f64::from(n)))
            .unwrap_or_else(|| "-".into()),
    );
    let complete_rooms = a
        .shape
        .participants
        .is_multiple_of(a.shape.room_size.max(1));
    if r.connected == ps.len() && ps.len() == a.shape.participants && complete_rooms {
        let o = measure(&mut d, &mut ps, a, None)?;
        report(&[o], a.shape.json.as_deref());
    } else {
        println!("storm: no talking window (not every client connected, or rooms not full)");
    }
    goodbye(&mut d, &mut ps);
    if total(&r.failed) > 0 {
        return Err(format!("{} clients failed", total(&r.failed)));
    }
    Ok(())
}

/// Says goodbye for every participant and lets the datagrams leave.
pub fn goodbye(d: &mut Driver, ps: &mut Vec<WebRtcParticipant>) {
    for p in ps.iter_mut() {
        p.close(d.epoch);
    }
    let silent = |_: usize, _: Instant| Voice::Quiet;
    d.drive(ps, Instant::now() + Duration::from_millis(200), &silent);
    ps.clear();
}

/// The server's resources, read between churn phases.
struct Resources {
    rss_kib: Option<u64>,
    fds: Option<usize>,
    peers: Option<f64>,
    conversations: Option<f64>,
}

fn resources(a: &RunArgs) -> Resources {
    Resources {
        rss_kib: a.rss().map(|b| b / 1024),
        fds: a.server_pid.first().and_then(|p| probe::fd_count(*p)),
        peers: a.metric("beep_sfu_peers"),
        conversations: a.metric("beep_sfu_conversations"),
    }
}

/// Waits (up to `limit`) until the server has no peers and no
/// conversations left (the users' grace periods have run out), then until
/// the server has given the heap back once since (its trims are spaced by
/// 30 s; 35 s at most).
fn wait_drained(a: &RunArgs, limit: Duration) -> f64 {
    let start = Instant::now();
    let trims = || a.metric("beep_sfu_heap_trim_seconds_count");
    while start.elapsed() < limit {
        let peers = a.metric("beep_sfu_peers");
        let convs = a.metric("beep_sfu_conversations");
        if peers == Some(0.0) && convs == Some(0.0) {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    let waited = start.elapsed().as_secs_f64();
    // A trim during the drain (the load halving) does not count: wait for
    // one after it, which the 30 s spacing may delay.
    let trims_at_drain = trims();
    let trimmed = Instant::now();
    while trimmed.elapsed() < Duration::from_secs(35) && trims() == trims_at_drain {
        thread::sleep(Duration::from_millis(500));
    }
    waited
}

/// `churn`: `cycles` waves of `participants` clients that connect at once,
/// join, talk for a measured window and leave (even ids say goodbye, odd
/// ids vanish), reading the server's RSS, fds and gauges between phases.
pub fn churn(a: &RunArgs, threads: usize, cycles: u32, drain_secs: u64) -> Result<(), String> {
    let mut d = Driver::new()?;
    let tag = run_tag();
    let n = a.shape.participants as u32;
    let mut rows = vec![("before", resources(a))];
    let mut failed = 0;
    let mut worst_loss: f64 = 0.0;
    for c in 0..cycles {
        let mut ps = Vec::new();
        let w = Wave {
            a,
            tag: &tag,
            first: c * n,
            n,
            threads,
        };
        let r = arrive(&mut d, &mut ps, &w)?;
        failed += total(&r.failed);
        let mut talk = a.clone();
        talk.shape.warmup = 1;
        talk.shape.duration = 2;
        let loss = if r.connected == ps.len()
            && a.shape
                .participants
                .is_multiple_of(a.shape.room_size.max(1))
        {
            let o = measure(&mut d, &mut ps, &talk, None)?;
            worst_loss = worst_loss.max(o.loss_percent);
            format!("{:.3} %", o.loss_percent)
        } else {
            "-".into()
        };
        eprintln!(
            "cycle {}: {} connected, {} failed, {} retries, within {:.1} s, loss {loss}, server RSS {} KiB",
            c + 1,
            r.connected,
            total(&r.failed),
            total(&r.retries),
            r.all_within_s,
            a.rss().map_or("-".into(), |b| (b / 1024).to_string())
        );
        for (k, p) in ps.iter_mut().enumerate() {
            if k % 2 == 0 {
                p.close(d.epoch);
            }
        }
        let silent = |_: usize, _: Instant| Voice::Quiet;
        d.drive(
            &mut ps,
            Instant::now() + Duration::from_millis(200),
            &silent,
        );
        drop(ps);
        if c == 0 {
            let waited = wait_drained(a, Duration::from_secs(drain_secs));
            eprintln!("cycle 1 drained in {waited:.1} s");
            rows.push(("after cycle 1", resources(a)));
        }
    }
    let waited = wait_drained(a, Duration::from_secs(drain_secs));
    eprintln!("last cycle drained in {waited:.1} s");
    rows.push(("after the last cycle", resources(a)));
    println!(
        "churn: {cycles} cycles of {n} clients ({} in all), {failed} failed, worst loss {worst_loss:.3} %",
        u64::from(cycles) * u64::from(n)
    );
    println!(
        "{:<22} {:>10} {:>5} {:>6} {:>13}",
        "phase", "RSS KiB", "fds", "peers", "conversations"
    );
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for (phase, r) in &rows {
        println!(
            "{phase:<22} {:>10} {:>5} {:>6} {:>13}",
            opt(r.rss_kib.map(|v| v.to_string())),
            opt(r.fds.map(|v| v.to_string())),
            opt(r.peers.map(|v| v.to_string())),
            opt(r.conversations.map(|v| v.to_string())),
        );
    }
    if let Some(path) = a.shape.json.as_deref() {
        let v: Vec<_> = rows
            .iter()
            .map(|(phase, r)| {
                json!({"phase": phase, "rss_kib": r.rss_kib, "fds": r.fds,
                       "peers": r.peers, "conversations": r.conversations})
            })
            .collect();
        let _ = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    if failed > 0 {
        return Err(format!("{failed} clients failed"));
    }
    Ok(())
}

/// `soak`: P participants held for `minutes`, one measured window a minute
/// (loss, latency, the server's CPU and RSS), printed as it goes.
pub fn soak(a: &RunArgs, threads: usize, minutes: u32) -> Result<(), String> {
    let mut d = Driver::new()?;
    let mut ps = Vec::new();
    let tag = run_tag();
    let w = Wave {
        a,
        tag: &tag,
        first: 0,
        n: a.shape.participants as u32,
        threads,
    };
    let r = arrive(&mut d, &mut ps, &w)?;
    if r.connected != a.shape.participants {
        return Err(format!(
            "only {} of {} connected",
            r.connected, a.shape.participants
        ));
    }
    let mut minute = a.clone();
    minute.shape.warmup = 2;
    minute.shape.duration = 57;
    let mut results: Vec<Outcome> = Vec::new();
    for m in 1..=minutes {
        let o = measure(&mut d, &mut ps, &minute, None)?;
        eprintln!(
            "minute {m:3}: loss {:.3} %  p50 {:.2} ms  p99 {:.2} ms  cpu {:.1} %  RSS {} KiB",
            o.loss_percent,
            o.latency_ms_p50,
            o.latency_ms_p99,
            o.cpu_percent.unwrap_or(0.0),
            o.rss_kib.map_or("-".into(), |v| format!("{v:.0}"))
        );
        results.push(o);
    }
    report(&results, a.shape.json.as_deref());
    goodbye(&mut d, &mut ps);
    Ok(())
}
