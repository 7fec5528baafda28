//! Hostile and broken clients over real loopback sockets: none of them can
//! hold signalling, crowd out other users, or disturb another call.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

fn start_with(f: impl FnOnce(&mut beep_sfu::config::Config)) -> beep_sfu::server::Server {
    init_log();
    let mut cfg = test_config(true, "");
    f(&mut cfg);
    beep_sfu::server::Server::start(&cfg).expect("server starts")
}

/// Opens a connection and sends one byte of a request head every `every`
/// until the server closes it; returns how long it was held.
fn trickle(addr: SocketAddr, every: Duration) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(every)).unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nX-Slow: ";
    let mut buf = [0u8; 512];
    for i in 0.. {
        let byte = head.get(i).copied().unwrap_or(b'a');
        if s.write_all(&[byte]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(_) => break, // the server answered (408) or closed
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "held for a minute"
        );
    }
    start.elapsed()
}

#[test]
fn a_client_trickling_a_head_is_cut_off_at_the_deadline_while_probes_are_answered() {
    let server = start_with(|c| {
        c.max_signalling = 4;
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let http = server.http_addr();
    let admin = server.admin_addr().expect("admin listener");
    // Four slow clients take every signalling slot, one byte every 500 ms.
    let slow: Vec<_> = (0..4)
        .map(|_| thread::spawn(move || trickle(http, Duration::from_millis(500))))
        .collect();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(get(http, "/healthz").0, 503, "the public pool is full");
    let (status, body) = get(admin, "/healthz");
    assert_eq!(status, 200, "the admin listener answers: {body}");
    assert!(body.contains("\"loop_age_ms\""), "{body}");
    assert_eq!(get(admin, "/metrics").0, 200);
    assert_eq!(get(admin, "/connect").0, 404, "admin serves probes only");
    for t in slow {
        let held = t.join().unwrap();
        assert!(
            held < Duration::from_secs(13),
            "a trickled head is cut off at the 10 s deadline, held {held:?}"
        );
    }
    assert!(wait_for(Duration::from_secs(2), || get(http, "/healthz").0 == 200));
    assert!(server.shutdown());
}

#[test]
fn a_candidate_flood_is_closed_and_another_clients_connect_and_join_still_work() {
    let server = start_with(|_| {});
    let http = server.http_addr();
    // Ten flooders: each connects, then sends candidates without end.
    let flooders: Vec<_> = (0..10)
        .map(|i| {
            thread::spawn(move || {
                let mut p = TestPeer::new(&format!("flood{i}"), "f");
                p.signal(http, OfferStyle::Prefixed).unwrap();
                let mut ws = p.ws.take().unwrap();
                ws.get_mut()
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut sent = 0;
                for n in 0..10_000 {
                    let c = format!(
                        "ice::candidate:{n} 1 udp 1 127.0.0.{} 9 typ host",
                        n % 250 + 1
                    );
                    if ws.send(Message::text(c)).is_err() {
                        break;
                    }
                    sent += 1;
                }
                let _ = sent;
                expect_close(&mut ws)
            })
        })
        .collect();
    // Meanwhile a real call connects and joins.
    let mut a = TestPeer::new("alice", "a");
    let mut b = TestPeer::new("bob", "b");
    connect_all(http, &mut [&mut a, &mut b], &[OfferStyle::Json]);
    assert_eq!(join(http, &a.claim, "room").0, 200);
    assert_eq!(join(http, &b.claim, "room").0, 200);
    for f in flooders {
        let (code, reason) = f.join().unwrap();
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("candidates"), "{reason}");
    }
    for n in 0..20u32 {
        a.send(&payload(1, n), -20);
        pump_for(&mut [&mut a, &mut b], Duration::from_millis(20));
    }
    assert!(wait_for_heard(&mut a, &mut b, 20));
    assert!(server.shutdown());
}

fn wait_for_heard(a: &mut TestPeer, b: &mut TestPeer, n: usize) -> bool {
    pump_until(&mut [a, b], Duration::from_secs(5), |ps| {
        heard(ps[1]).get(&1).map_or(0, Vec::len) >= n
    })
}

#[test]
fn a_media_flood_from_one_peer_leaves_another_call_whole() {
    let server = start_with(|_| {});
    let http = server.http_addr();
    let mut flooder = TestPeer::new("flooder", "f");
    let mut victim = TestPeer::new("victim", "v");
    let mut c = TestPeer::new("carol", "c");
    let mut d = TestPeer::new("dave", "d");
    connect_all(
        http,
        &mut [&mut flooder, &mut victim, &mut c, &mut d],
        &[OfferStyle::Raw],
    );
    for (p, conv) in [
        (&flooder, "flood"),
        (&victim, "flood"),
        (&c, "calm"),
        (&d, "calm"),
    ] {
        assert_eq!(join(http, &p.claim, conv).0, 200);
    }
    // Carol talks at the real rate while the flooder sends 60 packets per
    // 20 ms of 1,200 bytes (3,000 packets/s, 3.6 MB/s).
    let mut latencies = Vec::new();
    for n in 0..50u32 {
        for k in 0..60u32 {
            let mut big = payload(9, n * 60 + k);
            big.resize(1_200, 0xAB);
            flooder.send(&big, -10);
        }
        let sent = Instant::now();
        c.send(&payload(3, n), -20);
        let before = d.received.len();
        pump_until(
            &mut [&mut flooder, &mut victim, &mut c, &mut d],
            Duration::from_millis(20),
            |ps| ps[3].received.len() > before,
        );
        if d.received.len() > before {
            latencies.push(sent.elapsed());
        }
        pump_for(
            &mut [&mut flooder, &mut victim, &mut c, &mut d],
            Duration::from_millis(5),
        );
    }
    pump_for(
        &mut [&mut flooder, &mut victim, &mut c, &mut d],
        Duration::from_millis(300),
    );
    let got = heard(&d).get(&3).cloned().unwrap_or_default();
    assert_eq!(
        got,
        (0..50).collect::<Vec<_>>(),
        "dave hears every packet of carol, in order"
    );
    latencies.sort();
    if let Some(p50) = latencies.get(latencies.len() / 2) {
        eprintln!(
            "calm call under a flood: {} of 50 within 20 ms, median {:?}",
            latencies.len(),
            p50
        );
    }
    let flood_heard = victim.received.len();
    assert!(
        flood_heard < 1_000,
        "the flood is cut to the budget: the victim got {flood_heard} of 3,000"
    );
    let dropped = metric(
        http,
        "beep_sfu_dropped_datagrams_total{reason=\"over_packet_rate\"}",
    )
    .unwrap_or(0.0)
        + metric(
            http,
            "beep_sfu_dropped_datagrams_total{reason=\"over_byte_rate\"}",
        )
        .unwrap_or(0.0);
    assert!(dropped > 1_000.0, "the excess is counted: {dropped}");
    assert!(server.shutdown());
}

#[test]
fn an_oversized_frame_gets_its_close_code_not_a_reset() {
    let server = start_with(|_| {});
    let http = server.http_addr();
    let mut ws = ws_connect(http, &claim("big", "b")).unwrap();
    ws.get_mut()
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 10 MB in one text frame: far over the 65 KiB limit.
    let _ = ws.send(Message::text("v".repeat(10 << 20)));
    let (code, reason) = expect_close(&mut ws);
    assert_eq!(code, 1009, "{reason}");
    assert!(server.shutdown());
}

#[test]
fn two_claim_headers_origins_and_per_ip_limits_are_enforced() {
    let server = start_with(|c| {
        c.allowed_origins = vec!["https://app.beep.example".into()];
        c.max_signalling_per_ip = 2;
    });
    let http = server.http_addr();
    // Two idle connections from 127.0.0.1 take its share; a third is refused.
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(http).unwrap()).collect();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(get(http, "/healthz").0, 503);
    drop(idle);
    assert!(wait_for(Duration::from_secs(3), || get(http, "/healthz").0 == 200));
    let two = format!(
        "POST /join/room HTTP/1.1\r\nX-User-Claim: {}\r\nX-User-Claim: {}\r\nContent-Length: 0\r\n\r\n",
        claim("alice", "a"),
        claim("mallory", "m")
    );
    let (status, body) = http_raw(http, two.as_bytes());
    assert_eq!(status, 400);
    assert!(body.contains("more than one X-User-Claim"), "{body}");

    let with_origin = |origin: Option<&str>| {
        let mut req = format!("ws://{http}/connect")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("X-User-Claim", claim("o", "o").parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        let stream = TcpStream::connect(http).unwrap();
        match tungstenite::client(req, stream) {
            Ok(_) => 101,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                r.status().as_u16()
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(with_origin(Some("https://evil.example")), 403);
    assert_eq!(with_origin(Some("https://app.beep.example")), 101);
    assert_eq!(with_origin(None), 101, "no Origin: not a browser");

    assert!(server.shutdown());
}

#[test]
fn endless_continuation_frames_cannot_hold_a_session_past_its_deadline() {
    let server = start_with(|c| c.connect_timeout = Duration::from_secs(2));
    let http = server.http_addr();
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let upgrade = format!(
        "GET /connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-User-Claim: {}\r\n\r\n",
        claim("slow", "s")
    );
    s.write_all(upgrade.as_bytes()).unwrap();
    let start = Instant::now();
    // A text frame without FIN, then empty continuation frames every 20 ms
    // (masked, as a client must), faster than the server's socket read
    // timeout: the message never completes and no read ever times out.
    let mut frame = vec![0x01u8, 0x80 | 1, 1, 2, 3, 4, b'v' ^ 1];
    let continuation = [0x00u8, 0x80, 9, 9, 9, 9];
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while start.elapsed() < Duration::from_secs(8) {
        if !frame.is_empty() {
            let _ = s.write_all(&frame);
            frame.clear();
        } else if s.write_all(&continuation).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        thread::sleep(Duration::from_millis(20));
    }
    let held = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // The close frame: 0x88, length, then the code 4408 (0x1138).
    let close = got.windows(2).position(|w| w == [0x11, 0x38]);
    assert!(close.is_some(), "closed with 4408: {got:?}");
    assert!(
        held < Duration::from_secs(6),
        "closed at the 2 s deadline, held {held:?}"
    );
    assert!(server.shutdown());
}

#[test]
fn a_tcp_connection_flooding_garbage_frames_cannot_starve_a_udp_call() {
    let server = start_with(|_| {});
    let http = server.http_addr();
    let tcp = server.tcp_addr().expect("ICE-TCP is served by default");
    let mut talker = TestPeer::new("talker", "t");
    let mut listener = TestPeer::new("listener", "l");
    connect_all(http, &mut [&mut talker, &mut listener], &[OfferStyle::Raw]);
    assert_eq!(join(http, &talker.claim, "room").0, 200);
    assert_eq!(join(http, &listener.claim, "room").0, 200);
    // Two connections write well-formed RFC 4571 frames of junk as fast as
    // the kernel takes them, for as long as the call below lasts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut frame = vec![0x05, 0xD0];
                frame.extend(std::iter::repeat_n(0x80u8, 0x5D0));
                let burst: Vec<u8> = frame
                    .iter()
                    .copied()
                    .cycle()
                    .take(frame.len() * 40)
                    .collect();
                let mut sent = 0usize;
                // The server closes a connection at its first junk frame:
                // the attacker connects again, for as long as the call lasts.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(tcp) else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if s.write_all(&burst).is_err() {
                            break;
                        }
                        sent += burst.len();
                    }
                }
                sent
            })
        })
        .collect();
    for n in 0..50u32 {
        talker.send(&payload(1, n), -20);
        pump_for(&mut [&mut talker, &mut listener], Duration::from_millis(20));
    }
    pump_for(
        &mut [&mut talker, &mut listener],
        Duration::from_millis(300),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded: usize = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    let got = heard(&listener).get(&1).cloned().unwrap_or_default();
    assert_eq!(
        got,
        (0..50).collect::<Vec<_>>(),
        "every packet, in order, under {flooded} bytes of TCP junk"
    );
    assert!(
        flooded > 1_000_000,
        "the flood really flowed: {flooded} bytes"
    );
    assert!(server.shutdown());
}

/// A client refused at the connection limit reads the 503 (and its
/// Retry-After) even when it sent its whole request before we answered: the
/// server must not close with the request unread, which resets the
/// connection and loses the answer.
#[test]
fn a_refused_client_reads_its_503_instead_of_a_reset() {
    let server = start_with(|c| c.max_signalling = 1);
    let http = server.http_addr();
    // One connection that sends nothing holds the only slot for the 10 s
    // head deadline.
    let _holder = TcpStream::connect(http).unwrap();
    thread::sleep(Duration::from_millis(200));
    let pad = "x".repeat(8 * 1024);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let pad = pad.clone();
            thread::spawn(move || -> Result<String, String> {
                let mut s = TcpStream::connect(http).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let req = format!(
                    "GET /connect?userid=u{i}&clientid=c HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n"
                );
                // Written before the answer is read, as every HTTP client does;
                // the server refuses at accept without reading any of it.
                s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
                thread::sleep(Duration::from_millis(100));
                let mut resp = Vec::new();
                s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
                Ok(String::from_utf8_lossy(&resp).into_owned())
            })
        })
        .collect();
    let mut resets = Vec::new();
    for c in clients {
        match c.join().unwrap() {
            Ok(resp) => {
                assert!(resp.starts_with("HTTP/1.1 503"), "got {resp:?}");
                assert!(resp.contains("Retry-After: 1"), "got {resp:?}");
            }
            Err(e) => resets.push(e),
        }
    }
    assert!(resets.is_empty(), "refused clients saw {resets:?}");
}
