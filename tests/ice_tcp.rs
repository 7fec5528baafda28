//! ICE-TCP that nobody can starve or hold, and a process that knows its
//! file descriptors: real TCP and UDP on loopback, str0m clients, and
//! floods from many source addresses (127.0.0.0/8 is all loopback).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn start_with(f: impl FnOnce(&mut beep_sfu::config::Config)) -> beep_sfu::server::Server {
    init_log();
    let mut cfg = test_config(true, "");
    f(&mut cfg);
    beep_sfu::server::Server::start(&cfg).expect("server starts")
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from((from, 0)).into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// `(sum of the histogram's buckets up to le, its count)` from /metrics.
fn turns(http: SocketAddr, le: &str) -> (f64, f64) {
    let (_, body) = get(http, "/metrics");
    let value = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    (
        value(&format!("beep_sfu_loop_turn_seconds_bucket{{le=\"{le}\"}}")),
        value("beep_sfu_loop_turn_seconds_count"),
    )
}

fn tcp_drops(http: SocketAddr, reason: &str) -> f64 {
    metric_sum(
        http,
        "beep_sfu_tcp_drops_total",
        &format!("reason=\"{reason}\""),
    )
}

#[test]
fn three_hundred_connections_pouring_empty_frames_cannot_cost_a_udp_call_a_packet() {
    let server = start_with(|c| c.max_tcp_connections = 1_024);
    let http = server.http_addr();
    let tcp = server.tcp_addr().expect("ICE-TCP is served by default");
    let (mut talker, mut listener) = two_in_room(http);
    // 300 connections from 20 addresses (15 each, under the per-IP cap)
    // pour `\0\0` (empty RFC 4571 frames) as fast as the kernel takes them,
    // connecting again whenever the server cuts them.
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..300u32)
        .map(|i| {
            let (stop, connected) = (stop.clone(), connected.clone());
            thread::spawn(move || {
                let from = [127, 0, 1, 1 + (i / 15) as u8];
                let burst = vec![0u8; 64 * 1024];
                let mut sent = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = connect_from(from, tcp) else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    connected.fetch_add(1, Ordering::SeqCst);
                    while !stop.load(Ordering::Relaxed) {
                        match s.write(&burst) {
                            Ok(n) => sent += n,
                            Err(_) => break,
                        }
                    }
                }
                sent
            })
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || connected.load(Ordering::SeqCst)
            >= 300),
        "{} of 300 flooders connected",
        connected.load(Ordering::SeqCst)
    );
    let before = turns(http, "+Inf");
    for n in 0..150u32 {
        talker.send(&payload(1, n), -20);
        pump_for(&mut [&mut talker, &mut listener], Duration::from_millis(20));
    }
    pump_for(
        &mut [&mut talker, &mut listener],
        Duration::from_millis(300),
    );
    let (slow_ok, count) = turns(http, "0.5");
    let (fast, _) = turns(http, "0.05");
    stop.store(true, Ordering::Relaxed);
    let flooded: usize = flooders.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let got = heard(&listener).get(&1).cloned().unwrap_or_default();
    assert_eq!(
        got,
        (0..150).collect::<Vec<_>>(),
        "every packet, in order, under {flooded} bytes from 300 connections"
    );
    let connects = connected.load(Ordering::SeqCst);
    assert!(
        flooded > 10_000_000 && connects > 600,
        "the flood really flowed: {flooded} bytes over {connects} connections"
    );
    assert!(count - before.1 > 100.0, "the loop turned: {count}");
    assert_eq!(
        slow_ok, count,
        "every loop turn took under 500 ms (debug build, under the flood); {fast} of {count} under 50 ms"
    );
    assert!(
        tcp_drops(http, "empty_frame") > 300.0,
        "connections pouring empty frames were cut: {}",
        tcp_drops(http, "empty_frame")
    );
    assert!(server.shutdown());
}

#[test]
fn connections_from_one_ip_are_capped() {
    let server = start_with(|c| c.max_tcp_per_ip = 16);
    let http = server.http_addr();
    let tcp = server.tcp_addr().expect("ICE-TCP is served");
    let conns: Vec<TcpStream> = (0..100)
        .filter_map(|_| connect_from([127, 0, 2, 1], tcp).ok())
        .collect();
    assert!(
        wait_for(Duration::from_secs(5), || tcp_drops(http, "per_ip_limit")
            == 84.0),
        "refused over the cap: {}",
        tcp_drops(http, "per_ip_limit")
    );
    // The 16 admitted stay open (until the STUN deadline); the rest are shut.
    let open = conns
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
            let mut b = [0u8; 1];
            let mut s = *s;
            matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
        })
        .count();
    assert_eq!(open, 16);
    // Another address still gets in.
    let mut other = connect_from([127, 0, 2, 2], tcp).expect("connects");
    other
        .set_read_timeout(Some(Duration::from_millis(300)))
        .ok();
    assert!(other.read(&mut [0u8; 1]).is_err(), "still open");
    assert_eq!(metric(http, "beep_sfu_tcp_connections"), Some(17.0));
    drop(conns);
}

#[test]
fn a_known_connection_whose_peer_is_gone_is_closed_within_seconds() {
    let server = start_with(|c| c.idle_timeout = Duration::from_secs(2));
    let http = server.http_addr();
    let mut peer = TestPeer::new_tcp("tcp-user", "c");
    peer.signal(http, OfferStyle::Raw).expect("signals");
    assert!(
        pump_until(&mut [&mut peer], Duration::from_secs(20), |ps| ps[0]
            .connected),
        "the TCP client connected"
    );
    assert_eq!(metric(http, "beep_sfu_tcp_connections"), Some(1.0));
    // The client goes quiet without closing its connection: its peer times
    // out on the server, and the connection it held must go with it.
    let start = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || metric(
            http,
            "beep_sfu_tcp_connections"
        ) == Some(0.0)),
        "the connection outlived its peer"
    );
    assert!(tcp_drops(http, "peer_gone") >= 1.0);
    let mut stream = peer.tcp_stream().expect("the client's connection");
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the server closed it ({:?} after going quiet)",
        start.elapsed()
    );
}

#[test]
fn caps_that_do_not_fit_the_fd_limit_stop_the_start_with_the_flag_to_change() {
    let bin = env!("CARGO_BIN_EXE_beep-sfu");
    let run = |extra: &str| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 2000 && exec {bin} --dev --listen 127.0.0.1:0 --udp 127.0.0.1:0 --tcp 127.0.0.1:0 --bites-dir none --spool-dir none {extra}"
            ))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs")
    };
    // Defaults: 256 + 1024 + 1024 lingering + 128 reserve > 2000.
    let out = run("").wait_with_output().expect("exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it refused to start");
    assert!(
        err.contains("lower --max-tcp-connections") && err.contains("may open 2000"),
        "{err}"
    );
    // Lower caps fit: it starts, and says what it has.
    let mut child = run("--max-tcp-connections 256");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr);
    let mut seen = String::new();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && !seen.contains("ready: http://") {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut lines, &mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("file descriptors: limit 2000"), "{seen}");
    assert!(seen.contains("ready: http://"), "{seen}");
}
