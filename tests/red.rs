//! RED (RFC 2198) through the core, in memory with real str0m clients:
//! what a RED listener can rebuild under random loss, what a plain listener
//! gets, no redundancy across a speaker switch, malformed RED refused, and
//! an uplink loss recovered from the next packet's redundancy.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use beep_sfu::sfu::SfuEvent;
use beep_sfu::testkit::load::payload;
use beep_sfu::testkit::{is_rtp, xorshift, Harness, Leg, Received};
use str0m::rtp::{RedDecoder, RedEncoder, RedundantBlock};

const LOUD: i8 = -20;
const QUIET: i8 = -127;

/// The outgoing sequence number of an SRTP datagram (its header is clear).
fn rtp_seq(d: &[u8]) -> u16 {
    u16::from_be_bytes([d[2], d[3]])
}

/// Every Opus packet a RED packet carries, by its RTP timestamp: the
/// primary and each redundant block (a listener's jitter buffer does the
/// same with them).
fn unred(r: &Received, red_pt: u8) -> Vec<(u32, Vec<u8>)> {
    assert_eq!(r.pt, red_pt, "a RED listener gets RED on every packet");
    let blocks = RedDecoder::decode(&r.payload).expect("the core sends valid RED");
    blocks
        .iter()
        .map(|b| {
            (
                r.timestamp.wrapping_sub(b.timestamp_offset),
                b.payload.to_vec(),
            )
        })
        .collect()
}

/// A speaker, a RED listener and a plain listener in one room.
fn room() -> (Harness, usize, usize, usize) {
    let mut h = Harness::new();
    let speaker = h.add_client("speaker", "s", true, 0);
    let red = h.add_client_with("red", "r", false, 1, true);
    let plain = h.add_client("plain", "p", false, 1);
    h.connect_all();
    for i in [speaker, red, plain] {
        h.join(i, "room");
    }
    (h, speaker, red, plain)
}

#[test]
fn a_red_listener_rebuilds_every_packet_that_a_later_one_of_two_carries_at_10_percent_loss() {
    let (mut h, speaker, red, plain) = room();
    let red_pt = *h.clients[red].rtc.red_pt().expect("RED negotiated");
    assert_eq!(h.clients[plain].rtc.red_pt(), None);
    // 10 % of the media to the RED listener is lost; we note which.
    let lost = std::rc::Rc::new(std::cell::RefCell::new(HashSet::new()));
    let (mut next, lost_in) = (xorshift(0x5eed_0f10), lost.clone());
    h.loss = Some(Box::new(move |leg, d| {
        let drop = leg == Leg::Down(red) && is_rtp(d) && next() % 100 < 10;
        if drop {
            lost_in.borrow_mut().insert(rtp_seq(d));
        }
        drop
    }));
    const N: u32 = 1_000;
    for n in 0..N {
        h.send(speaker, &payload(speaker, n), LOUD);
        h.step(Duration::from_millis(20));
    }
    h.loss = None;
    // The plain listener got every packet, plain Opus, as sent.
    let opus_pt = *h.clients[plain].rtc.opus_pt().unwrap();
    let got: Vec<&Received> = h.clients[plain].received.iter().collect();
    assert_eq!(got.len(), N as usize);
    for (n, r) in got.iter().enumerate() {
        assert_eq!(r.pt, opus_pt);
        assert_eq!(r.payload, payload(speaker, n as u32));
    }
    // The RED listener: what arrived, and what its redundancy rebuilds.
    let rx = &h.clients[red].received;
    let lost = lost.borrow();
    assert!(
        (70..=130).contains(&lost.len()),
        "about 10 % lost: {}",
        lost.len()
    );
    assert_eq!(rx.len() + lost.len(), N as usize);
    let first = rx.iter().map(|r| r.seq).min().unwrap();
    let first_ts = rx.iter().find(|r| r.seq == first).unwrap().timestamp;
    let mut rebuilt: HashMap<u32, Vec<u8>> = HashMap::new();
    for r in rx {
        for (ts, p) in unred(r, red_pt) {
            if let Some(old) = rebuilt.insert(ts, p.clone()) {
                assert_eq!(old, p, "two blocks for one timestamp agree");
            }
        }
    }
    // Packet n went out as sequence number first + n at first_ts + 960 n
    // (the stream starts with the first packet). It is rebuilt exactly
    // when it or one of the two after it arrived.
    let arrived = |n: u32| !lost.contains(&((first + u64::from(n)) as u16));
    let mut unrecoverable = 0;
    for n in 0..N - 2 {
        let ts = first_ts.wrapping_add(960 * n);
        let expect = arrived(n) || arrived(n + 1) || arrived(n + 2);
        if expect {
            assert_eq!(
                rebuilt.get(&ts),
                Some(&payload(speaker, n)),
                "packet {n} rebuilt"
            );
        } else {
            unrecoverable += 1;
            assert!(!rebuilt.contains_key(&ts));
        }
    }
    let heard = N - 2 - unrecoverable;
    let arrived_alone = (0..N - 2).filter(|&n| arrived(n)).count() as u32;
    println!(
        "10 % loss, distance 2: {arrived_alone} of {} arrived, {heard} rebuilt",
        N - 2
    );
    assert!(heard >= (N - 2) * 99 / 100, "{heard} rebuilt");
    assert!(heard > arrived_alone + 50);
}

/// One RED listener with one slot; `a` talks, then `b` (who was talking
/// quietly all along, so it has a history), then `a` again.
#[test]
fn no_redundancy_crosses_a_speaker_switch() {
    let mut h = Harness::new();
    let lis = h.add_client_with("lis", "l", false, 1, true);
    let a = h.add_client("a", "a", true, 0);
    let b = h.add_client("b", "b", true, 0);
    h.connect_all();
    for i in [lis, a, b] {
        h.join(i, "room");
    }
    let red_pt = *h.clients[lis].rtc.red_pt().unwrap();
    let mut n = 0;
    for (talker, packets) in [(a, 50), (b, 50), (a, 50)] {
        for _ in 0..packets {
            for who in [a, b] {
                let level = if who == talker { LOUD } else { QUIET };
                h.send(who, &payload(who, n), level);
            }
            n += 1;
            h.step(Duration::from_millis(20));
        }
    }
    let rx = &h.clients[lis].received;
    let senders: Vec<u8> = rx.iter().map(|r| r.payload[r.payload.len() - 80]).collect();
    assert!(senders.contains(&(b as u8)), "b took the slot");
    // Split into runs of one speaker; within a run, blocks carry only that
    // speaker's packets from the run itself, never older ones.
    let mut switches = 0;
    let mut run_start: Option<(u8, u32)> = None;
    for r in rx {
        let blocks = unred(r, red_pt);
        let (_, primary) = blocks.last().unwrap();
        let who = primary[0];
        let idx = u32::from_be_bytes(primary[1..5].try_into().unwrap());
        let start = match run_start {
            Some((w, s)) if w == who => s,
            _ => {
                switches += 1;
                assert_eq!(blocks.len(), 1, "a run's first packet has no redundancy");
                run_start = Some((who, idx));
                idx
            }
        };
        for (_, p) in &blocks[..blocks.len() - 1] {
            let i = u32::from_be_bytes(p[1..5].try_into().unwrap());
            assert_eq!(p[0], who, "a block of another speaker");
            assert!(
                (start..idx).contains(&i),
                "block {i} outside the run {start}..{idx}"
            );
        }
    }
    assert_eq!(switches, 3, "a, b, a");
}

#[test]
fn red_from_a_sender_is_checked_unwrapped_for_plain_listeners_and_repairs_its_uplink() {
    let mut h = Harness::new();
    let s = h.add_client_with("s", "s", true, 0, true);
    let plain = h.add_client("plain", "p", false, 1);
    let red = h.add_client_with("red", "r", false, 1, true);
    h.connect_all();
    for i in [s, plain, red] {
        h.join(i, "room");
    }
    let red_pt = h.clients[s].rtc.red_pt().expect("RED negotiated");
    let opus_pt = *h.clients[s].rtc.opus_pt().unwrap();
    // The sender wraps each packet with its previous one (as Chromium
    // does); its packet 10's datagram is lost on the way up.
    let wrap = |n: u32| {
        let prev = (n > 0).then(|| RedundantBlock {
            pt: opus_pt,
            timestamp_offset: 960,
            payload: payload(s, n - 1),
        });
        RedEncoder::encode(opus_pt, &payload(s, n), prev.as_slice())
    };
    for n in 0..30u32 {
        if n == 10 {
            h.loss = Some(Box::new(move |leg, d| leg == Leg::Up(s) && is_rtp(d)));
        }
        h.send_as(s, red_pt, &wrap(n), LOUD);
        h.loss = None;
        h.step(Duration::from_millis(20));
    }
    // Malformed RED: truncated, a block length past the end, another codec,
    // offsets out of order, five blocks. None reaches anyone.
    let before: Vec<usize> = [plain, red].map(|i| h.clients[i].received.len()).to_vec();
    let good = wrap(30);
    let mut other_codec = good.clone();
    other_codec[4] = 0x7f & (opus_pt + 1);
    let mut long_block = good.clone();
    long_block[3] = 0xff;
    long_block[2] |= 0x03;
    let mut many = [0x80 | opus_pt, 0, 4, 0].repeat(5);
    many.extend([opus_pt, 0xF8, 1, 2, 3]);
    let reordered = RedEncoder::encode(
        opus_pt,
        &payload(s, 30),
        &[
            RedundantBlock {
                pt: opus_pt,
                timestamp_offset: 960,
                payload: payload(s, 29),
            },
            RedundantBlock {
                pt: opus_pt,
                timestamp_offset: 1920,
                payload: payload(s, 28),
            },
        ],
    );
    let bad = [
        good[..6].to_vec(),
        long_block,
        other_codec,
        many,
        reordered,
        vec![opus_pt],
    ];
    for b in &bad {
        h.send_as(s, red_pt, b, LOUD);
    }
    h.step(Duration::from_millis(20));
    let after: Vec<usize> = [plain, red].map(|i| h.clients[i].received.len()).to_vec();
    assert_eq!(before, after, "no malformed RED was forwarded");
    let stats = h.sfu.snapshot().stats;
    assert_eq!(stats.dropped_red_malformed, bad.len() as u64);
    assert_eq!(stats.red_recovered, 1, "packet 10 recovered from packet 11");
    // The plain listener got all 30 as plain Opus, packet 10 included.
    let plain_rx = &h.clients[plain].received;
    assert!(plain_rx.iter().all(|r| r.pt == opus_pt));
    let got: Vec<Vec<u8>> = plain_rx.iter().map(|r| r.payload.clone()).collect();
    let want: Vec<Vec<u8>> = (0..30).map(|n| payload(s, n)).collect();
    assert_eq!(got, want);
    let seqs: Vec<u64> = plain_rx.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: {seqs:?}"
    );
    // The RED listener gets 10 as a block of 11 and of 12, not on its own
    // (a late arrival would make its jitter buffer wait longer).
    let red_rx = &h.clients[red].received;
    let carrying_10: Vec<Vec<u8>> = red_rx
        .iter()
        .map(|r| unred(r, *red_pt))
        .filter(|blocks| {
            blocks[..blocks.len() - 1]
                .iter()
                .any(|(_, p)| *p == payload(s, 10))
        })
        .map(|blocks| blocks[blocks.len() - 1].1.clone())
        .collect();
    assert_eq!(carrying_10, vec![payload(s, 11), payload(s, 12)]);
    assert_eq!(red_rx.len(), 29, "every packet but 10 on its own");
    // The bite has every packet, 10 included.
    h.step(Duration::from_millis(1_500));
    let bite = h
        .events
        .iter()
        .find_map(|e| match e {
            SfuEvent::Bite(b) => Some(b),
            _ => None,
        })
        .expect("a bite");
    assert_eq!(bite.packets, 30, "no hole in the bite");
    let offsets: Vec<u64> = bite.audio.packets().map(|p| p.offset).collect();
    assert_eq!(offsets, (0..30).map(|n| n * 960).collect::<Vec<_>>());
}

/// The answer to a RED offer from a core configured with `red_distance`
/// and `opus_dtx`.
fn answer_to_red_offer(red_distance: usize, opus_dtx: bool) -> String {
    let mut config = beep_sfu::sfu::SfuConfig::new("10.0.0.1:5000".parse().unwrap());
    config.red_distance = red_distance;
    config.opus_dtx = opus_dtx;
    let mut h = Harness::with_config(config);
    let mut c = beep_sfu::testkit::OpusClient::new_red("10.1.0.9:40009".parse().unwrap(), h.now)
        .expect("client");
    let offer = c.offer(true, 1).expect("offer");
    assert!(offer.contains(" red/48000/2"), "the client offers RED");
    let claim = beep_sfu::sfu::Claim {
        userid: "u".into(),
        clientid: "c".into(),
    };
    h.connect(claim, &offer).expect("answered").1
}

#[test]
fn red_and_dtx_in_the_answer_follow_the_configuration() {
    let both = answer_to_red_offer(2, true);
    assert!(both.contains(" red/48000/2"), "{both}");
    assert!(both.contains("usedtx=1"), "{both}");
    // Distance 0 does not negotiate RED at all; DTX off leaves usedtx out.
    let neither = answer_to_red_offer(0, false);
    assert!(!neither.contains("red/"), "{neither}");
    assert!(!neither.contains("usedtx"), "{neither}");
    assert!(neither.contains("opus/48000/2"), "{neither}");
}

#[test]
fn with_red_off_a_red_client_gets_plain_opus() {
    let mut config = beep_sfu::sfu::SfuConfig::new("10.0.0.1:5000".parse().unwrap());
    config.red_distance = 0;
    let mut h = Harness::with_config(config);
    let s = h.add_client("s", "s", true, 0);
    let r = h.add_client_with("r", "r", false, 1, true);
    h.connect_all();
    for i in [s, r] {
        h.join(i, "room");
    }
    assert_eq!(h.clients[r].rtc.red_pt(), None, "RED not negotiated");
    let opus_pt = *h.clients[r].rtc.opus_pt().unwrap();
    for n in 0..10 {
        h.send(s, &payload(s, n), LOUD);
        h.step(Duration::from_millis(20));
    }
    let rx = &h.clients[r].received;
    assert_eq!(rx.len(), 10);
    assert!(rx.iter().all(|p| p.pt == opus_pt));
    assert_eq!(h.sfu.snapshot().stats.red_written, 0);
}

/// A sender whose RED carries two blocks and whose uplink loses two packets
/// of every three: each packet that arrives brings two recovered ones. The
/// recovered packets are charged to its media budget (100 packets a second,
/// 50 at once), so redundancy cannot triple what it puts through the core.
#[test]
fn recovered_packets_are_charged_to_the_senders_budget() {
    let mut h = Harness::new();
    let s = h.add_client_with("s", "s", true, 0, true);
    let plain = h.add_client("plain", "p", false, 1);
    h.connect_all();
    for i in [s, plain] {
        h.join(i, "room");
    }
    let red_pt = h.clients[s].rtc.red_pt().expect("RED negotiated");
    let opus_pt = *h.clients[s].rtc.opus_pt().unwrap();
    let block = |n: u32, back: u32| RedundantBlock {
        pt: opus_pt,
        timestamp_offset: 960 * back,
        payload: payload(s, n - back),
    };
    let mut sent = 0u32;
    h.loss = Some(Box::new(move |leg, d| {
        if leg != Leg::Up(s) || !is_rtp(d) {
            return false;
        }
        sent += 1;
        !sent.is_multiple_of(3)
    }));
    // Three seconds at 300 packets a second: 100 a second arrive.
    for n in 2..902u32 {
        let red = RedEncoder::encode(opus_pt, &payload(s, n), &[block(n, 2), block(n, 1)]);
        h.send_as(s, red_pt, &red, LOUD);
        h.step(Duration::from_micros(3_333));
    }
    h.loss = None;
    let stats = h.sfu.snapshot().stats;
    let heard = h.clients[plain].received.len() as u64;
    // About 300 arrived; without the charge, 900 would be forwarded.
    assert!(
        (290..=310).contains(&stats.red_in),
        "{} arrived",
        stats.red_in
    );
    assert!(heard <= 3 * 100 + 50 + 10, "{heard} forwarded in 3 s");
    assert!(stats.red_recovered > 0 && stats.dropped_over_packet_rate > 0);
    assert_eq!(heard, stats.red_in + stats.red_recovered);
}
