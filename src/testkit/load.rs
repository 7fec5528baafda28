//! What the benchmarks and the allocation test build the same way: an
//! Opus-sized payload, a core configuration without a media budget, a
//! harness of conversations of 4 where everyone talks, and a counting
//! global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::Harness;
use crate::sfu::{BudgetConfig, SfuConfig};

/// An 80-byte payload with a valid 20 ms Opus TOC and `n` in bytes 1..5.
pub fn opus_payload(n: u32) -> Vec<u8> {
    let mut p = vec![0x5A; 80];
    p[0] = 0xF8;
    p[1..5].copy_from_slice(&n.to_be_bytes());
    p
}

/// A payload naming its sender and sequence, so a test can tell who it
/// heard: `[sender, n (4 bytes BE), 0xAB…]`, 80 bytes. (A sender over 255
/// is written as 255.)
pub fn payload<S: TryInto<u8>>(sender: S, n: u32) -> Vec<u8> {
    let mut p = vec![0xAB; 80];
    p[0] = sender.try_into().unwrap_or(u8::MAX);
    p[1..5].copy_from_slice(&n.to_be_bytes());
    p
}

/// A core configuration whose media budget refuses nothing, for benches
/// that send far faster than real time (the budget is still checked on
/// every packet, so the forwarding path is what is measured).
pub fn unmetered_config() -> SfuConfig {
    let mut config = SfuConfig::new(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        5000,
    ));
    config.budget = BudgetConfig {
        packets_per_sec: 1e9,
        packet_burst: 1e9,
        bytes_per_sec: 1e12,
        byte_burst: 1e12,
        ..BudgetConfig::default()
    };
    config
}

/// `participants` clients in conversations of 4, each offering `slots`
/// audio m-lines (one send-receive, the rest receive-only), connected and
/// joined, after `rounds` real-time 20 ms rounds in which everyone talked.
pub fn everyone_talking(
    config: SfuConfig,
    participants: usize,
    slots: usize,
    rounds: u32,
) -> Harness {
    let mut h = Harness::with_config(config);
    for i in 0..participants {
        h.add_client(&format!("talker{i}"), "t", true, slots.saturating_sub(1));
    }
    h.connect_all();
    for i in 0..participants {
        h.join(i, &format!("room-{}", i / 4));
    }
    for n in 0..rounds {
        for i in 0..participants {
            h.send(i, &opus_payload(n), -20);
        }
        h.step(Duration::from_millis(20));
    }
    h
}

/// The system allocator, counting allocations and live bytes. A bench or
/// test binary installs it with `#[global_allocator]`.
pub struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);

impl CountingAlloc {
    /// Allocations (including reallocations) so far.
    pub fn allocations() -> u64 {
        ALLOCATIONS.load(Relaxed)
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes() -> i64 {
        LIVE.load(Relaxed)
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// only observed.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        LIVE.fetch_add(layout.size() as i64, Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        LIVE.fetch_add(layout.size() as i64, Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}
