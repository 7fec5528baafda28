//! Criterion benchmarks of the forwarding path, all in memory through the
//! sans-IO core with real str0m clients on the other side (no sockets):
//!
//! - `forward/fanout_N`: one SRTP datagram from a speaker in, N SRTP
//!   datagrams out (decrypt, speaker selection, slot rewrite, encrypt);
//!   `forward/fanout_red_N` the same to listeners that negotiated RED (each
//!   packet wrapped with the speaker's two previous ones);
//! - `rotating/P`: P participants in conversations of 4, everyone talking
//!   and hearing the 3 others, one packet from each in turn: the load
//!   generator's access pattern, so P = 4 against P = 200 shows what a large
//!   working set (cache misses, not instructions) costs;
//! - `crypto_floor/*_fanout_N`: the AES-GCM open + N seals alone on the same
//!   packet size, with aws-lc-rs (str0m's backend), the floor forwarding
//!   cannot go below;
//! - `demux/*`: routing a datagram among 10, 1,000 and 10,000 peers;
//! - `timer/wake`: one timer wake (pop + re-arm) among 10 .. 10,000 peers;
//! - `bite/packet`: bite assembly per packet, Ogg encoding amortised.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use beep_sfu::sfu::{BiteConfig, PeerId, SpeakerConfig, UnixClock};
use beep_sfu::testkit::internals::{
    self as demux, bite_to_ogg, BiteAssembler, Demux, Owner, TimerHeap, TimerKey,
};
use beep_sfu::testkit::internals::{Conversations, SpeakerId};
use beep_sfu::testkit::load::{everyone_talking, opus_payload as payload, unmetered_config};
use beep_sfu::testkit::Harness;
use str0m::net::Protocol;

/// A speaker and `fanout` single-slot listeners, connected and joined, the
/// speaker already active; `resident` other connected peers sit in other
/// conversations (their state competes for the caches, as on a busy server).
/// With `red`, the listeners negotiate RED.
fn conversation(fanout: usize, resident: usize, red: bool) -> (Harness, usize) {
    // The speaker sends far faster than real time (one packet per 20 µs of
    // simulated time): no media budget in the way.
    let mut h = Harness::with_config(unmetered_config());
    for i in 0..resident {
        h.add_client(&format!("resident{i}"), "r", true, 2);
    }
    let speaker = h.add_client("speaker", "s", true, 0);
    for i in 0..fanout {
        h.add_client_with(&format!("listener{i}"), "l", false, 1, red);
    }
    h.connect_all();
    for i in 0..resident {
        h.join(i, &format!("resident-room-{}", i / 4));
    }
    for i in resident..=resident + fanout {
        h.join(i, "room");
    }
    for n in 0..5 {
        h.send(speaker, &payload(n), -20);
        h.step(Duration::from_millis(20));
    }
    (h, speaker)
}

/// Packets in through the timed functions, printed after each group: with
/// callgrind's instruction total for that function it gives instructions
/// per packet exactly.
static TIMED_PACKETS: AtomicU64 = AtomicU64::new(0);

/// Prints and resets [`TIMED_PACKETS`].
fn report_timed(name: &str) {
    eprintln!(
        "{name}: {} packets through the timed function",
        TIMED_PACKETS.swap(0, Relaxed)
    );
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    let shapes = [
        (1usize, 0usize, false),
        (3, 0, false),
        (10, 0, false),
        (3, 200, false),
        (3, 0, true),
    ];
    for (fanout, resident, red) in shapes {
        let (mut h, speaker) = conversation(fanout, resident, red);
        let source = h.clients[speaker].addr;
        let mut n = 1000u32;
        g.throughput(Throughput::Elements(fanout as u64));
        let id = if red {
            BenchmarkId::new("fanout_red", fanout)
        } else if resident == 0 {
            BenchmarkId::new("fanout", fanout)
        } else {
            BenchmarkId::new(format!("fanout_{fanout}_with_resident_peers"), resident)
        };
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(2000);
                    left -= chunk;
                    // Encrypting at the client is not what is measured.
                    let mut datagrams = Vec::with_capacity(chunk as usize);
                    for _ in 0..chunk {
                        h.now += Duration::from_micros(20);
                        n += 1;
                        let produced = h.produce(speaker, &payload(n), -20);
                        datagrams.extend(produced.into_iter().map(|d| (source, d)));
                    }
                    assert!(
                        datagrams.len() as u64 >= chunk,
                        "the speaker produced its packets"
                    );
                    let mut stun = Vec::new();
                    let t = Instant::now();
                    let out = timed_batch(&mut h, &datagrams, &mut stun);
                    total += t.elapsed();
                    for (from, to, d) in stun {
                        h.deliver(from, to, &d);
                    }
                    assert!(out > 0, "the core sent the forwarded packets");
                    black_box(out);
                    // Untimed: let ICE consent checks and RTCP flow both ways
                    // so the simulated peers stay connected however long it runs.
                    h.step(Duration::from_millis(1));
                }
                total
            })
        });
        let stats = h.sfu.snapshot().stats;
        assert!(
            stats.forwarded > 0,
            "the bench must forward (fanout {fanout})"
        );
        assert_eq!(red, stats.red_written > 0, "RED only to RED listeners");
        report_timed(&format!("forward/{fanout}/{resident}/red={red}"));
    }
    g.finish();
}

fn rotating(c: &mut Criterion) {
    let mut g = c.benchmark_group("rotating");
    g.sample_size(20);
    for participants in [4usize, 200] {
        let mut h = everyone_talking(unmetered_config(), participants, 3, 5);
        let mut n = 1000u32;
        // Each packet in is forwarded to the 3 others.
        g.throughput(Throughput::Elements(3));
        g.bench_function(BenchmarkId::from_parameter(participants), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                let mut processed = 0u64;
                while left > 0 {
                    // One 20 ms round: every participant sends one packet.
                    let rounds = (left as usize).div_ceil(participants).min(20);
                    let mut datagrams = Vec::with_capacity(rounds * participants);
                    for _ in 0..rounds {
                        h.now += Duration::from_millis(20);
                        n += 1;
                        for i in 0..participants {
                            for d in h.produce(i, &payload(n), -20) {
                                datagrams.push((h.clients[i].addr, d));
                            }
                        }
                    }
                    left = left.saturating_sub((rounds * participants) as u64);
                    processed += (rounds * participants) as u64;
                    let mut stun = Vec::new();
                    let t = Instant::now();
                    let out = timed_batch(&mut h, &datagrams, &mut stun);
                    total += t.elapsed();
                    // Untimed: the core's ICE consent checks reach their
                    // clients (most simulated time passes in the timed part).
                    for (from, to, d) in stun {
                        h.deliver(from, to, &d);
                    }
                    assert!(out > 0, "the core sent the forwarded packets");
                    black_box(out);
                    h.step(Duration::from_millis(1));
                }
                // Whole rounds may overshoot `iters`: scale to what was asked.
                total.mul_f64(iters as f64 / processed.max(1) as f64)
            })
        });
        assert!(h.sfu.snapshot().stats.forwarded > 0);
        report_timed(&format!("rotating/{participants}"));
    }
    g.finish();
}

/// The timed part of a `forward/*` or `rotating/*` iteration: every
/// datagram into the core and every transmit out, with the core's ICE checks
/// kept for the clients. A function of its own (never inlined) so that
/// callgrind counts exactly this: `--toggle-collect='*timed_batch*'`.
#[inline(never)]
fn timed_batch(
    h: &mut Harness,
    datagrams: &[(SocketAddr, Vec<u8>)],
    stun: &mut Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
) -> usize {
    TIMED_PACKETS.fetch_add(datagrams.len() as u64, Relaxed);
    let now = h.now;
    let mut out = 0usize;
    for (source, d) in datagrams {
        h.sfu.handle_datagram(now, *source, d);
        while let Some(t) = h.sfu.poll_transmit() {
            out += t.contents.len();
            // RFC 7983: a first byte below 4 is STUN.
            if t.contents.first().is_some_and(|b| *b < 4) {
                stun.push((t.source, t.destination, t.contents.to_vec()));
            }
        }
    }
    out
}

fn crypto_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("crypto_floor");
    // RTP header (12) + audio level extension (8) + payload (80); tag 16.
    let header = [0u8; 20];
    let plain = payload(1);
    for (name, alg, key_len) in [
        ("aes128gcm", &AES_128_GCM, 16),
        ("aes256gcm", &AES_256_GCM, 32),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; key_len]).unwrap());
        let mut sealed = plain.clone();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([1; 12]),
            Aad::from(&header),
            &mut sealed,
        )
        .unwrap();
        for fanout in [1usize, 3, 10] {
            g.throughput(Throughput::Elements(fanout as u64));
            g.bench_function(BenchmarkId::new(format!("{name}_fanout"), fanout), |b| {
                let mut buf = Vec::with_capacity(128);
                b.iter(|| {
                    buf.clear();
                    buf.extend_from_slice(&sealed);
                    let opened = key
                        .open_in_place(
                            Nonce::assume_unique_for_key([1; 12]),
                            Aad::from(&header),
                            &mut buf,
                        )
                        .unwrap()
                        .len();
                    for i in 0..fanout {
                        let mut out = Vec::with_capacity(128);
                        out.extend_from_slice(&plain[..opened]);
                        key.seal_in_place_append_tag(
                            Nonce::assume_unique_for_key([i as u8; 12]),
                            Aad::from(&header),
                            &mut out,
                        )
                        .unwrap();
                        black_box(&out);
                    }
                })
            });
        }
    }
    g.finish();
}

/// A real STUN binding request as a str0m client sends it, with the given
/// server ufrag.
fn stun_request(server_ufrag: &str) -> Vec<u8> {
    use str0m::ice::{StunMessage, TransId};
    let username = format!("{server_ufrag}:clientufrag");
    let msg = StunMessage::binding_request(&username, TransId::new(), false, 0, 12345, false);
    let mut buf = vec![0u8; 512];
    let n = msg
        .to_bytes(Some(b"password-password"), &mut buf, |key, parts| {
            let mut out = [0u8; 20];
            let tag = aws_lc_rs::hmac::sign(
                &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key),
                &parts.concat(),
            );
            out.copy_from_slice(tag.as_ref());
            out
        })
        .unwrap();
    buf.truncate(n);
    buf
}

fn demux_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("demux");
    for peers in [10usize, 1_000, 10_000] {
        let mut d = Demux::default();
        let addr = |i: usize| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
                40000 + (i % 20000) as u16,
            )
        };
        for i in 0..peers {
            d.add_ufrag(format!("ufrag{i:08}"), PeerId(i as u64));
            d.learn_addr((Protocol::Udp, addr(i)), PeerId(i as u64));
        }
        let known = addr(peers / 2);
        let unknown: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let stun = stun_request(&format!("ufrag{:08}", peers / 2));
        assert_eq!(
            demux::stun_local_ufrag(&stun).and_then(|u| d.by_ufrag(u)),
            Some(PeerId((peers / 2) as u64))
        );
        g.bench_function(BenchmarkId::new("srtp_by_addr", peers), |b| {
            b.iter(|| d.by_addr(black_box(&(Protocol::Udp, known))))
        });
        g.bench_function(BenchmarkId::new("unknown_source", peers), |b| {
            b.iter(|| d.by_addr(black_box(&(Protocol::Udp, unknown))))
        });
        g.bench_function(BenchmarkId::new("stun_by_ufrag", peers), |b| {
            b.iter(|| demux::stun_local_ufrag(black_box(&stun)).and_then(|u| d.by_ufrag(u)))
        });
    }
    g.finish();
}

fn timer_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer");
    for peers in [10usize, 1_000, 10_000] {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        for i in 0..peers {
            h.push(
                t0 + Duration::from_micros((i as u64 * 7919) % 1_000_000),
                TimerKey::Peer(PeerId(i as u64)),
            );
        }
        let mut now = t0;
        g.bench_function(BenchmarkId::new("wake", peers), |b| {
            b.iter(|| {
                // One wake: take the earliest due entry, re-arm it 1 s later.
                let (at, key) = h.pop_due(now + Duration::from_secs(2)).unwrap();
                now = at;
                h.push(at + Duration::from_secs(1), key);
            })
        });
    }
    g.finish();
}

fn bite_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("bite");
    let t0 = Instant::now();
    let mut a = BiteAssembler::new(BiteConfig::default());
    let clock = UnixClock::new(t0, 0);
    let p: Arc<[u8]> = Arc::from(payload(1).into_boxed_slice());
    let mut n = 0u32;
    g.throughput(Throughput::Elements(1));
    g.bench_function("packet", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let owner = Owner {
                conversation: "room",
                userid: "u",
                clientid: "c",
                clock: &clock,
            };
            let now = t0 + Duration::from_millis(u64::from(n) * 20);
            black_box(a.on_packet(PeerId(1), owner, n.wrapping_mul(960), &p, true, now));
            // One-second bites: the Ogg encode is amortised over 50 packets.
            if n.is_multiple_of(50) {
                black_box(a.flush(PeerId(1)).map(|b| bite_to_ogg(&b.audio)));
            }
        })
    });
    g.finish();
}

/// A conversation of `n` members with 3 slots each: all join, then all
/// leave, with the two loudest speaking throughout (a membership change
/// must not rebuild everyone's slots).
fn conversation_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("conversation");
    g.sample_size(10);
    for n in [100u64, 1_000] {
        g.throughput(Throughput::Elements(2 * n));
        g.bench_function(BenchmarkId::new("join_then_leave_all", n), |b| {
            b.iter(|| {
                let t0 = Instant::now();
                let mut convs = Conversations::new(SpeakerConfig::default());
                let key = convs.intern("big");
                for p in 0..n {
                    convs.add_member(key, PeerId(p), 3, t0);
                    if p < 2 {
                        convs.on_packet(key, SpeakerId(p), Some(-20), t0);
                    }
                }
                for p in (0..n).rev() {
                    convs.remove_member(key, PeerId(p), t0);
                }
                black_box(convs.count())
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    forward,
    rotating,
    crypto_floor,
    demux_bench,
    timer_bench,
    bite_bench,
    conversation_bench
);
criterion_main!(benches);
