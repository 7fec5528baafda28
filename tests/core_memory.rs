//! The core driven in memory: real str0m clients, simulated time, no sockets.

use std::collections::HashSet;
use std::time::Duration;

use beep_sfu::sfu::{Request, SfuEvent};
use beep_sfu::testkit::load::payload;
use beep_sfu::testkit::Harness;

const LOUD: i8 = -20;

/// Users with one send-receive client each, connected and joined to `conv`.
fn joined(conv: &str, users: &[&str]) -> (Harness, Vec<usize>) {
    let mut h = Harness::new();
    let ids: Vec<usize> = users
        .iter()
        .map(|u| h.add_client(u, &u[..1], true, 0))
        .collect();
    h.connect_all();
    for &i in &ids {
        h.join(i, conv);
    }
    (h, ids)
}

fn senders_heard(h: &Harness, i: usize) -> HashSet<u8> {
    h.clients[i].received.iter().map(|r| r.payload[0]).collect()
}

fn talk(h: &mut Harness, who: &[usize], packets: u32) {
    for n in 0..packets {
        for &i in who {
            h.send(i, &payload(i, n), LOUD);
        }
        h.step(Duration::from_millis(20));
    }
}

#[test]
fn two_peers_hear_each_other_never_themselves() {
    let (mut h, ids) = joined("c1", &["alice", "bob"]);
    let (a, b) = (ids[0], ids[1]);
    talk(&mut h, &[a], 20);
    talk(&mut h, &[b], 20);
    assert_eq!(senders_heard(&h, a), HashSet::from([b as u8]));
    assert_eq!(senders_heard(&h, b), HashSet::from([a as u8]));
    // The payloads arrive intact and in order.
    let got: Vec<Vec<u8>> = h.clients[b]
        .received
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    let want: Vec<Vec<u8>> = (0..20).map(|n| payload(a, n)).collect();
    assert_eq!(got, want);
}

/// Everyone talks in turn in a conversation of `n` single-slot peers; each
/// hears every other member and never itself.
fn round_robin(n: usize) {
    let mut h = Harness::new();
    let ids: Vec<usize> = (0..n)
        .map(|i| h.add_client(&format!("user{i}"), "c", true, 0))
        .collect();
    h.connect_all();
    for &i in &ids {
        h.join(i, "room");
    }
    for &i in &ids {
        talk(&mut h, &[i], 15);
        // Silence so the next speaker takes the slot at once.
        h.step(Duration::from_millis(1100));
    }
    for &i in &ids {
        let want: HashSet<u8> = ids.iter().filter(|&&j| j != i).map(|&j| j as u8).collect();
        assert_eq!(senders_heard(&h, i), want, "client {i}");
        // Every packet of every other speaker arrived, in order.
        for &j in ids.iter().filter(|&&j| j != i) {
            let from_j: Vec<u32> = h.clients[i]
                .received
                .iter()
                .filter(|r| r.payload[0] == j as u8)
                .map(|r| {
                    u32::from_be_bytes([r.payload[1], r.payload[2], r.payload[3], r.payload[4]])
                })
                .collect();
            assert_eq!(from_j, (0..15).collect::<Vec<_>>(), "client {i} from {j}");
        }
    }
}

#[test]
fn three_peers_in_turn() {
    round_robin(3);
}

#[test]
fn five_peers_in_turn() {
    round_robin(5);
}

#[test]
fn five_peers_all_talking_with_enough_slots_hear_everyone() {
    let mut h = Harness::new();
    // One send-receive m-line plus three receive-only ones: four slots each.
    let ids: Vec<usize> = (0..5)
        .map(|i| h.add_client(&format!("u{i}"), "c", true, 3))
        .collect();
    h.connect_all();
    for &i in &ids {
        h.join(i, "room");
    }
    talk(&mut h, &ids, 30);
    for &i in &ids {
        let want: HashSet<u8> = ids.iter().filter(|&&j| j != i).map(|&j| j as u8).collect();
        assert_eq!(senders_heard(&h, i), want, "client {i}");
        // Each speaker is carried on one slot (one SSRC) for the whole test.
        for &j in ids.iter().filter(|&&j| j != i) {
            let ssrcs: HashSet<_> = h.clients[i]
                .received
                .iter()
                .filter(|r| r.payload[0] == j as u8)
                .map(|r| r.ssrc)
                .collect();
            assert_eq!(ssrcs.len(), 1, "client {i} hears {j} on one stream");
        }
    }
}

#[test]
fn same_users_other_device_hears_them() {
    let mut h = Harness::new();
    let phone = h.add_client("alice", "phone", true, 0);
    let laptop = h.add_client("alice", "laptop", true, 0);
    let bob = h.add_client("bob", "b", true, 0);
    h.connect_all();
    // One join moves both of alice's clients.
    h.join(phone, "room");
    h.join(bob, "room");
    talk(&mut h, &[phone], 10);
    assert!(senders_heard(&h, phone).is_empty());
    assert_eq!(senders_heard(&h, laptop), HashSet::from([phone as u8]));
    assert_eq!(senders_heard(&h, bob), HashSet::from([phone as u8]));
}

#[test]
fn user_in_two_conversations_in_turn() {
    let mut h = Harness::new();
    let a = h.add_client("alice", "a", true, 0);
    let b = h.add_client("bob", "b", true, 0);
    let c = h.add_client("carol", "c", true, 0);
    h.connect_all();
    h.join(a, "one");
    h.join(b, "one");
    h.join(c, "two");
    talk(&mut h, &[a], 10);
    assert_eq!(senders_heard(&h, b), HashSet::from([a as u8]));
    assert!(senders_heard(&h, c).is_empty(), "carol is elsewhere");
    // Alice moves to conversation two: bob no longer hears her, carol does.
    h.join(a, "two");
    assert_eq!(h.sfu._conversation_of("alice"), Some("two"));
    let before_b = h.clients[b].received.len();
    talk(&mut h, &[a], 10);
    assert_eq!(h.clients[b].received.len(), before_b);
    assert_eq!(senders_heard(&h, c), HashSet::from([a as u8]));
    // And she hears carol, not bob.
    h.step(Duration::from_millis(1100));
    talk(&mut h, &[b, c], 10);
    let from: Vec<u8> = h.clients[a].received.iter().map(|r| r.payload[0]).collect();
    assert!(from.contains(&(c as u8)) && !from.contains(&(b as u8)));
}

/// A listener with one slot and two speakers (`a`, `b` are their user
/// ids), joined to one room: (harness, listener, a, b).
fn one_slot_listener_and(a: &str, b: &str) -> (Harness, usize, usize, usize) {
    let mut h = Harness::new();
    let listener = h.add_client("lis", "l", false, 1);
    let a = h.add_client(a, &a[..1], true, 0);
    let b = h.add_client(b, &b[..1], true, 0);
    h.connect_all();
    for i in [listener, a, b] {
        h.join(i, "room");
    }
    (h, listener, a, b)
}

#[test]
fn speaker_change_on_one_slot_is_one_continuous_stream() {
    let (mut h, listener, a, b) = one_slot_listener_and("a", "b");
    talk(&mut h, &[a], 25);
    h.step(Duration::from_millis(1200));
    talk(&mut h, &[b], 25);
    h.step(Duration::from_millis(1200));
    talk(&mut h, &[a], 25);
    let rx = &h.clients[listener].received;
    assert_eq!(rx.len(), 75);
    let senders: Vec<u8> = rx.iter().map(|r| r.payload[0]).collect();
    assert_eq!(&senders[..25], &[a as u8; 25]);
    assert_eq!(&senders[25..50], &[b as u8; 25]);
    assert_eq!(&senders[50..], &[a as u8; 25]);
    let ssrcs: HashSet<_> = rx.iter().map(|r| r.ssrc).collect();
    assert_eq!(ssrcs.len(), 1, "one SSRC across switches");
    for w in rx.windows(2) {
        assert_eq!(w[1].seq, w[0].seq + 1, "consecutive sequence numbers");
        assert!(
            w[1].timestamp.wrapping_sub(w[0].timestamp) as i32 > 0,
            "timestamps advance"
        );
    }
    // The first packet after each switch starts a talk spurt.
    assert!(rx[25].marker && rx[50].marker);
    // Time across the silence is kept: about 1.2 s + 20 ms at 48 kHz.
    let gap = rx[25].timestamp.wrapping_sub(rx[24].timestamp);
    assert!((57_000..=60_000).contains(&gap), "gap {gap}");
}

#[test]
fn louder_newcomer_takes_a_one_slot_listener_only_after_the_dwell() {
    let (mut h, listener, soft, loud) = one_slot_listener_and("soft", "loud");
    for n in 0..100u32 {
        h.send(soft, &payload(soft, n), -50);
        if n >= 10 {
            h.send(loud, &payload(loud, n), -10);
        }
        h.step(Duration::from_millis(20));
    }
    let senders: Vec<u8> = h.clients[listener]
        .received
        .iter()
        .map(|r| r.payload[0])
        .collect();
    let first_loud = senders
        .iter()
        .position(|s| *s == loud as u8)
        .expect("loud speaker heard");
    // Not before the incumbent held the slot for its dwell time (800 ms = 40 packets).
    assert!(first_loud >= 40, "switched after {first_loud} packets");
    // And no flapping back afterwards.
    assert!(senders[first_loud..].iter().all(|s| *s == loud as u8));
}

#[test]
fn silent_peer_is_removed_and_membership_outlives_it_for_the_grace() {
    let mut h = Harness::new();
    let a = h.add_client("a", "a", true, 0);
    h.connect_all();
    h.join(a, "room");
    let peer = h.clients[a].peer;
    // The client goes away without a word: the server notices within 30 s.
    h.clients[a].addr = "10.9.9.9:1".parse().unwrap();
    let mut t = 0;
    while h.sfu.snapshot().peers > 0 && t < 40_000 {
        h.sfu.handle_timeout(h.now);
        h.now += Duration::from_millis(100);
        while h.sfu.poll_transmit().is_some() {}
        t += 100;
    }
    // ICE consent (or, failing that, the 30 s idle timeout) removes it.
    assert_eq!(h.sfu.snapshot().peers, 0, "peer removed");
    assert!(t <= 31_000, "removed within the idle timeout ({t} ms)");
    while let Some(e) = h.sfu.poll_event() {
        h.events.push(e);
    }
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, SfuEvent::PeerClosed { peer: p, .. } if *p == peer)));
    // Alice keeps her conversation during the grace period, then loses it.
    assert_eq!(h.sfu._conversation_of("a"), Some("room"));
    h.now += Duration::from_secs(61);
    h.sfu.handle_timeout(h.now);
    assert_eq!(h.sfu._conversation_of("a"), None);
    assert_eq!(h.sfu.snapshot().conversations, 0);
}

fn bites(h: &mut Harness) -> Vec<beep_sfu::sfu::FinishedBite> {
    while let Some(e) = h.sfu.poll_event() {
        h.events.push(e);
    }
    let mut out = vec![];
    h.events.retain(|e| match e {
        SfuEvent::Bite(b) => {
            out.push(b.clone());
            false
        }
        _ => true,
    });
    out
}

#[test]
fn one_bite_per_spurt_and_leaving_or_shutdown_finishes_the_open_one() {
    let (mut h, ids) = joined("one", &["alice", "bob"]);
    let (a, b) = (ids[0], ids[1]);
    talk(&mut h, &[a], 30);
    assert!(bites(&mut h).is_empty(), "still talking");
    h.step(Duration::from_millis(700));
    let done = bites(&mut h);
    assert_eq!(done.len(), 1);
    assert_eq!(
        (
            done[0].userid.as_str(),
            done[0].conversation.as_str(),
            done[0].packets
        ),
        ("alice", "one", 30)
    );

    // Alice moves mid-sentence: the bite in "one" is finished at once.
    talk(&mut h, &[a], 10);
    h.join(a, "two");
    let done = bites(&mut h);
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].conversation.as_str(), done[0].packets),
        ("one", 10)
    );

    // Bob is cut off by shutdown mid-sentence: his bite is finished too.
    talk(&mut h, &[b], 5);
    h.sfu.handle_request(h.now, Request::Shutdown);
    let done = bites(&mut h);
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].userid.as_str(), done[0].packets), ("bob", 5));
}

#[test]
fn a_disconnecting_speaker_finishes_their_bite() {
    let (mut h, ids) = joined("one", &["alice", "bob"]);
    let a = ids[0];
    talk(&mut h, &[a], 8);
    // Alice's client closes its peer connection (DTLS close_notify).
    h.clients[a].rtc.rtc_mut().close().unwrap();
    h.step(Duration::from_millis(20));
    for _ in 0..20 {
        h.step(Duration::from_millis(20));
    }
    let done = bites(&mut h);
    assert_eq!(done.len(), 1, "bite finished on disconnect, not after 30 s");
    assert_eq!(done[0].packets, 8);
}

#[test]
fn a_client_reconnecting_within_the_grace_lands_back_in_the_conversation() {
    let (mut h, ids) = joined("room", &["alice", "bob"]);
    let (a, b) = (ids[0], ids[1]);
    // Alice's phone hangs up.
    h.clients[a].rtc.rtc_mut().close().unwrap();
    for _ in 0..20 {
        h.step(Duration::from_millis(20));
    }
    assert!(!h.sfu._is_connected(h.clients[a].peer), "old peer gone");
    assert_eq!(
        h.sfu._conversation_of("alice"),
        Some("room"),
        "membership kept"
    );
    // It reconnects (a new peer) without joining again, and hears bob.
    let again = h.add_client("alice", "phone", true, 0);
    h.clients[a].connected = true; // the closed client is not waited for
    for _ in 0..400 {
        if h.sfu._is_connected(h.clients[again].peer) && h.clients[again].connected {
            break;
        }
        h.step(Duration::from_millis(5));
    }
    talk(&mut h, &[b], 10);
    assert_eq!(senders_heard(&h, again), HashSet::from([b as u8]));
}

/// A small deterministic generator for the fuzz-style tests.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn junk_from_a_connected_peers_own_address_disturbs_nothing() {
    let (mut h, ids) = joined("room", &["alice", "bob"]);
    let (a, b) = (ids[0], ids[1]);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let source = h.clients[a].addr;
    let real = h.produce(a, &payload(a, 999), LOUD);
    for i in 0..20_000u32 {
        let len = (rng.next() % 400) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        match i % 4 {
            // Every first byte: STUN, DTLS, RTP/RTCP and the rest.
            0 => {
                if let Some(f) = d.first_mut() {
                    *f = (i / 4 % 256) as u8;
                }
            }
            // A real SRTP packet with bytes flipped.
            1 if !real.is_empty() => {
                d = real[0].clone();
                let at = (rng.next() as usize) % d.len();
                d[at] ^= 1 << (rng.next() % 8);
            }
            // Truncated real packets.
            2 if !real.is_empty() => {
                d = real[0][..(rng.next() as usize) % real[0].len()].to_vec();
            }
            _ => {}
        }
        h.sfu.handle_datagram(h.now, source, &d);
    }
    while h.sfu.poll_transmit().is_some() {}
    assert!(h.sfu._is_connected(h.clients[a].peer) && h.sfu._is_connected(h.clients[b].peer));
    // The call goes on.
    h.clients[b].received.clear();
    talk(&mut h, &[a], 10);
    assert_eq!(
        h.clients[b].received.len(),
        10,
        "bob still hears every packet of alice"
    );
}

#[test]
fn one_user_cannot_take_more_than_their_share_of_peers() {
    use beep_sfu::sfu::{Claim, ConnectError, SfuConfig};
    let mut config = SfuConfig::new("10.0.0.1:5000".parse().unwrap());
    config.max_peers_per_user = 2;
    let mut h = Harness::with_config(config);
    h.add_client("greedy", "1", true, 0);
    h.add_client("greedy", "2", true, 0);
    // A third offer from the same user is refused; another user is not.
    let offer = beep_sfu::testkit::OpusClient::new("10.9.0.1:4000".parse().unwrap(), h.now)
        .unwrap()
        .offer(true, 0)
        .unwrap();
    let claim = |u: &str| Claim {
        userid: u.into(),
        clientid: "x".into(),
    };
    assert_eq!(
        h.connect(claim("greedy"), &offer).unwrap_err(),
        ConnectError::UserLimit { limit: 2 }
    );
    assert!(h.connect(claim("modest"), &offer).is_ok());
}

#[test]
fn a_flooding_peer_is_held_to_its_budget_and_other_calls_go_on() {
    let mut h = Harness::new();
    let flooder = h.add_client("flooder", "f", true, 0);
    let victim = h.add_client("victim", "v", true, 0);
    let a = h.add_client("a", "a", true, 0);
    let b = h.add_client("b", "b", true, 0);
    h.connect_all();
    h.join(flooder, "flood");
    h.join(victim, "flood");
    h.join(a, "calm");
    h.join(b, "calm");
    // 4,000 packets in one simulated second, while a and b talk normally.
    for n in 0..4_000u32 {
        h.send(flooder, &payload(flooder, n), LOUD);
        if n % 80 == 0 {
            h.send(a, &payload(a, n / 80), LOUD);
        }
        h.step(Duration::from_micros(250));
    }
    let heard = h.clients[victim].received.len();
    assert!(
        (100..=200).contains(&heard),
        "the listener gets the budget (burst 50 + 100/s), not the flood: {heard}"
    );
    assert_eq!(
        h.clients[b].received.len(),
        50,
        "the other call loses nothing"
    );
    let stats = h.sfu.snapshot().stats;
    assert!(stats.dropped_over_packet_rate >= 3_700, "{stats:?}");
    // Oversized payloads are dropped whatever the budget.
    h.step(Duration::from_secs(2));
    h.clients[victim].received.clear();
    h.send(flooder, &vec![0xF8; 1_600], LOUD);
    h.step(Duration::from_millis(20));
    assert!(h.clients[victim].received.is_empty());
    assert_eq!(h.sfu.snapshot().stats.dropped_payload_too_big, 1);
}

#[test]
fn slots_are_capped_at_sixteen() {
    let mut h = Harness::new();
    let greedy = h.add_client("greedy", "g", false, 40);
    assert_eq!(h.sfu._slot_count(h.clients[greedy].peer), Some(16));
}

#[test]
fn a_peer_that_keeps_changing_address_stays_routed_at_its_newest() {
    let (mut h, ids) = joined("room", &["alice", "bob"]);
    let (a, b) = (ids[0], ids[1]);
    // Alice's NAT rebinds twelve times (more than the 8 addresses a peer is
    // known by); each time her ICE checks come from the new address.
    for n in 0..12u8 {
        h.clients[a].addr = format!("10.77.0.{}:{}", n + 1, 30_000 + u16::from(n))
            .parse()
            .unwrap();
        for _ in 0..60 {
            h.step(Duration::from_millis(100));
        }
    }
    h.clients[b].received.clear();
    talk(&mut h, &[a], 10);
    assert_eq!(
        h.clients[b].received.len(),
        10,
        "media from the newest address is routed"
    );
    // ... and the twelve addresses did not all stay routed: at most 8.
    assert_eq!(h.sfu._peer_addrs(h.clients[a].peer), Some(8));
    assert_eq!(h.sfu._routes(), 8 + 1, "alice's newest 8, and bob's one");
}

#[test]
fn every_forwarded_packet_names_its_speaker_by_csrc() {
    use beep_sfu::sfu::speaker_csrc;
    let mut h = Harness::new();
    let users = ["ann", "ben", "cat"];
    let ids: Vec<usize> = users
        .iter()
        .map(|u| h.add_client(u, "c", true, 2))
        .collect();
    h.connect_all();
    for &i in &ids {
        h.join(i, "room");
    }
    talk(&mut h, &ids, 20);
    for &i in &ids {
        assert!(!h.clients[i].received.is_empty());
        for r in &h.clients[i].received {
            let speaker = users[r.payload[0] as usize];
            assert_eq!(
                r.csrc,
                vec![speaker_csrc(speaker)],
                "exactly one CSRC, the speaker's"
            );
            assert_ne!(
                r.csrc[0],
                speaker_csrc(users[i]),
                "never the listener's own"
            );
        }
    }
}

/// Relayed packets leave as `SfuEvent::Relay`, counted here.
fn relayed(h: &mut Harness) -> usize {
    h.events
        .drain(..)
        .filter(|e| matches!(e, SfuEvent::Relay { .. }))
        .count()
}

#[test]
fn only_packets_that_can_matter_are_relayed_to_other_nodes() {
    use beep_sfu::sfu::ClusterInput;
    let (mut h, ids) = joined("x", &["alice"]);
    let alice = ids[0];
    // Node b has members of x: x's packets now have somewhere to go.
    h.sfu.handle_cluster(
        h.now,
        ClusterInput::Heartbeat {
            node: "b".into(),
            conversations: vec!["x".into()],
            users: vec![],
            first: true,
            last: true,
        },
    );
    h.events.clear();
    // Silence from a speaker who is not active here changes nobody's
    // selection on b: not relayed.
    for n in 0..20 {
        h.send(alice, &payload(alice, n), -127);
        h.step(Duration::from_millis(20));
    }
    assert_eq!(relayed(&mut h), 0, "silence from an inactive speaker");
    // Voiced packets are relayed, every one.
    talk(&mut h, &[alice], 20);
    assert_eq!(relayed(&mut h), 20, "voiced packets");
    // Now active, her silence is relayed too (b hears her pause, not a gap).
    for n in 20..25 {
        h.send(alice, &payload(alice, n), -127);
        h.step(Duration::from_millis(20));
    }
    assert_eq!(relayed(&mut h), 5, "silence from an active speaker");
}

#[test]
fn the_answer_asks_for_dtx() {
    let mut h = Harness::new();
    let mut c = beep_sfu::testkit::OpusClient::new("10.1.0.9:40009".parse().unwrap(), h.now)
        .expect("client");
    let offer = c.offer(true, 1).expect("offer");
    let claim = beep_sfu::sfu::Claim {
        userid: "u".into(),
        clientid: "c".into(),
    };
    let (_, answer) = h.connect(claim, &offer).expect("answered");
    let fmtp: Vec<&str> = answer
        .lines()
        .filter(|l| l.starts_with("a=fmtp:"))
        .collect();
    assert!(!fmtp.is_empty(), "{answer}");
    for l in fmtp {
        assert!(l.contains("usedtx=1"), "{l}");
        assert!(l.contains("useinbandfec=1"), "{l}");
    }
}

/// A sender in discontinuous transmission: one TOC-only Opus packet every
/// 400 ms, as libopus sends in silence. Speaker selection and bites treat
/// it as silence, even when its level claims otherwise (or it has none).
#[test]
fn a_sender_in_dtx_is_silent_to_speaker_selection_and_bites() {
    let (mut h, listener, a, b) = one_slot_listener_and("a", "b");
    talk(&mut h, &[a], 25);
    // Four seconds of DTX from a: the first half with a silent level, the
    // second with a level a misbehaving client might claim.
    for n in 0..10 {
        h.send(a, &[0xF8], if n < 5 { -127 } else { LOUD });
        h.step(Duration::from_millis(400));
    }
    let done = bites(&mut h);
    assert_eq!(done.len(), 1, "a's spurt ended although DTX went on");
    assert_eq!(done[0].userid, "a");
    assert_eq!(done[0].packets, 25, "the DTX tail is trimmed");
    assert_eq!(done[0].duration_ms, 500);

    // b talks while a is still in DTX: the one slot goes to b at once, since
    // a counts as silent (a voiced incumbent would hold it for its dwell).
    let before = h.clients[listener].received.len();
    for n in 0..25u32 {
        h.send(b, &payload(b, n), LOUD);
        if n % 20 == 0 {
            h.send(a, &[0xF8], LOUD);
        }
        h.step(Duration::from_millis(20));
    }
    let heard_b = h.clients[listener].received[before..]
        .iter()
        .filter(|r| r.payload.len() > 2 && r.payload[0] == b as u8)
        .count();
    assert_eq!(heard_b, 25, "b took the slot from the first packet");
    // The DTX frames a sent while it held the slot reached the listener
    // (its decoder needs them for comfort noise).
    let dtx = h.clients[listener].received[..before]
        .iter()
        .filter(|r| r.payload == [0xF8])
        .count();
    assert!(dtx >= 9, "DTX frames forwarded: {dtx}");
}
