//! A cluster that trusts nothing on NATS: real nodes and a real
//! `nats-server`, with a forger publishing hand-made messages, both as an
//! outsider (raw bytes, or sealed with another deployment's key) and as a
//! compromised node that holds the cluster key. Each test is one finding of
//! the review in docs/RELIABILITY.md's cluster section.

#![allow(deprecated)] // the synchronous `nats` crate, used here as forger and snooper

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::*;
use common::*;
use prost::Message as _;

use beep_sfu::config::ClusterKey;
use beep_sfu::proto::cluster::{Heartbeat, Join, MediaBatch, Member, RelayedPacket};
use beep_sfu::testkit::forge::{Forged, Forger};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `beep_sfu_cluster_dropped_total` summed over kinds, for one reason.
fn dropped(http: std::net::SocketAddr, reason: &str) -> f64 {
    metric_sum(
        http,
        "beep_sfu_cluster_dropped_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Counts what arrives on `subject` (wildcards allowed).
fn count_on(conn: &nats::Connection, subject: &str) -> Arc<AtomicUsize> {
    count_matching(conn, subject, |_| true)
}

/// Counts the messages on `subject` whose data `pick` chooses.
fn count_matching(
    conn: &nats::Connection,
    subject: &str,
    pick: impl Fn(&[u8]) -> bool + Send + 'static,
) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    conn.subscribe(subject)
        .expect("snooper subscribes")
        .with_handler(move |msg| {
            if pick(&msg.data) {
                m.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        });
    conn.flush().expect("subscription registered");
    n
}

/// Another deployment's key: not this cluster's.
fn foreign_key() -> ClusterKey {
    ClusterKey::new(&[7u8; 32]).expect("32 bytes")
}

fn cluster_key() -> ClusterKey {
    ClusterKey::new(KEY).expect("32 bytes")
}

/// Alice and Bob on one node, both in `room`, hearing each other.
fn a_call(http: std::net::SocketAddr) -> (TestPeer, TestPeer) {
    let (mut alice, mut bob) = two_in_room(http);
    assert!(talk_until_heard(
        &mut [&mut alice, &mut bob],
        &[(0, 1), (1, 2)],
        &[(1, 1), (0, 2)],
        0
    ));
    (alice, bob)
}

/// One node `a` on its own NATS under a prefix of the test's, Alice and
/// Bob in a call on it, and a forger connected to the same NATS.
struct Scene {
    nats: NatsServer,
    p: String,
    _node: beep_sfu::server::Server,
    ha: std::net::SocketAddr,
    alice: TestPeer,
    bob: TestPeer,
    forger: nats::Connection,
}

fn one_node_with_a_call(test: &str) -> Scene {
    let nats = NatsServer::start();
    let p = prefix(test);
    let node = start_node(&nats, &p, "a");
    let ha = node.http_addr();
    let (alice, bob) = a_call(ha);
    let forger = nats::connect(nats.url()).expect("nats connects");
    Scene {
        nats,
        p,
        _node: node,
        ha,
        alice,
        bob,
        forger,
    }
}

/// True if Alice and Bob still hear each other, with fresh packets.
fn still_hear_each_other(alice: &mut TestPeer, bob: &mut TestPeer, from: u32) -> bool {
    alice.received.clear();
    bob.received.clear();
    talk_until_heard(
        &mut [alice, bob],
        &[(0, 1), (1, 2)],
        &[(1, 1), (0, 2)],
        from,
    )
}

fn member(userid: &str, conversation: &str, stamp: u64) -> Member {
    Member {
        userid: userid.into(),
        conversation: conversation.into(),
        stamp,
        origin: "evil".into(),
    }
}

#[test]
fn a_forged_join_moves_nobody_whoever_sealed_it() {
    // Every field bound: a field left to `..` would be dropped (and its
    // server stopped) at the end of this statement.
    let Scene {
        nats: _nats,
        p,
        _node,
        ha,
        mut alice,
        mut bob,
        forger,
    } = one_node_with_a_call("forged-join");
    let subject = format!("{p}.join");
    let body = Join {
        member: Some(member("alice", "evil", u64::MAX)),
    }
    .encode_to_vec();
    // An outsider: raw protobuf, and sealed with another deployment's key.
    forger.publish(&subject, &body).unwrap();
    let mut foreign = Forger::new(&foreign_key(), "evil", 1);
    let sealed = foreign.seal(Forged::Join, &subject, now_ms(), &body);
    forger.publish(&subject, sealed).unwrap();
    // A compromised node with the key, pinning the stamp at u64::MAX.
    let mut inside = Forger::new(&cluster_key(), "evil", 2);
    let sealed = inside.seal(Forged::Join, &subject, now_ms(), &body);
    forger.publish(&subject, sealed).unwrap();
    forger.flush().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dropped(ha, "malformed") >= 1.0
            && dropped(ha, "unknown_key") >= 1.0
            && dropped(ha, "stamp_out_of_range") >= 1.0),
        "each forgery is counted by its reason"
    );
    assert!(
        still_hear_each_other(&mut alice, &mut bob, 1000),
        "alice was moved out of her conversation"
    );
}

#[test]
fn a_replayed_join_moves_nobody() {
    let pair = two_nodes("replay");
    let (ha, hb) = (pair.ha, pair.hb);
    let snooper = nats::connect(pair.nats.url()).expect("nats connects");
    let subject = format!("{}.join", pair.prefix);
    let captured = snooper.subscribe(&subject).unwrap();
    snooper.flush().unwrap();
    let (mut alice, mut bob) = a_call(ha);
    // Alice joins `one` through node b: b broadcasts it, and it is captured.
    assert_eq!(join(hb, &alice.claim, "one").0, 200);
    let old = captured
        .next_timeout(Duration::from_secs(5))
        .expect("the join crossed NATS");
    assert!(
        wait_for(Duration::from_secs(5), || !still_hear_each_other(
            &mut alice, &mut bob, 2000
        )),
        "the genuine join moved alice on node a"
    );
    // Back to `room` on node a; then the old join is replayed, many times.
    assert_eq!(join(ha, &alice.claim, "room").0, 200);
    assert!(still_hear_each_other(&mut alice, &mut bob, 3000));
    for _ in 0..5 {
        snooper.publish(&subject, &old.data).unwrap();
    }
    snooper.flush().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dropped(ha, "replayed") >= 5.0),
        "replays counted: {}",
        dropped(ha, "replayed")
    );
    assert!(
        still_hear_each_other(&mut alice, &mut bob, 4000),
        "the replayed join moved alice"
    );
}

#[test]
fn a_forged_heartbeat_gets_no_media_relayed_to_it() {
    // Every field bound: a field left to `..` would be dropped (and its
    // server stopped) at the end of this statement.
    let Scene {
        nats: _nats,
        p,
        _node,
        ha,
        mut alice,
        mut bob,
        forger,
    } = one_node_with_a_call("forged-heartbeat");
    let relayed = count_on(&forger, &format!("{p}.media.>"));
    let subject = format!("{p}.heartbeat");
    let mut foreign = Forger::new(&foreign_key(), "evil", 1);
    let end = Instant::now() + Duration::from_secs(3);
    let mut n = 10_000;
    while Instant::now() < end {
        // The old wire format named the node inside the message.
        let raw = [
            vec![0x0a, 4],
            b"evil".to_vec(),
            vec![0x12, 4],
            b"room".to_vec(),
        ]
        .concat();
        forger.publish(&subject, &raw).unwrap();
        let hb = Heartbeat {
            conversations: vec!["room".into()],
            ..Default::default()
        };
        let sealed = foreign.seal(Forged::Heartbeat, &subject, now_ms(), &hb.encode_to_vec());
        forger.publish(&subject, sealed).unwrap();
        forger.flush().unwrap();
        talk(&mut [&mut alice, &mut bob], &[(0, 1)], n, 10);
        n += 10;
    }
    assert_eq!(cluster_nodes(ha), 1, "no node appeared");
    assert_eq!(
        relayed.load(Ordering::SeqCst),
        0,
        "media was relayed to a forged node"
    );
}

#[test]
fn a_crlf_node_id_is_refused_and_nothing_is_published_through_it() {
    // Every field bound: a field left to `..` would be dropped (and its
    // server stopped) at the end of this statement.
    let Scene {
        nats: _nats,
        p,
        _node,
        ha,
        mut alice,
        mut bob,
        forger,
    } = one_node_with_a_call("crlf");
    // The node's own bites go to `store` too: count only the injected one.
    let injected = count_matching(&forger, "store", |d| d == b"hello");
    let injected_y = count_on(&forger, "y");
    let subject = format!("{p}.heartbeat");
    let hb = Heartbeat {
        conversations: vec!["room".into()],
        ..Default::default()
    }
    .encode_to_vec();
    // Even a node holding the key cannot smuggle protocol into a subject.
    for id in [
        "x\r\n",
        "x 0\r\n\r\nPUB store 5\r\nhello\r\nPUB y",
        "a.b",
        &"n".repeat(65),
    ] {
        let mut inside = Forger::new(&cluster_key(), id, 3);
        let sealed = inside.seal(Forged::Heartbeat, &subject, now_ms(), &hb);
        forger.publish(&subject, sealed).unwrap();
    }
    forger.flush().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dropped(ha, "bad_node_id") >= 4.0),
        "bad node ids counted: {}",
        dropped(ha, "bad_node_id")
    );
    talk(&mut [&mut alice, &mut bob], &[(0, 1), (1, 2)], 20_000, 50);
    assert_eq!(cluster_nodes(ha), 1);
    assert_eq!(
        injected.load(Ordering::SeqCst),
        0,
        "a message reached `store`"
    );
    assert_eq!(injected_y.load(Ordering::SeqCst), 0);
    assert_eq!(metric(ha, "beep_sfu_cluster_connected"), Some(1.0));
}

#[test]
fn a_2000_byte_relayed_payload_crashes_nothing_with_or_without_the_key() {
    let nats = NatsServer::start();
    let p = prefix("big-payload");
    let (mut node, ha) = spawn_node(&nats, &p, "a");
    let (mut alice, mut bob) = a_call(ha);
    let forger = nats::connect(nats.url()).expect("nats connects");
    let subject = format!("{p}.media.a");
    let batch = MediaBatch {
        packets: (0..3)
            .map(|i| RelayedPacket {
                conversation: "room".into(),
                speaker: 1,
                csrc: 7,
                ssrc: 9,
                seq: i,
                timestamp: 960 * i as u32,
                level: Some(-10),
                payload: vec![0xF8; 2_000],
                ..Default::default()
            })
            .collect(),
    }
    .encode_to_vec();
    forger.publish(&subject, &batch).unwrap();
    let mut inside = Forger::new(&cluster_key(), "evil", 4);
    for _ in 0..20 {
        let sealed = inside.seal(Forged::Media, &subject, now_ms(), &batch);
        forger.publish(&subject, sealed).unwrap();
    }
    forger.flush().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dropped(
            ha,
            "invalid_payload_size"
        ) >= 20.0),
        "oversized payloads counted: {}",
        dropped(ha, "invalid_payload_size")
    );
    assert_eq!(node.0.try_wait().ok().flatten(), None, "the node exited");
    assert_eq!(get(ha, "/healthz").0, 200);
    assert!(still_hear_each_other(&mut alice, &mut bob, 30_000));
}

#[test]
fn a_hundred_thousand_fresh_speaker_ids_stay_bounded() {
    // Every field bound: a field left to `..` would be dropped (and its
    // server stopped) at the end of this statement.
    let Scene {
        nats: _nats,
        p,
        _node,
        ha,
        mut alice,
        mut bob,
        forger,
    } = one_node_with_a_call("speakers");
    let subject = format!("{p}.media.a");
    let mut inside = Forger::new(&cluster_key(), "evil", 5);
    for b in 0..100u64 {
        let batch = MediaBatch {
            packets: (0..1_000u64)
                .map(|i| RelayedPacket {
                    conversation: "room".into(),
                    speaker: b * 1_000 + i,
                    seq: 1,
                    level: Some(-127),
                    payload: vec![0xF8; 20],
                    ..Default::default()
                })
                .collect(),
        };
        let sealed = inside.seal(Forged::Media, &subject, now_ms(), &batch.encode_to_vec());
        forger.publish(&subject, sealed).unwrap();
    }
    forger.flush().unwrap();
    let refused = || {
        metric_sum(
            ha,
            "beep_sfu_dropped_datagrams_total",
            "relayed_too_many_speakers",
        )
    };
    assert!(
        wait_for(Duration::from_secs(20), || refused() >= 98_000.0),
        "speakers refused beyond the cap: {}",
        refused()
    );
    let speakers = metric(ha, "beep_sfu_remote_speakers").unwrap_or(-1.0);
    assert!(
        (0.0..=1_024.0).contains(&speakers),
        "remote speakers: {speakers}"
    );
    assert!(still_hear_each_other(&mut alice, &mut bob, 40_000));
}

#[test]
fn a_forged_goodbye_evicts_nobody() {
    let pair = two_nodes("goodbye");
    let forger = nats::connect(pair.nats.url()).expect("nats connects");
    let subject = format!("{}.heartbeat", pair.prefix);
    let mut foreign = Forger::new(&foreign_key(), "b", 6);
    let goodbye = Heartbeat {
        goodbye: true,
        ..Default::default()
    }
    .encode_to_vec();
    // The old wire format: node "b", goodbye true.
    let raw = [vec![0x0a, 1, b'b'], vec![0x20, 1]].concat();
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        forger.publish(&subject, &raw).unwrap();
        let sealed = foreign.seal(Forged::Heartbeat, &subject, now_ms(), &goodbye);
        forger.publish(&subject, sealed).unwrap();
        forger.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(cluster_nodes(pair.ha), 2, "node b was evicted");
    }
    assert!(dropped(pair.ha, "malformed") >= 1.0 && dropped(pair.ha, "unknown_key") >= 1.0);
}

#[test]
fn two_nodes_with_the_same_id_are_detected() {
    let nats = NatsServer::start();
    let p = prefix("same-id");
    let first = start_node(&nats, &p, "twin");
    let second = start_node(&nats, &p, "twin");
    let duplicate = |http| {
        let (_, body) = get(http, "/healthz");
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["cluster_duplicate_node_id"].as_bool())
            .unwrap_or(false)
    };
    assert!(
        wait_for(Duration::from_secs(10), || duplicate(first.http_addr())
            && duplicate(second.http_addr())),
        "the duplicate id was not detected"
    );
    assert_eq!(
        metric(first.http_addr(), "beep_sfu_cluster_duplicate_node_id"),
        Some(1.0)
    );
    assert_eq!(
        get(first.http_addr(), "/healthz").0,
        200,
        "local calls go on"
    );
}

#[test]
fn a_snooper_without_the_key_learns_no_ids() {
    let pair = two_nodes("snoop");
    let snooper = nats::connect(pair.nats.url()).expect("nats connects");
    let media = count_on(&snooper, &format!("{}.media.>", pair.prefix));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let s2 = seen.clone();
    snooper
        .subscribe(&format!("{}.>", pair.prefix))
        .unwrap()
        .with_handler(move |m| {
            if let Ok(mut v) = s2.lock() {
                v.extend_from_slice(&m.data);
            }
            Ok(())
        });
    snooper.flush().unwrap();
    let mut alice = TestPeer::new("alice-secret-user", "a1");
    let mut bob = TestPeer::new("bob-secret-user", "b1");
    connect_to(&mut [(&mut alice, pair.ha), (&mut bob, pair.hb)]);
    assert_eq!(join(pair.ha, &alice.claim, "secret-conversation").0, 200);
    assert_eq!(join(pair.hb, &bob.claim, "secret-conversation").0, 200);
    assert!(talk_until_heard(
        &mut [&mut alice, &mut bob],
        &[(0, 1), (1, 2)],
        &[(1, 1), (0, 2)],
        0
    ));
    talk(&mut [&mut alice, &mut bob], &[(0, 1), (1, 2)], 100, 50);
    let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        media.load(Ordering::SeqCst) > 10 && seen.len() > 5_000,
        "the snooper saw the cluster's traffic: {} media messages, {} bytes",
        media.load(Ordering::SeqCst),
        seen.len()
    );
    for secret in [
        "alice-secret-user",
        "bob-secret-user",
        "secret-conversation",
    ] {
        assert!(
            !seen.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} crossed NATS in the clear"
        );
    }
    // The payload of `payload(1, n)` starts with the sender byte then the
    // number; its 0xAB filler must not appear in runs either.
    assert!(!seen.windows(16).any(|w| w.iter().all(|b| *b == 0xAB)));
}

#[test]
fn an_operator_can_fence_the_subjects_in_nats_itself() {
    // The configuration the README and deploy/ ship, as it is.
    let nats = NatsServer::start_with_config(Some(include_str!("../deploy/nats-server.conf")));
    let with_user =
        |user: &str, password: &str| format!("nats://{user}:{password}@127.0.0.1:{}", nats.port);
    let p = "beep.sfu";
    let node = |id: &str| {
        let mut c = node_config(&nats, p, id);
        c.nats = Some(with_user("beep-sfu", "change-me-sfu"));
        init_log();
        beep_sfu::server::Server::start(&c).expect("node starts")
    };
    let (a, b) = (node("a"), node("b"));
    let (ha, hb) = (a.http_addr(), b.http_addr());
    see_each_other(ha, hb);
    let app = nats::connect(with_user("beep-app", "change-me-app")).expect("app connects");
    let bites = count_on(&app, "store");
    let fenced = count_on(&app, "beep.sfu.>");
    let mut alice = TestPeer::new("alice", "a1");
    let mut bob = TestPeer::new("bob", "b1");
    connect_to(&mut [(&mut alice, ha), (&mut bob, hb)]);
    assert_eq!(join(ha, &alice.claim, "room").0, 200);
    assert_eq!(join(hb, &bob.claim, "room").0, 200);
    assert!(
        talk_until_heard(
            &mut [&mut alice, &mut bob],
            &[(0, 1), (1, 2)],
            &[(1, 1), (0, 2)],
            0
        ),
        "the nodes relay under the SFU's own NATS user"
    );
    // The other services' user can neither hear nor speak on beep.sfu.>.
    for subject in ["beep.sfu.heartbeat", "beep.sfu.join", "beep.sfu.media.a"] {
        let _ = app.publish(subject, [0xff, 0xff, 0xff, 0x01]);
    }
    let _ = app.flush();
    talk(&mut [&mut alice, &mut bob], &[(0, 1), (1, 2)], 500, 50);
    assert!(
        wait_for(Duration::from_secs(5), || bites.load(Ordering::SeqCst) > 0),
        "bites still reach the other services"
    );
    assert_eq!(
        fenced.load(Ordering::SeqCst),
        0,
        "beep.sfu.> reached another user"
    );
    assert_eq!(
        dropped(ha, "malformed") + dropped(hb, "malformed"),
        0.0,
        "junk got through"
    );
}
