//! Our patches to str0m (`third_party/str0m/PATCHES.md`), checked through
//! str0m's public API with two real `Rtc`s (ICE, DTLS, SRTP) exchanging
//! datagrams in memory: "a" offers receive-only audio m-lines, "b" answers
//! as an ICE-lite server does and sends on them, as beep-sfu does.
//!
//! Each test fails on the published str0m 0.25.0: there a written packet
//! waits for a timeout, every send stream holds an RTX cache, and the RTCP
//! queues keep the capacity of their largest burst.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use beep_sfu::testkit::load::CountingAlloc;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::rtcp::Rtcp;
use str0m::rtp::{RawPacket, RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The heap counter is process-wide: tests that read it run one at a time.
static HEAP: Mutex<()> = Mutex::new(());

/// Two connected `Rtc`s and the simulated clock.
struct Pair {
    a: Rtc,
    b: Rtc,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    now: Instant,
    /// The m-lines b sends on.
    mids: Vec<Mid>,
    /// Sender reports a received, by packet count.
    sr_counts: Vec<u32>,
    /// RTP payloads a received.
    received: Vec<Vec<u8>>,
    a_connected: bool,
    b_connected: bool,
}

impl Pair {
    /// Connects a (offering `slots` receive-only audio m-lines) and b.
    fn connected(slots: usize) -> Pair {
        let now = Instant::now();
        let a_addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b_addr: SocketAddr = "10.0.0.2:6000".parse().unwrap();
        let mut a = RtcConfig::new()
            .clear_codecs()
            .enable_opus(true, false)
            .set_rtp_mode(true)
            .enable_raw_packets(true)
            .build(now);
        // As beep-sfu configures its side (`sfu::request::rtc_config`).
        let mut b = RtcConfig::new()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .set_rtp_mode(true)
            .set_stats_interval(None)
            .set_send_buffer_audio(8)
            .build(now);
        a.add_local_candidate(Candidate::host(a_addr, "udp").unwrap());
        b.add_local_candidate(Candidate::host(b_addr, "udp").unwrap());
        let mut api = a.sdp_api();
        let mids: Vec<Mid> = (0..slots)
            .map(|_| api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None))
            .collect();
        let (offer, pending) = api.apply().unwrap();
        let offer = SdpOffer::from_sdp_string(&offer.to_sdp_string()).unwrap();
        let answer = b.sdp_api().accept_offer(offer).unwrap();
        let answer = SdpAnswer::from_sdp_string(&answer.to_sdp_string()).unwrap();
        a.sdp_api().accept_answer(pending, answer).unwrap();
        let mut p = Pair {
            a,
            b,
            a_addr,
            b_addr,
            now,
            mids,
            sr_counts: vec![],
            received: vec![],
            a_connected: false,
            b_connected: false,
        };
        p.run_until(Duration::from_secs(5), |p| p.a_connected && p.b_connected);
        // Let every stream see its first timeout.
        p.run_for(Duration::from_millis(200));
        p
    }

    /// b's payload type for Opus.
    fn pt(&self) -> Pt {
        self.b
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .unwrap()
    }

    /// Drains b; returns its datagrams and its timeout.
    fn drain_b(&mut self) -> (Vec<Vec<u8>>, Instant) {
        let mut out = vec![];
        loop {
            match self.b.poll_output().unwrap() {
                Output::Timeout(t) => return (out, t),
                Output::Transmit(t) => out.push(t.contents.to_vec()),
                Output::Event(Event::Connected) => self.b_connected = true,
                Output::Event(_) => {}
            }
        }
    }

    /// Drains a; returns its datagrams and its timeout.
    fn drain_a(&mut self) -> (Vec<Vec<u8>>, Instant) {
        let mut out = vec![];
        loop {
            match self.a.poll_output().unwrap() {
                Output::Timeout(t) => return (out, t),
                Output::Transmit(t) => out.push(t.contents.to_vec()),
                Output::Event(Event::Connected) => self.a_connected = true,
                Output::Event(Event::RtpPacket(p)) => self.received.push(p.payload.to_vec()),
                Output::Event(Event::RawPacket(raw)) => {
                    if let RawPacket::RtcpRx(Rtcp::SenderReport(sr)) = *raw {
                        self.sr_counts.push(sr.sender_info.sender_packet_count);
                    }
                }
                Output::Event(_) => {}
            }
        }
    }

    fn deliver_to_a(&mut self, datagrams: Vec<Vec<u8>>) {
        for d in datagrams {
            let r = Receive::new(Protocol::Udp, self.b_addr, self.a_addr, &d).unwrap();
            self.a.handle_input(Input::Receive(self.now, r)).unwrap();
        }
    }

    fn deliver_to_b(&mut self, datagrams: Vec<Vec<u8>>) {
        for d in datagrams {
            let r = Receive::new(Protocol::Udp, self.a_addr, self.b_addr, &d).unwrap();
            self.b.handle_input(Input::Receive(self.now, r)).unwrap();
        }
    }

    /// One round: both drained, datagrams delivered, and whoever's timeout
    /// is due fed one. Returns the earliest next timeout.
    fn round(&mut self) -> Instant {
        loop {
            let (from_b, tb) = self.drain_b();
            let (from_a, ta) = self.drain_a();
            if from_a.is_empty() && from_b.is_empty() {
                if tb <= self.now {
                    self.b.handle_input(Input::Timeout(self.now)).unwrap();
                    continue;
                }
                if ta <= self.now {
                    self.a.handle_input(Input::Timeout(self.now)).unwrap();
                    continue;
                }
                return ta.min(tb);
            }
            self.deliver_to_a(from_b);
            self.deliver_to_b(from_a);
        }
    }

    /// Runs, jumping to each next timeout, until `done` or `within` passes.
    fn run_until(&mut self, within: Duration, done: impl Fn(&Pair) -> bool) {
        let end = self.now + within;
        while !done(self) {
            let next = self.round();
            assert!(self.now < end, "not done within {within:?}");
            self.now = next.clamp(self.now + Duration::from_millis(1), end);
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(d + Duration::from_millis(1), |p| p.now >= end);
    }

    /// b writes one packet on its first m-line, through the patched path.
    fn write(&mut self, seq: u64, payload: &[u8]) -> bool {
        let (mid, pt, now) = (self.mids[0], self.pt(), self.now);
        let w = RtpWrite::new(
            pt,
            SeqNo::from(seq),
            seq as u32 * 960,
            now,
            payload.to_vec(),
        );
        self.b.direct_api().write_rtp(mid, None, w)
    }
}

#[test]
fn a_written_packet_leaves_in_the_next_poll_output_with_no_timeout_fed() {
    let _g = HEAP.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = Pair::connected(1);
    let (idle, _) = p.drain_b();
    assert!(idle.is_empty(), "b is idle before the write");

    assert!(p.write(1, b"first packet"));
    // No Input::Timeout between the write and this poll.
    match p.b.poll_output().unwrap() {
        Output::Transmit(t) => {
            let d = t.contents.to_vec();
            p.deliver_to_a(vec![d]);
        }
        other => panic!("expected the packet at once, got {other:?}"),
    }
    p.drain_a();
    assert_eq!(p.received, vec![b"first packet".to_vec()]);

    // A write on an m-line that b does not send on writes nothing.
    let w = RtpWrite::new(p.pt(), SeqNo::from(2), 0, p.now, vec![1, 2, 3]);
    assert!(!p.b.direct_api().write_rtp(Mid::from("nope"), None, w));
}

#[test]
fn sender_reports_count_every_packet_written_without_timeouts() {
    let _g = HEAP.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = Pair::connected(1);
    let n = 250u64;
    for seq in 1..=n {
        assert!(p.write(seq, &[0xF8, 0xFF, 0xFE, seq as u8]));
        // Only b's own deadlines are fed (in `round`), as beep-sfu does.
        p.round();
        p.now += Duration::from_millis(20);
    }
    assert_eq!(p.received.len() as u64, n, "every packet arrived");
    let before = p.sr_counts.len();
    p.run_until(Duration::from_secs(10), |p| p.sr_counts.len() > before);
    assert_eq!(*p.sr_counts.last().unwrap(), n as u32);
}

/// Heap held by b: what dropping it frees.
fn heap_of_b(p: Pair) -> i64 {
    let Pair { a, b, .. } = p;
    drop(a);
    let before = CountingAlloc::live_bytes();
    drop(b);
    before - CountingAlloc::live_bytes()
}

#[test]
fn send_m_lines_hold_no_rtx_cache_without_rtx() {
    let _g = HEAP.lock().unwrap_or_else(|e| e.into_inner());
    // Packets sent, so a cache would be holding them.
    let mut one = Pair::connected(1);
    let mut nine = Pair::connected(9);
    for p in [&mut one, &mut nine] {
        for seq in 1..=20 {
            let mids = p.mids.clone();
            for mid in mids {
                let w = RtpWrite::new(p.pt(), SeqNo::from(seq), 0, p.now, vec![0xF8; 100]);
                assert!(p.b.direct_api().write_rtp(mid, None, w));
            }
            p.round();
            p.now += Duration::from_millis(20);
        }
    }
    let per_mline = (heap_of_b(nine) - heap_of_b(one)) / 8;
    // Each further m-line b sends on costs its media description, its send
    // stream and SDP state: 9,368 bytes with the patch. An RTX cache (10
    // entries of a 408-byte `RtpPacket`) and the resend-ratio history add
    // about 5 KiB more (14,408 bytes on the published str0m).
    assert!(
        per_mline < 12 * 1024,
        "each send m-line holds {per_mline} bytes of heap"
    );
}

#[test]
fn rtcp_queues_give_memory_back_after_a_burst() {
    let _g = HEAP.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = Pair::connected(1);
    p.run_for(Duration::from_secs(2));
    let before = CountingAlloc::live_bytes();
    // A burst of 500 feedback messages (about 520 KiB of queued `Rtcp`).
    let ssrc =
        p.b.direct_api()
            .stream_tx_by_mid(p.mids[0], None)
            .unwrap()
            .ssrc();
    for _ in 0..500 {
        p.b.direct_api().send_pli_feedback(ssrc, ssrc);
    }
    let grown = CountingAlloc::live_bytes() - before;
    assert!(grown > 256 * 1024, "the burst was queued ({grown} bytes)");
    p.run_for(Duration::from_millis(500));
    let kept = CountingAlloc::live_bytes() - before;
    assert!(
        kept < 64 * 1024,
        "{kept} bytes still held after the burst was sent"
    );
}
