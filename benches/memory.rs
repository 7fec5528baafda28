//! What the core holds and allocates, counted exactly by a counting global
//! allocator (so the figures repeat to the byte on this noisy machine):
//!
//! - heap the core holds per participant, P participants in conversations of
//!   4, everyone talking and hearing the 3 others, after 9 s of talk
//!   (measured by dropping the core: what its drop frees is what it held),
//!   with the default 10 s bites and with bites cut at 20 ms, the
//!   difference being the audio of the bites being assembled;
//! - heap allocations per packet in and per forwarded packet on the
//!   forwarding path.
//!
//! `cargo bench --bench memory`. Not timed: it prints a table.

use std::time::{Duration, Instant};

use beep_sfu::sfu::{BiteConfig, Sfu, SfuConfig, UnixClock};
use beep_sfu::testkit::load::{everyone_talking, opus_payload, unmetered_config, CountingAlloc};
use beep_sfu::testkit::Harness;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The core's configuration: no media budget, bites as given.
fn config(bites: BiteConfig) -> SfuConfig {
    SfuConfig {
        bites,
        ..unmetered_config()
    }
}

/// Bytes the core holds: what dropping it frees.
fn core_heap(h: &mut Harness, bites: BiteConfig) -> i64 {
    let empty = Sfu::new(config(bites), UnixClock::new(Instant::now(), 0));
    let before = CountingAlloc::live_bytes();
    drop(std::mem::replace(&mut h.sfu, empty));
    before - CountingAlloc::live_bytes()
}

fn main() {
    // MEMORY_ONLY=P
    // builds P participants (MEMORY_SLOTS slots each, default 3), frees
    // everything but the core and exits with
    // the core alive: under `valgrind --tool=dhat` the bytes live at exit
    // ("eb") are exactly the core's, by allocation site.
    if let Some(p) = std::env::var("MEMORY_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let slots = std::env::var("MEMORY_SLOTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let mut h = everyone_talking(config(BiteConfig::default()), p, slots, 9 * 50);
        h.clients.clear();
        h.events.clear();
        h.events.shrink_to_fit();
        println!(
            "core heap: {} bytes live in all",
            CountingAlloc::live_bytes()
        );
        std::process::exit(0);
    }
    // `cargo test --all-targets` runs this binary too, without `--bench`
    // and in a debug build: there, only check that it works, small.
    let full = std::env::args().any(|a| a == "--bench");
    let shapes: &[(usize, usize)] = if full {
        &[(4, 3), (200, 3), (200, 1)]
    } else {
        &[(4, 3)]
    };
    let short = BiteConfig {
        max_len: Duration::from_millis(20),
        ..BiteConfig::default()
    };
    // Sizes of str0m's types that its per-peer queues hold by value.
    println!(
        "str0m types: Rtc {} B, Rtcp {} B, RtpPacket {} B",
        std::mem::size_of::<str0m::Rtc>(),
        std::mem::size_of::<str0m::rtp::rtcp::Rtcp>(),
        std::mem::size_of::<str0m::rtp::RtpPacket>()
    );
    println!();
    println!("| participants | slots each | bites | core heap | per participant |");
    println!("|---|---|---|---|---|");
    for &(participants, slots) in shapes {
        for (label, bites) in [
            ("10 s (default)", BiteConfig::default()),
            ("cut at 20 ms", short),
        ] {
            // 9 s: mid-way through a 10 s bite, so its audio is held.
            let mut h = everyone_talking(config(bites), participants, slots, 9 * 50);
            let bytes = core_heap(&mut h, bites);
            println!(
                "| {participants} | {slots} | {label} | {:.1} KiB | {:.1} KiB |",
                bytes as f64 / 1024.0,
                bytes as f64 / 1024.0 / participants as f64
            );
        }
    }

    // Allocations on the forwarding path: 200 participants, one 20 ms round
    // of packets (each forwarded to 3), counted over 50 rounds.
    let mut h = everyone_talking(
        config(BiteConfig::default()),
        if full { 200 } else { 8 },
        3,
        2 * 50,
    );
    let before_fwd = h.sfu.snapshot().stats.forwarded;
    let (mut allocs, mut packets) = (0u64, 0u64);
    for round in 0..50u32 {
        h.now += Duration::from_millis(20);
        let mut datagrams = Vec::new();
        for i in 0..h.clients.len() {
            for d in h.produce(i, &opus_payload(1000 + round), -20) {
                datagrams.push((h.clients[i].addr, d));
            }
        }
        let now = h.now;
        let a0 = CountingAlloc::allocations();
        for (source, d) in &datagrams {
            h.sfu.handle_datagram(now, *source, d);
            while h.sfu.poll_transmit().is_some() {}
        }
        allocs += CountingAlloc::allocations() - a0;
        packets += datagrams.len() as u64;
        h.step(Duration::from_millis(1));
    }
    let forwarded = h.sfu.snapshot().stats.forwarded - before_fwd;
    println!();
    println!(
        "forwarding path: {packets} packets in, {forwarded} forwarded, {allocs} allocations: \
         {:.2} per packet in, {:.2} per forwarded packet",
        allocs as f64 / packets as f64,
        allocs as f64 / forwarded.max(1) as f64
    );
}
