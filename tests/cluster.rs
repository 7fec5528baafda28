//! Many processes, one SFU: two beep-sfu nodes on loopback sharing
//! conversations through a real `nats-server`, with str0m clients on each.

#![allow(deprecated)] // the synchronous `nats` crate, used here as a subscriber

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use prost::Message as _;

use beep_sfu::proto::Bite;
use beep_sfu::sfu::speaker_csrc;

/// Checks that `p` heard `sender`'s packets `from..from+count` exactly once
/// each, in order, byte for byte, each carrying `userid`'s CSRC.
fn heard_exactly(p: &TestPeer, sender: u8, userid: &str, from: u32, count: u32) {
    let got: Vec<&Got> = p
        .received
        .iter()
        .filter(|g| g.payload.first() == Some(&sender))
        .filter(|g| {
            let n = u32::from_be_bytes([g.payload[1], g.payload[2], g.payload[3], g.payload[4]]);
            (from..from + count).contains(&n)
        })
        .collect();
    let numbers: Vec<u32> = got
        .iter()
        .map(|g| u32::from_be_bytes([g.payload[1], g.payload[2], g.payload[3], g.payload[4]]))
        .collect();
    assert_eq!(
        numbers,
        (from..from + count).collect::<Vec<_>>(),
        "{} heard {sender}'s packets",
        p.name
    );
    for (g, n) in got.iter().zip(from..) {
        assert_eq!(g.payload, payload(sender, n), "byte-exact");
        assert_eq!(g.csrc, vec![speaker_csrc(userid)], "the speaker's CSRC");
    }
}

#[test]
fn a_user_on_each_node_hears_the_other_byte_exact_and_joins_apply_on_the_other_node() {
    let pair = two_nodes("pair");
    let (ha, hb) = (pair.ha, pair.hb);
    let mut alice = TestPeer::new("alice", "a1");
    let mut bob = TestPeer::new("bob", "b1");
    connect_to(&mut [(&mut alice, ha), (&mut bob, hb)]);
    // Each join is posted to the node the user is NOT connected to.
    assert_eq!(join(hb, &alice.claim, "room").0, 200);
    assert_eq!(join(ha, &bob.claim, "room").0, 200);
    let peers = &mut [&mut alice, &mut bob];
    assert!(
        talk_until_heard(peers, &[(0, 1), (1, 2)], &[(1, 1), (0, 2)], 0),
        "cross-node audio never arrived"
    );
    talk(peers, &[(0, 1), (1, 2)], 1000, 50);
    heard_exactly(&bob, 1, "alice", 1000, 50);
    heard_exactly(&alice, 2, "bob", 1000, 50);
    assert!(!heard(&alice).contains_key(&1), "alice never hears herself");
    assert!(metric(ha, "beep_sfu_relay_packets_out_total").unwrap_or(0.0) >= 50.0);
    assert!(metric(hb, "beep_sfu_relay_packets_in_total").unwrap_or(0.0) >= 50.0);
    assert_eq!(metric(hb, "beep_sfu_remote_speakers"), Some(1.0));
}

#[test]
fn a_user_who_joins_on_one_node_then_connects_to_the_other_lands_in_the_conversation() {
    let pair = two_nodes("later");
    let (ha, hb) = (pair.ha, pair.hb);
    // Carol joins on B with no client anywhere yet, then connects to A.
    assert_eq!(join(hb, &claim("carol", "c1"), "room").0, 200);
    let mut dave = TestPeer::new("dave", "d1");
    let mut carol = TestPeer::new("carol", "c1");
    connect_to(&mut [(&mut dave, ha)]);
    assert_eq!(join(ha, &dave.claim, "room").0, 200);
    connect_to(&mut [(&mut carol, ha)]);
    let peers = &mut [&mut dave, &mut carol];
    assert!(
        talk_until_heard(peers, &[(0, 4), (1, 3)], &[(1, 4), (0, 3)], 0),
        "carol did not land in the conversation she joined on the other node"
    );
}

#[test]
fn a_conversation_on_one_node_puts_no_media_on_nats_until_another_node_has_a_member() {
    let pair = two_nodes("local");
    let (ha, hb) = (pair.ha, pair.hb);
    let watcher = nats::connect(pair.nats.url()).expect("nats connects");
    let p = &pair.prefix;
    let media = watcher.subscribe(&format!("{p}.media.>")).unwrap();
    let mut x = TestPeer::new("xavier", "x1");
    let mut y = TestPeer::new("yara", "y1");
    connect_to(&mut [(&mut x, ha), (&mut y, ha)]);
    assert_eq!(join(ha, &x.claim, "local-room").0, 200);
    assert_eq!(join(ha, &y.claim, "local-room").0, 200);
    {
        let peers = &mut [&mut x, &mut y];
        assert!(talk_until_heard(
            peers,
            &[(0, 5), (1, 6)],
            &[(1, 5), (0, 6)],
            0
        ));
        talk(peers, &[(0, 5), (1, 6)], 100, 25);
    }
    assert!(
        media.next_timeout(Duration::from_millis(500)).is_err(),
        "media was published for a conversation that lives on one node"
    );
    assert_eq!(metric(ha, "beep_sfu_relay_packets_out_total"), Some(0.0));
    // Positive control: a member on B makes A relay.
    let mut z = TestPeer::new("zoe", "z1");
    connect_to(&mut [(&mut z, hb)]);
    assert_eq!(join(hb, &z.claim, "local-room").0, 200);
    let peers = &mut [&mut x, &mut y, &mut z];
    assert!(talk_until_heard(peers, &[(0, 5)], &[(2, 5)], 1000));
    let msg = media
        .next_timeout(Duration::from_secs(2))
        .expect("media on NATS once the conversation spans two nodes");
    assert_eq!(msg.subject, format!("{p}.media.b"));
}

#[test]
fn every_bite_is_published_once_across_nodes() {
    let pair = two_nodes("bites");
    let (ha, hb) = (pair.ha, pair.hb);
    let watcher = nats::connect(pair.nats.url()).expect("nats connects");
    let bites = watcher.subscribe("bite").unwrap();
    let mut alice = TestPeer::new("alice", "a1");
    let mut bob = TestPeer::new("bob", "b1");
    connect_to(&mut [(&mut alice, ha), (&mut bob, hb)]);
    assert_eq!(join(ha, &alice.claim, "bite-room").0, 200);
    assert_eq!(join(hb, &bob.claim, "bite-room").0, 200);
    let peers = &mut [&mut alice, &mut bob];
    assert!(talk_until_heard(
        peers,
        &[(0, 1), (1, 2)],
        &[(1, 1), (0, 2)],
        0
    ));
    // Each speaker's spurt so far ends with a second of silence.
    pump_for(peers, Duration::from_millis(1500));
    let mut per_user: HashMap<String, u32> = HashMap::new();
    while let Ok(m) = bites.next_timeout(Duration::from_millis(1500)) {
        let bite = Bite::decode(&m.data[..]).expect("a Bite");
        assert_eq!(bite.key, "bite-room");
        *per_user
            .entry(bite.client.expect("client").key)
            .or_default() += 1;
    }
    assert_eq!(per_user.get("alice"), Some(&1), "{per_user:?}");
    assert_eq!(per_user.get("bob"), Some(&1), "{per_user:?}");
}

#[test]
fn nats_restarted_mid_call_keeps_local_audio_and_cross_node_audio_resumes() {
    let mut pair = two_nodes("outage");
    let (ha, hb) = (pair.ha, pair.hb);
    let mut alice = TestPeer::new("alice", "a1");
    let mut amy = TestPeer::new("amy", "a2");
    let mut bob = TestPeer::new("bob", "b1");
    connect_to(&mut [(&mut alice, ha), (&mut amy, ha), (&mut bob, hb)]);
    for (peer, http) in [(&alice, ha), (&amy, ha), (&bob, hb)] {
        assert_eq!(join(http, &peer.claim, "room").0, 200);
    }
    let peers = &mut [&mut alice, &mut amy, &mut bob];
    assert!(talk_until_heard(peers, &[(0, 1)], &[(1, 1), (2, 1)], 0));
    pair.nats.kill();
    assert!(wait_for(Duration::from_secs(10), || metric(
        ha,
        "beep_sfu_cluster_connected"
    ) == Some(0.0)));
    // Local audio goes on while NATS is away.
    talk(peers, &[(0, 1)], 5000, 25);
    heard_exactly(peers[1], 1, "alice", 5000, 25);
    pair.nats.restart();
    // Cross-node audio comes back by itself.
    let end = Instant::now() + Duration::from_secs(20);
    let mut n = 10_000;
    let resumed = loop {
        peers[0].send(&payload(1, n), -20);
        n += 1;
        pump_for(peers, Duration::from_millis(20));
        if heard(peers[2])
            .get(&1)
            .is_some_and(|ns| ns.iter().any(|&k| k >= 10_000))
        {
            break true;
        }
        if Instant::now() > end {
            break false;
        }
    };
    assert!(
        resumed,
        "cross-node audio did not resume after NATS came back"
    );
}

#[test]
fn a_killed_nodes_user_reconnects_to_another_node_and_is_heard_without_joining_again() {
    let nats = NatsServer::start();
    let p = prefix("kill");
    let a = start_node(&nats, &p, "a");
    let (mut b, hb) = spawn_node(&nats, &p, "b");
    let ha = a.http_addr();
    see_each_other(ha, hb);
    let mut alice = TestPeer::new("alice", "a1");
    let mut bob = TestPeer::new("bob", "b1");
    connect_to(&mut [(&mut alice, ha), (&mut bob, hb)]);
    assert_eq!(join(ha, &alice.claim, "room").0, 200);
    assert_eq!(join(hb, &bob.claim, "room").0, 200);
    {
        let peers = &mut [&mut alice, &mut bob];
        assert!(talk_until_heard(
            peers,
            &[(0, 1), (1, 2)],
            &[(1, 1), (0, 2)],
            0
        ));
    }
    b.0.kill().unwrap(); // SIGKILL: no goodbye
    let _ = b.0.wait();
    assert!(
        wait_for(Duration::from_secs(8), || cluster_nodes(ha) == 1),
        "node a still sees the dead node"
    );
    assert_eq!(metric(ha, "beep_sfu_remote_speakers"), Some(0.0));
    // Bob's client reconnects to A, with no new join.
    let mut bob2 = TestPeer::new("bob", "b2");
    connect_to(&mut [(&mut bob2, ha)]);
    let peers = &mut [&mut alice, &mut bob2];
    assert!(
        talk_until_heard(peers, &[(0, 1), (1, 2)], &[(1, 1), (0, 2)], 5000),
        "bob was not back in his conversation on node a"
    );
}

#[test]
fn malformed_cluster_messages_are_counted_and_change_nothing() {
    let nats = NatsServer::start();
    let p = prefix("junk");
    let a = start_node(&nats, &p, "a");
    let ha = a.http_addr();
    assert!(wait_for(Duration::from_secs(10), || metric(
        ha,
        "beep_sfu_cluster_connected"
    ) == Some(1.0)));
    let junk = nats::connect(nats.url()).expect("nats connects");
    for subject in ["heartbeat", "join", "media.a"] {
        junk.publish(&format!("{p}.{subject}"), [0xff, 0xff, 0xff, 0x01])
            .unwrap();
    }
    junk.flush().unwrap();
    let malformed = || {
        let (_, body) = get(ha, "/metrics");
        body.lines()
            .filter(|l| l.starts_with("beep_sfu_cluster_dropped_total") && l.contains("malformed"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(
        wait_for(Duration::from_secs(5), || malformed() == 3.0),
        "malformed messages counted: {}",
        malformed()
    );
    assert_eq!(cluster_nodes(ha), 1, "junk made no node appear");
    assert_eq!(get(ha, "/healthz").0, 200);
}
