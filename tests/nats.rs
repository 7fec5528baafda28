//! Bites over a real `nats-server`: what arrives on `bite` and `store`, and
//! what happens when NATS dies mid-conversation and comes back.

#![allow(deprecated)] // the synchronous `nats` crate, used here as a subscriber

mod common;

use std::io::Cursor;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use ogg::reading::PacketReader;
use prost::Message as _;

use beep_sfu::proto::{Bite, Store};

/// A valid 20 ms mono CELT packet header (TOC 0xF8) followed by who sent it
/// and its number.
fn opus_payload(sender: u8, n: u32) -> Vec<u8> {
    let mut p = vec![0xAB; 80];
    p[0] = 0xF8;
    p[1] = sender;
    p[2..6].copy_from_slice(&n.to_be_bytes());
    p
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The Opus packets of an Ogg Opus file, after checking its headers, and the
/// final granule position.
fn ogg_packets(data: &[u8]) -> (Vec<Vec<u8>>, u64) {
    let mut r = PacketReader::new(Cursor::new(data.to_vec()));
    let head = r.read_packet_expected().expect("OpusHead");
    assert_eq!(&head.data[..8], b"OpusHead");
    let tags = r.read_packet_expected().expect("OpusTags");
    assert_eq!(&tags.data[..8], b"OpusTags");
    let mut packets = Vec::new();
    let mut granule = 0;
    let mut eos = false;
    while let Some(p) = r.read_packet().expect("valid pages and CRCs") {
        granule = p.absgp_page();
        eos |= p.last_in_stream();
        packets.push(p.data);
    }
    assert!(eos, "the stream ends with an end-of-stream page");
    (packets, granule)
}

/// A JetStream stream capturing both subjects, so a test can read back
/// everything published, whenever its reader connects.
fn create_stream(url: &str) {
    let nc = nats::connect(url).expect("nats connects");
    nats::jetstream::new(nc)
        .add_stream(nats::jetstream::StreamConfig {
            name: "BITES".into(),
            subjects: vec!["bite".into(), "store".into()],
            ..Default::default()
        })
        .expect("stream created");
}

/// Alice and Bob, connected and joined to "room".
fn alice_and_bob_in_room(http: std::net::SocketAddr, style: OfferStyle) -> (TestPeer, TestPeer) {
    let mut a = TestPeer::new("alice", "a");
    let mut b = TestPeer::new("bob", "b");
    connect_all(http, &mut [&mut a, &mut b], &[style]);
    assert_eq!(join(http, &a.claim, "room").0, 200);
    assert_eq!(join(http, &b.claim, "room").0, 200);
    (a, b)
}

/// Waits (5 s at most) until the NATS backlog holds `n` bites.
fn backlog_reaches(http: std::net::SocketAddr, n: u32) -> bool {
    wait_for(Duration::from_secs(5), || {
        metric(http, "beep_sfu_bite_backlog ") == Some(f64::from(n))
    })
}

/// Waits until the BITES stream holds `n` messages.
fn stream_reaches(url: &str, n: u64, timeout: Duration) -> bool {
    wait_for(timeout, || {
        nats::connect(url)
            .ok()
            .and_then(|nc| nats::jetstream::new(nc).stream_info("BITES").ok())
            .is_some_and(|i| i.state.messages == n)
    })
}

/// The server in dev mode, publishing to `url`.
fn server_with_nats(url: &str) -> beep_sfu::server::Server {
    init_log();
    let mut cfg = test_config(true, "");
    cfg.nats = Some(url.to_string());
    beep_sfu::server::Server::start(&cfg).unwrap()
}

fn talk(peers: &mut [&mut TestPeer], who: usize, sender: u8, range: std::ops::Range<u32>) {
    for n in range {
        peers[who].send(&opus_payload(sender, n), -20);
        pump_for(peers, Duration::from_millis(20));
    }
}

#[test]
fn every_talk_spurt_arrives_on_bite_and_store_as_ogg_opus() {
    let nats = NatsServer::start();
    let sub = nats::connect(nats.url().as_str()).expect("subscriber connects");
    let bites = sub.subscribe("bite").unwrap();
    let stores = sub.subscribe("store").unwrap();
    sub.flush().unwrap();

    let server = server_with_nats(&nats.url());
    let http = server.http_addr();
    let mut a = TestPeer::new("alice", "phone");
    let mut b = TestPeer::new("bob", "laptop");
    connect_all(http, &mut [&mut a, &mut b], &[OfferStyle::Raw]);
    assert_eq!(join(http, &a.claim, "room-7").0, 200);
    assert_eq!(join(http, &b.claim, "room-7").0, 200);

    let before = unix_ms();
    talk(&mut [&mut a, &mut b], 0, 1, 0..50);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(1000));
    let middle = unix_ms();
    talk(&mut [&mut a, &mut b], 1, 2, 0..30);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(1000));

    let mut got: Vec<Bite> = Vec::new();
    for _ in 0..2 {
        let m = bites
            .next_timeout(Duration::from_secs(10))
            .expect("a bite on `bite`");
        got.push(Bite::decode(m.data.as_slice()).expect("Bite decodes"));
    }
    let mut stored: Vec<Store> = Vec::new();
    for _ in 0..2 {
        let m = stores
            .next_timeout(Duration::from_secs(10))
            .expect("a bite on `store`");
        stored.push(Store::decode(m.data.as_slice()).expect("Store decodes"));
    }
    assert!(
        bites.next_timeout(Duration::from_millis(500)).is_err(),
        "exactly one bite per spurt"
    );

    let (alice, bob) = (&got[0], &got[1]);
    assert_eq!(alice.key, "room-7");
    let c = alice.client.as_ref().unwrap();
    assert_eq!((c.key.as_str(), c.client.as_str()), ("alice", "phone"));
    assert!(
        alice.start >= before && alice.start <= before + 1000,
        "start {} in [{before}, +1s]",
        alice.start
    );
    let (packets, granule) = ogg_packets(&alice.data);
    assert_eq!(
        packets,
        (0..50).map(|n| opus_payload(1, n)).collect::<Vec<_>>()
    );
    assert_eq!(
        granule,
        312 + 50 * 960,
        "granules follow the RTP clock at 48 kHz"
    );

    assert_eq!(bob.client.as_ref().unwrap().key, "bob");
    assert!(bob.start >= middle);
    let (packets, _) = ogg_packets(&bob.data);
    assert_eq!(
        packets,
        (0..30).map(|n| opus_payload(2, n)).collect::<Vec<_>>()
    );

    for (s, b) in stored.iter().zip(&got) {
        assert_eq!(s.r#type, "bite");
        assert_eq!(s.bite.as_ref(), Some(b));
    }
    assert_eq!(metric(http, "beep_sfu_bites_published_total "), Some(2.0));
    assert_eq!(metric(http, "beep_sfu_nats_connected "), Some(1.0));

    // Shutdown in mid-sentence: the open bite is finished and reaches NATS
    // before the process would exit.
    talk(&mut [&mut a, &mut b], 0, 3, 0..10);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(100));
    assert!(server.shutdown());
    let m = bites
        .next_timeout(Duration::from_secs(5))
        .expect("the cut-off bite on `bite`");
    let last = Bite::decode(m.data.as_slice()).unwrap();
    let (packets, _) = ogg_packets(&last.data);
    assert_eq!(
        packets,
        (0..10).map(|n| opus_payload(3, n)).collect::<Vec<_>>()
    );
}

#[test]
fn bites_spoken_while_nats_is_down_arrive_after_it_returns_in_order_once() {
    let mut nats = NatsServer::start();
    create_stream(&nats.url());
    let stream_len = |url: &str| -> u64 {
        nats::connect(url)
            .ok()
            .and_then(|nc| nats::jetstream::new(nc).stream_info("BITES").ok())
            .map(|i| i.state.messages)
            .unwrap_or(0)
    };

    let server = server_with_nats(&nats.url());
    let http = server.http_addr();
    assert!(wait_for(Duration::from_secs(10), || metric(
        http,
        "beep_sfu_nats_connected "
    ) == Some(1.0)));
    let (mut a, mut b) = alice_and_bob_in_room(http, OfferStyle::Prefixed);

    // Bite 1 while NATS is up.
    talk(&mut [&mut a, &mut b], 0, 1, 0..25);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    assert!(wait_for(Duration::from_secs(10), || stream_len(
        &nats.url()
    ) == 2));

    nats.kill();
    assert!(wait_for(Duration::from_secs(10), || metric(
        http,
        "beep_sfu_nats_connected "
    ) == Some(0.0)));
    // Bites 2..4 during the outage; the call keeps working.
    b.received.clear();
    for k in 1..4u32 {
        talk(&mut [&mut a, &mut b], 0, 1, k * 100..k * 100 + 25);
        pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    }
    assert_eq!(
        b.received.len(),
        75,
        "bob hears alice throughout the outage"
    );
    assert!(wait_for(Duration::from_secs(5), || metric(
        http,
        "beep_sfu_bite_backlog "
    ) == Some(3.0)));

    nats.restart();
    assert!(
        wait_for(Duration::from_secs(20), || stream_len(&nats.url()) >= 8),
        "the backlog reaches NATS after it returns"
    );
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(500));
    let nc = nats::connect(nats.url().as_str()).unwrap();
    let js = nats::jetstream::new(nc);
    let info = js.stream_info("BITES").unwrap();
    assert_eq!(
        info.state.messages, 8,
        "every bite once on each subject, none twice"
    );
    let mut firsts = Vec::new();
    for seq in info.state.first_seq..=info.state.last_seq {
        let m = js.get_message("BITES", seq).unwrap();
        let bite = if m.subject == "bite" {
            Bite::decode(m.data.as_slice()).unwrap()
        } else {
            assert_eq!(m.subject, "store");
            Store::decode(m.data.as_slice()).unwrap().bite.unwrap()
        };
        let (packets, _) = ogg_packets(&bite.data);
        assert_eq!(packets.len(), 25);
        firsts.push((
            m.subject.clone(),
            u32::from_be_bytes([packets[0][2], packets[0][3], packets[0][4], packets[0][5]]),
        ));
    }
    let want: Vec<(String, u32)> = [0u32, 100, 200, 300]
        .iter()
        .flat_map(|n| [("bite".to_string(), *n), ("store".to_string(), *n)])
        .collect();
    assert_eq!(firsts, want, "in order, bite before store");
    assert!(server.shutdown());
}

#[test]
fn nats_down_at_start_gets_the_bites_once_it_comes_up() {
    // Prepare a stream capturing both subjects, then take NATS away before
    // beep-sfu starts (the stream is restored from disk when it returns).
    let mut nats = NatsServer::start();
    create_stream(&nats.url());
    nats.kill();

    let server = server_with_nats(&nats.url());
    let http = server.http_addr();
    let (mut a, mut b) = alice_and_bob_in_room(http, OfferStyle::Json);
    talk(&mut [&mut a, &mut b], 0, 1, 0..25);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    assert!(backlog_reaches(http, 1));
    assert_ne!(metric(http, "beep_sfu_nats_connected "), Some(1.0));

    nats.restart();
    let delivered = stream_reaches(&nats.url(), 2, Duration::from_secs(20));
    assert!(
        delivered,
        "the bite spoken before NATS ever came up arrives"
    );
    assert!(backlog_reaches(http, 0));
    assert!(server.shutdown());
}

#[test]
fn shutdown_with_nats_down_spools_and_the_next_start_publishes_each_bite_once() {
    let mut nats = NatsServer::start();
    create_stream(&nats.url());
    nats.kill();
    let spool = std::env::temp_dir().join(format!("beep-sfu-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let url = nats.url();
    let start = |spool: &std::path::Path| {
        init_log();
        let mut cfg = test_config(true, "");
        cfg.nats = Some(url.clone());
        cfg.spool_dir = Some(spool.to_path_buf());
        beep_sfu::server::Server::start(&cfg).unwrap()
    };

    // Two bites while NATS is down: one finished by silence, one cut off by
    // the shutdown itself.
    let server = start(&spool);
    let http = server.http_addr();
    let (mut a, mut b) = alice_and_bob_in_room(http, OfferStyle::Raw);
    talk(&mut [&mut a, &mut b], 0, 1, 0..20);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    talk(&mut [&mut a, &mut b], 1, 2, 0..15);
    assert!(server.shutdown());
    let spooled = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
    assert_eq!(spooled, 2, "both bites are in the spool");

    // NATS is back; the next start publishes them, once, and empties the spool.
    nats.restart();
    let server = start(&spool);
    let delivered = stream_reaches(&nats.url(), 4, Duration::from_secs(20));
    assert!(delivered, "two bites, each on `bite` and `store`");
    assert!(wait_for(Duration::from_secs(5), || std::fs::read_dir(
        &spool
    )
    .map(|d| d.count())
    .unwrap_or(0)
        == 0));
    std::thread::sleep(Duration::from_millis(500));
    let info = nats::jetstream::new(nats::connect(nats.url().as_str()).unwrap())
        .stream_info("BITES")
        .unwrap();
    assert_eq!(info.state.messages, 4, "nothing published twice");
    // The bites are the ones spoken: alice's 20 packets and bob's 15.
    let js = nats::jetstream::new(nats::connect(nats.url().as_str()).unwrap());
    let mut packets = Vec::new();
    for seq in 1..=4 {
        let m = js.get_message("BITES", seq).expect("stored message");
        if m.subject == "bite" {
            let bite = Bite::decode(m.data.as_slice()).unwrap();
            packets.push(ogg_packets(&bite.data).0.len());
        }
    }
    packets.sort();
    assert_eq!(packets, vec![15, 20]);
    assert!(server.shutdown());
    let _ = std::fs::remove_dir_all(&spool);
}

#[test]
fn with_jetstream_a_bite_stays_in_the_backlog_until_the_server_acknowledges_it() {
    let nats = NatsServer::start();
    init_log();
    let mut cfg = test_config(true, "");
    cfg.nats = Some(nats.url());
    cfg.nats_jetstream = true;
    let server = beep_sfu::server::Server::start(&cfg).unwrap();
    let http = server.http_addr();
    let (mut a, mut b) = alice_and_bob_in_room(http, OfferStyle::Raw);
    talk(&mut [&mut a, &mut b], 0, 1, 0..25);
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    // No stream captures the subjects yet: plain publishing would lose the
    // bite; JetStream gets no acknowledgement, so it is kept.
    assert!(backlog_reaches(http, 1));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric(http, "beep_sfu_bite_backlog "),
        Some(1.0),
        "still kept"
    );
    create_stream(&nats.url());
    let delivered = stream_reaches(&nats.url(), 2, Duration::from_secs(20));
    assert!(
        delivered,
        "published once the stream exists: bite and store"
    );
    assert!(backlog_reaches(http, 0));
    assert!(server.shutdown());
}

#[test]
fn a_bite_over_the_servers_max_payload_is_split_not_lost() {
    let nats = NatsServer::start_with_config(Some("max_payload: 16384\n"));
    let sub = nats::connect(nats.url().as_str()).expect("subscriber connects");
    let bites = sub.subscribe("bite").unwrap();
    sub.flush().unwrap();
    let server = server_with_nats(&nats.url());
    let http = server.http_addr();
    let (mut a, mut b) = alice_and_bob_in_room(http, OfferStyle::Raw);
    // 40 packets of 1,000 bytes: one talk spurt of about 40 KB.
    for n in 0..40u32 {
        let mut p = opus_payload(1, n);
        p.resize(1_000, 0x55);
        a.send(&p, -20);
        pump_for(&mut [&mut a, &mut b], Duration::from_millis(20));
    }
    pump_for(&mut [&mut a, &mut b], Duration::from_millis(900));
    let mut parts = Vec::new();
    while let Ok(m) = bites.next_timeout(Duration::from_secs(3)) {
        assert!(m.data.len() <= 16_384);
        parts.push(Bite::decode(m.data.as_slice()).unwrap());
    }
    assert!(parts.len() >= 3, "split into {} parts", parts.len());
    let numbers: Vec<u32> = parts
        .iter()
        .flat_map(|p| ogg_packets(&p.data).0)
        .map(|d| u32::from_be_bytes([d[2], d[3], d[4], d[5]]))
        .collect();
    assert_eq!(
        numbers,
        (0..40).collect::<Vec<_>>(),
        "every packet, in order"
    );
    assert!(parts.windows(2).all(|w| w[0].start <= w[1].start));
    assert!(metric(http, "beep_sfu_bites_split_total").unwrap_or(0.0) >= 2.0);
    assert!(server.shutdown());
}
