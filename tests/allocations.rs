//! The forwarding path allocates nothing of its own: counted with a counting
//! global allocator (this file is its own test binary, so the allocator
//! sees only this test), every allocation per packet is one str0m makes.
//!
//! str0m 0.25 allocates, per packet in, the decrypted buffer and the
//! payload's `Arc<[u8]>`, and per forwarded packet the encrypted datagram
//! (found with `valgrind --tool=dhat` on `benches/memory.rs`; BENCHMARKS.md
//! section 8). One allocation per forwarded packet in our code would add a
//! third to the count and fail this test.

use std::time::Duration;

use beep_sfu::sfu::SfuConfig;
use beep_sfu::testkit::load::{everyone_talking, opus_payload, CountingAlloc};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[test]
fn forwarding_allocates_only_what_str0m_does() {
    // Two conversations of 4, everyone talking and hearing the 3 others,
    // warmed up: speakers selected, bites open, every queue at its size.
    let config = SfuConfig::new("10.0.0.1:5000".parse().expect("an address"));
    let mut h = everyone_talking(config, 8, 3, 50);
    let before = h.sfu.snapshot().stats;
    let (mut allocs, mut packets) = (0u64, 0u64);
    for n in 50..100 {
        h.now += Duration::from_millis(20);
        let mut datagrams = Vec::new();
        for i in 0..8 {
            for d in h.produce(i, &opus_payload(n), -20) {
                datagrams.push((h.clients[i].addr, d));
            }
        }
        let now = h.now;
        for (source, d) in &datagrams {
            // Only RTP is counted (RFC 5761/7983: first byte 128..=191, and
            // not an RTCP packet type 192..=223 in the clear second byte):
            // an RTCP report or an ICE check takes str0m's other paths.
            let rtp = d.first().is_some_and(|b| (128..=191).contains(b))
                && d.get(1).is_some_and(|pt| !(192..=223).contains(pt));
            let before = CountingAlloc::allocations();
            h.sfu.handle_datagram(now, *source, d);
            while h.sfu.poll_transmit().is_some() {}
            if rtp {
                allocs += CountingAlloc::allocations() - before;
                packets += 1;
            }
        }
        h.step(Duration::from_millis(1));
    }
    let after = h.sfu.snapshot().stats;
    let rtp = after.rtp_in - before.rtp_in;
    let forwarded = after.forwarded - before.forwarded;
    assert_eq!(rtp, 400, "every talker's packet reached the core");
    assert_eq!(forwarded, 3 * rtp, "each packet went to the 3 others");
    assert_eq!(packets, rtp, "every RTP datagram was counted");
    // str0m's own: two per packet in, one per forwarded packet; a little
    // slack for its queues' occasional growth, far less than one per packet.
    let str0m = 2 * packets + forwarded;
    assert!(
        allocs <= str0m + rtp / 10,
        "{allocs} allocations for {packets} packets in and {forwarded} forwarded \
         (str0m alone makes {str0m})"
    );
    eprintln!("{allocs} allocations; str0m's own floor: {str0m}");
}
