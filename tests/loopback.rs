//! The whole service over real loopback sockets: str0m peers speaking the
//! real WebSocket protocol and real UDP (ICE, DTLS, SRTP), a real HTTP server
//! standing in for the permissions service.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

/// Everyone talks in turn; returns nothing, asserts exact payload sequences.
fn talk_in_turn(peers: &mut [&mut TestPeer], packets: u32) {
    for i in 0..peers.len() {
        for n in 0..packets {
            peers[i].send(&payload(i as u8, n), -20);
            pump_for(peers, Duration::from_millis(20));
        }
        // Let the last packets land and the speaker go quiet.
        pump_for(peers, Duration::from_millis(1100));
    }
}

#[test]
fn three_peers_all_offer_styles_hear_each_other_through_permissions() {
    let perms = FakePermissions::start();
    let server = start(false, &perms.url());
    let http = server.http_addr();
    let mut a = TestPeer::new("ok-alice", "a1");
    let mut b = TestPeer::new("ok-bob", "b1");
    let mut c = TestPeer::new("ok-carol", "c1");
    connect_all(
        http,
        &mut [&mut a, &mut b, &mut c],
        &[OfferStyle::Raw, OfferStyle::Prefixed, OfferStyle::Json],
    );
    for p in [&a, &b, &c] {
        assert_eq!(join(http, &p.claim, "room-1").0, 200, "{} joins", p.name);
    }
    talk_in_turn(&mut [&mut a, &mut b, &mut c], 25);
    let all: Vec<u32> = (0..25).collect();
    for (i, p) in [&a, &b, &c].iter().enumerate() {
        let h = heard(p);
        assert!(!h.contains_key(&(i as u8)), "{} never hears itself", p.name);
        for j in (0..3u8).filter(|j| *j != i as u8) {
            assert_eq!(
                h.get(&j),
                Some(&all),
                "{} hears every packet of {j}, in order",
                p.name
            );
        }
        // The payload bytes are exactly what was sent, and every packet
        // names its speaker by CSRC.
        let users = ["ok-alice", "ok-bob", "ok-carol"];
        for g in &p.received {
            let n = u32::from_be_bytes([g.payload[1], g.payload[2], g.payload[3], g.payload[4]]);
            assert_eq!(g.payload, payload(g.payload[0], n));
            let speaker = users[g.payload[0] as usize];
            assert_eq!(g.csrc, vec![beep_sfu::sfu::speaker_csrc(speaker)]);
        }
    }
    assert_eq!(metric(http, "beep_sfu_peers_connected "), Some(3.0));
    assert!(metric(http, "beep_sfu_forwarded_packets_total ").unwrap_or(0.0) >= 150.0);
    let (status, body) = get(http, "/healthz");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["peers_connected"], 3);
    assert_eq!(v["conversations"], 1);
    assert!(server.shutdown(), "clean shutdown");
}

#[test]
fn join_outcomes_follow_the_permissions_service() {
    let perms = FakePermissions::start();
    let server = start(false, &perms.url());
    let http = server.http_addr();
    assert_eq!(join(http, &claim("ok-u", "c"), "conv").0, 200);
    let (status, _) = join(http, &claim("nobody", "c"), "conv");
    assert_eq!(status, 401, "401 from permissions means 401");
    let (status, _) = join(http, &claim("mallory", "c"), "conv");
    assert_eq!(status, 401, "403 (any non-200) from permissions means 401");
    let t = Instant::now();
    let (status, body) = join(http, &claim("hang-u", "c"), "conv");
    let took = t.elapsed();
    assert_eq!(status, 503, "a hanging permissions service fails closed");
    assert!(body.contains("permissions service unavailable"), "{body}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(9),
        "timeout honoured: {took:?}"
    );
    // Ids are percent-encoded into one path segment each.
    assert_eq!(join(http, &claim("../admin", "c"), "a%2Fb").0, 401);
    let paths = perms.paths.lock().unwrap().clone();
    assert!(
        paths.contains(&"/user/%2E%2E%2Fadmin/conversation/a%2Fb".to_string()),
        "{paths:?}"
    );
    // Claims and ids are checked before anything is asked.
    assert_eq!(join(http, "", "conv").0, 400);
    assert_eq!(join(http, "{not json", "conv").0, 400);
    assert_eq!(join(http, &claim("", "c"), "conv").0, 400);
    assert_eq!(join(http, &claim("ok-u", "c"), &"x".repeat(300)).0, 400);
    assert_eq!(
        http_raw(
            http,
            b"POST /join/ HTTP/1.1\r\nX-User-Claim: {\"userid\":\"ok\",\"clientid\":\"c\"}\r\n\r\n"
        )
        .0,
        400
    );
    assert_eq!(
        metric(
            http,
            "beep_sfu_permission_checks_total{reason=\"unavailable\"}"
        ),
        Some(1.0)
    );
    server.shutdown();

    // An unreachable permissions service is a 503 too.
    let dead = {
        // A port that was just free: nothing listens there any more.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = start(false, &format!("http://{dead}"));
    assert_eq!(join(server.http_addr(), &claim("ok-u", "c"), "conv").0, 503);
    server.shutdown();
}

#[test]
fn bad_input_gets_clear_errors_and_never_disturbs_a_call() {
    let server = start(true, "");
    let http = server.http_addr();
    let udp = server.udp_addr();
    let mut a = TestPeer::new("alice", "a");
    let mut b = TestPeer::new("bob", "b");
    connect_all(http, &mut [&mut a, &mut b], &[OfferStyle::Raw]);
    assert_eq!(join(http, &a.claim, "room").0, 200);
    assert_eq!(join(http, &b.claim, "room").0, 200);

    // HTTP garbage of every kind.
    assert_eq!(http_raw(http, b"\x16\x03\x01garbage\r\n\r\n").0, 400);
    assert_eq!(
        http_raw(http, b"GET /healthz HTTP/1.1\r\nHost").0,
        408,
        "truncated head: 408 after the request timeout"
    );
    let huge = format!("GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(http_raw(http, huge.as_bytes()).0, 431);
    let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
    assert_eq!(
        http_raw(
            http,
            format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes()
        )
        .0,
        431
    );
    assert_eq!(
        http_raw(
            http,
            b"POST /join/x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        )
        .0,
        413
    );
    assert_eq!(get(http, "/nope").0, 404);
    assert_eq!(http_raw(http, b"DELETE /join/x HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http_raw(http, b"POST /connect HTTP/1.1\r\n\r\n").0, 405);
    let (status, page) = get(http, "/");
    assert_eq!(status, 200, "dev mode serves the demo page");
    assert!(page.contains("<title>beep-sfu demo</title>"));

    // /connect refusals before the upgrade.
    assert_eq!(get(http, "/connect").0, 400, "no claim and no upgrade");
    let no_claim = http_raw(
        http,
        b"GET /connect HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(no_claim.0, 400);
    assert!(
        matches!(ws_connect(http, "{\"userid\":\"\",\"clientid\":\"x\"}"), Err(tungstenite::Error::Http(r)) if r.status() == 400)
    );
    assert!(
        matches!(ws_connect(http, "not json"), Err(tungstenite::Error::Http(r)) if r.status() == 400)
    );

    // WebSocket protocol misuse gets descriptive close codes.
    let cases: Vec<(Message, u16)> = vec![
        (Message::binary(vec![1, 2, 3]), 1003),
        (Message::text("hello"), 1007),
        (Message::text("v=0\r\nthis is not sdp"), 1007),
        (Message::text("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n"), 1007),
        (Message::text("ice::candidate:1 1 udp 1 127.0.0.1 9 typ host"), 1008),
        (Message::text("{\"type\":\"offer\"}"), 1007),
    ];
    for (msg, want) in cases {
        let mut ws = ws_connect(http, &claim("mallory", "m")).unwrap();
        let desc = format!("{msg:?}");
        ws.send(msg).unwrap();
        let (code, reason) = expect_close(&mut ws);
        assert_eq!(code, want, "{desc}: {reason}");
        assert!(!reason.is_empty(), "{desc}: a reason is given");
    }
    let mut ws = ws_connect(http, &claim("mallory", "m")).unwrap();
    ws.send(Message::text(format!("v=0\r\n{}", "a".repeat(200_000))))
        .unwrap();
    let (code, _) = expect_close(&mut ws);
    assert!(code == 1009 || code == 1007, "too big: {code}");

    // Random datagrams at the media port, from a stranger and with every first byte.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9E3779B97F4A7C15u64;
    for i in 0..3000u32 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 300) as usize;
        let mut d: Vec<u8> = (0..len)
            .map(|k| (seed.rotate_left(k as u32) & 0xff) as u8)
            .collect();
        if let Some(first) = d.first_mut() {
            *first = (i % 256) as u8;
        }
        let _ = stranger.send_to(&d, udp);
    }
    // A STUN-looking datagram with a bogus username, and one from a peer's own address.
    let _ = stranger.send_to(
        &[
            0, 1, 0, 8, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 6, 0, 3,
            b'a', b':', b'b', 0,
        ],
        udp,
    );
    let _ = a
        .socket
        .send_to(&[0x80, 0x6f, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 9, 9, 9], udp);

    // Wait until the server has read the flood, then check the call carries on.
    assert!(wait_for(Duration::from_secs(10), || metric(
        http,
        "beep_sfu_datagrams_in_total "
    )
    .unwrap_or(0.0)
        >= 3000.0));
    a.received.clear();
    b.received.clear();
    for n in 0..25 {
        a.send(&payload(0, n), -20);
        pump_for(&mut [&mut a, &mut b], Duration::from_millis(20));
    }
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(300));
    assert_eq!(
        heard(&b).get(&0),
        Some(&(0..25).collect::<Vec<u32>>()),
        "bob still hears alice"
    );
    assert!(
        metric(
            http,
            "beep_sfu_dropped_datagrams_total{reason=\"unknown_source\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        metric(
            http,
            "beep_sfu_dropped_datagrams_total{reason=\"malformed\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(get(http, "/healthz").0, 200);
    assert_eq!(metric(http, "beep_sfu_peers_connected "), Some(2.0));
    assert!(server.shutdown());
}

#[test]
fn dev_mode_accepts_query_claims_and_a_full_server_says_so() {
    init_log();
    let mut cfg = test_config(true, "");
    cfg.max_peers = 1;
    let server = beep_sfu::server::Server::start(&cfg).unwrap();
    let http = server.http_addr();
    // Query claims work in dev mode, for /join too.
    assert_eq!(
        http_raw(
            http,
            b"POST /join/room?userid=q&clientid=c HTTP/1.1\r\n\r\n"
        )
        .0,
        200
    );
    let mut a = TestPeer::new("a", "a");
    connect_all(http, &mut [&mut a], &[OfferStyle::Json]);
    // The second peer finds the server full.
    let mut b = TestPeer::new("b", "b");
    let err = b.signal(http, OfferStyle::Raw).unwrap_err();
    assert!(
        err.contains("1013") || err.contains("Again") || err.contains("peer limit"),
        "{err}"
    );
    assert!(server.shutdown());
}

#[test]
fn query_claims_are_refused_outside_dev_mode() {
    let perms = FakePermissions::start();
    let server = start(false, &perms.url());
    let http = server.http_addr();
    assert_eq!(
        http_raw(
            http,
            b"POST /join/room?userid=ok&clientid=c HTTP/1.1\r\n\r\n"
        )
        .0,
        400
    );
    let (status, body) = http_raw(http, b"GET /connect?userid=ok&clientid=c HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    assert_eq!(status, 400, "no upgrade without the claim header: {body}");
    assert!(body.contains("X-User-Claim"), "{body}");
    assert!(server.shutdown());
}

fn call_of_two(server: &beep_sfu::server::Server, a: &mut TestPeer, b: &mut TestPeer) {
    let http = server.http_addr();
    connect_all(http, &mut [&mut *a, &mut *b], &[OfferStyle::Raw]);
    assert_eq!(join(http, &a.claim, "room").0, 200);
    assert_eq!(join(http, &b.claim, "room").0, 200);
    talk_in_turn(&mut [&mut *a, &mut *b], 20);
    let all: Vec<u32> = (0..20).collect();
    assert_eq!(heard(b).get(&0), Some(&all), "{} hears {}", b.name, a.name);
    assert_eq!(heard(a).get(&1), Some(&all), "{} hears {}", a.name, b.name);
}

#[test]
fn a_call_over_ipv6_loopback() {
    init_log();
    let mut cfg = test_config(true, "");
    cfg.udp = "[::1]:0".parse().unwrap();
    cfg.public_ips = vec!["::1".parse().unwrap()];
    let server = beep_sfu::server::Server::start(&cfg).unwrap();
    assert!(server.udp_addr().is_ipv6());
    let mut a = TestPeer::new_on("::1", "alice", "a");
    let mut b = TestPeer::new_on("::1", "bob", "b");
    call_of_two(&server, &mut a, &mut b);
    assert!(server.shutdown());
}

#[test]
fn ipv4_and_ipv6_clients_share_one_dual_stack_socket() {
    init_log();
    let mut cfg = test_config(true, "");
    cfg.udp = "[::]:0".parse().unwrap();
    cfg.public_ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    let server = beep_sfu::server::Server::start(&cfg).unwrap();
    let mut v4 = TestPeer::new_on("127.0.0.1", "alice", "v4");
    let mut v6 = TestPeer::new_on("::1", "bob", "v6");
    call_of_two(&server, &mut v4, &mut v6);
    assert!(server.shutdown());
}

#[test]
fn clients_over_tcp_only_connect_join_and_hear_each_other() {
    let server = start(true, "");
    let http = server.http_addr();
    let mut a = TestPeer::new_tcp("alice", "tcp");
    let mut b = TestPeer::new_tcp("bob", "tcp");
    let mut c = TestPeer::new("carol", "udp");
    connect_all(http, &mut [&mut a, &mut b, &mut c], &[OfferStyle::Json]);
    for p in [&a, &b, &c] {
        assert_eq!(join(http, &p.claim, "room").0, 200);
    }
    assert_eq!(metric(http, "beep_sfu_tcp_connections "), Some(2.0));
    talk_in_turn(&mut [&mut a, &mut b, &mut c], 20);
    let all: Vec<u32> = (0..20).collect();
    for (i, p) in [&a, &b, &c].iter().enumerate() {
        let h = heard(p);
        for j in (0..3u8).filter(|j| *j != i as u8) {
            assert_eq!(
                h.get(&j),
                Some(&all),
                "{} hears {j} over its transport",
                p.name
            );
        }
        for g in &p.received {
            let n = u32::from_be_bytes([g.payload[1], g.payload[2], g.payload[3], g.payload[4]]);
            assert_eq!(g.payload, payload(g.payload[0], n), "byte-exact");
        }
    }
    assert!(metric(http, "beep_sfu_tcp_frames_in_total ").unwrap_or(0.0) > 40.0);
    assert!(server.shutdown());
}

#[test]
fn a_tcp_client_that_stops_reading_is_dropped_and_a_udp_call_goes_on() {
    let server = start(true, "");
    let http = server.http_addr();
    let mut slow = TestPeer::new_tcp("slow", "tcp");
    let mut talker = TestPeer::new("talker", "udp");
    let mut listener = TestPeer::new("listener", "udp");
    connect_all(
        http,
        &mut [&mut slow, &mut talker, &mut listener],
        &[OfferStyle::Raw],
    );
    for p in [&slow, &talker, &listener] {
        assert_eq!(join(http, &p.claim, "room").0, 200);
    }
    // The TCP client stops reading; the talker sends 1,200-byte packets
    // (60 KB/s) that the server must queue for it.
    slow.tcp_mut().unwrap().stalled = true;
    let mut sent = 0u32;
    let dropped =
        |http| metric(http, "beep_sfu_tcp_drops_total{reason=\"slow_reader\"}").unwrap_or(0.0);
    let end = Instant::now() + Duration::from_secs(40);
    while dropped(http) < 1.0 {
        assert!(Instant::now() < end, "the slow reader was never dropped");
        for _ in 0..10 {
            let mut p = payload(1, sent);
            p.resize(1_200, 0x5A);
            talker.send(&p, -20);
            sent += 1;
            pump_for(
                &mut [&mut slow, &mut talker, &mut listener],
                Duration::from_millis(20),
            );
        }
    }
    pump_for(
        &mut [&mut slow, &mut talker, &mut listener],
        Duration::from_millis(300),
    );
    let got = heard(&listener).get(&1).cloned().unwrap_or_default();
    assert_eq!(
        got,
        (0..sent).collect::<Vec<_>>(),
        "the UDP listener heard all {sent} packets"
    );
    assert_eq!(metric(http, "beep_sfu_tcp_connections "), Some(0.0));
    assert!(server.shutdown());
}

/// RED over real UDP and SRTP: a plain speaker, a RED listener losing 10 %
/// of its media at random, and a plain listener; the RED listener rebuilds
/// every packet that it or one of the next two carried, the plain one gets
/// plain Opus, and the metrics count the RED writes.
#[test]
fn red_over_real_udp_rebuilds_what_a_lossy_downlink_lost() {
    let perms = FakePermissions::start();
    let server = start(false, &perms.url());
    let http = server.http_addr();
    let mut s = TestPeer::new("ok-speaker", "s");
    let mut r = TestPeer::with_red("127.0.0.1", "ok-red", "r", true);
    let mut p = TestPeer::new("ok-plain", "p");
    connect_all(http, &mut [&mut s, &mut r, &mut p], &[OfferStyle::Raw]);
    for peer in [&s, &r, &p] {
        assert_eq!(join(http, &peer.claim, "room").0, 200);
    }
    let red_pt = *r.rtc.red_pt().expect("the answer carries RED");
    let opus_pt = *p.rtc.opus_pt().unwrap();
    assert_eq!(
        p.rtc.red_pt(),
        None,
        "no RED for a client that did not offer it"
    );
    r.loss = Some(RandomLoss::new(10, 0x10_55));
    const N: u32 = 300;
    for n in 0..N {
        s.send(&payload(0, n), -20);
        pump_for(&mut [&mut s, &mut r, &mut p], Duration::from_millis(20));
    }
    pump_until(
        &mut [&mut s, &mut r, &mut p],
        Duration::from_secs(5),
        |ps| {
            ps[2].received.len() >= N as usize
                && ps[1].received.len() + ps[1].loss.as_ref().unwrap().lost.len() >= N as usize
        },
    );
    // The plain listener: every packet, plain Opus, as sent.
    assert_eq!(p.received.len(), N as usize);
    for (n, g) in p.received.iter().enumerate() {
        assert_eq!((g.pt, &g.payload), (opus_pt, &payload(0, n as u32)));
    }
    // The RED listener: rebuild by timestamp from every block.
    let lost = &r.loss.as_ref().unwrap().lost;
    assert!(!lost.is_empty());
    let first = r.received.iter().min_by_key(|g| g.seq).unwrap();
    let (seq0, ts0) = (first.seq, first.timestamp);
    let mut rebuilt = std::collections::HashMap::new();
    for g in &r.received {
        assert_eq!(g.pt, red_pt, "RED on every packet");
        for b in str0m::rtp::RedDecoder::decode(&g.payload).expect("valid RED") {
            rebuilt.insert(
                g.timestamp.wrapping_sub(b.timestamp_offset),
                b.payload.to_vec(),
            );
        }
    }
    let arrived = |n: u32| !lost.contains(&((seq0 + u64::from(n)) as u16));
    let mut heard = 0;
    for n in 0..N - 2 {
        let got = rebuilt.get(&ts0.wrapping_add(960 * n));
        if arrived(n) || arrived(n + 1) || arrived(n + 2) {
            assert_eq!(got, Some(&payload(0, n)), "packet {n} rebuilt");
            heard += 1;
        } else {
            assert_eq!(got, None);
        }
    }
    assert!(heard >= (N - 2) * 99 / 100, "{heard} of {} rebuilt", N - 2);
    // The metrics follow the core's counters once a second or so.
    let written = || metric(http, "beep_sfu_red_packets_written_total ").unwrap_or(0.0);
    let end = Instant::now() + Duration::from_secs(10);
    while written() < f64::from(N) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(written(), f64::from(N), "one RED write per packet");
    assert!(server.shutdown(), "clean shutdown");
}
