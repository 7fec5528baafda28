//! Entry points for the `cargo fuzz` targets in `fuzz/`: each takes the
//! fuzzer's bytes, feeds them to one piece of the server that reads what
//! clients send, and panics only when an invariant breaks (a panic on the
//! input itself is the bug the fuzzer looks for).

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::command::{PeerNotice, SendError};
use crate::http::{claims, request};
use crate::sfu::internals::{BiteAssembler, Owner, SpeakerId};
use crate::sfu::{
    BiteConfig, Claim, CloseReason, ConnectError, PeerId, Reply, Request, Sfu, SfuConfig, UnixClock,
};
use crate::signalling::session::ConnectReply;
use crate::signalling::{Action, Session};
use crate::testkit::Harness;

/// The `X-User-Claim` header.
pub fn claim(data: &[u8]) {
    let _ = claims::parse_header(data);
}

/// An HTTP request head, then the claim of the request it makes.
pub fn request_head(data: &[u8]) {
    if let Ok(Some(req)) = request::parse_head(data) {
        let _ = claims::from_request(&req, true);
        let _ = claims::from_request(&req, false);
        let _ = req.header_has_token("connection", "upgrade");
        let _ = req.query_param("userid");
    }
}

/// A signalling session fed frames (split at 0xFF), with the loop's
/// replies, notices and ticks chosen by the bytes too.
pub fn signalling(data: &[u8]) {
    let t0 = Instant::now();
    let mut s = Session::new(t0, Duration::from_secs(30));
    for (i, frame) in data.split(|b| *b == 0xFF).enumerate() {
        let text = String::from_utf8_lossy(frame);
        let action = match frame.first().copied().unwrap_or(0) % 8 {
            0 => s.on_tick(t0 + Duration::from_secs(u64::from(frame.len() as u8))),
            1 => s.on_notice(PeerNotice::Closed(CloseReason::Disconnected)),
            2 => s.on_send_failed(SendError::Full),
            _ => s.on_text(&text),
        };
        if let Action::Connect(_) = action {
            let reply = match i % 3 {
                0 => ConnectReply::Answer(Ok((PeerId(1), "v=0".into()))),
                1 => ConnectReply::Answer(Err(ConnectError::NoOpus)),
                _ => ConnectReply::TimedOut,
            };
            let _ = s.on_connect_reply(reply);
        }
    }
}

thread_local! {
    static OFFER_CORE: RefCell<(Sfu, Instant)> = RefCell::new((
        Sfu::new(
            SfuConfig::new(std::net::SocketAddr::from(([10, 0, 0, 1], 5000))),
            UnixClock::new(Instant::now(), 0),
        ),
        Instant::now(),
    ));
    static CALL: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// An SDP offer through the cheap pre-check and str0m's `accept_offer`.
pub fn offer(data: &[u8]) {
    OFFER_CORE.with(|c| {
        let (sfu, now) = &mut *c.borrow_mut();
        // Earlier peers never connect: move past their connect timeout.
        *now += Duration::from_secs(31);
        sfu.handle_timeout(*now);
        let request = Request::Connect {
            claim: Claim {
                userid: "fuzz".into(),
                clientid: "f".into(),
            },
            offer: String::from_utf8_lossy(data).into_owned(),
        };
        if let Reply::Connect(Ok((_, answer))) = sfu.handle_request(*now, request) {
            assert!(answer.starts_with("v=0"), "an answer is SDP");
        }
        while sfu.poll_transmit().is_some() {}
        while sfu.poll_event().is_some() {}
    });
}

/// Arbitrary bytes from a connected, joined peer's own address.
pub fn datagram(data: &[u8]) {
    CALL.with(|c| {
        let mut c = c.borrow_mut();
        let h = c.get_or_insert_with(|| {
            let mut h = Harness::new();
            let a = h.add_client("alice", "a", true, 0);
            let b = h.add_client("bob", "b", true, 0);
            h.connect_all();
            h.join(a, "room");
            h.join(b, "room");
            h
        });
        let source = h.clients[0].addr;
        h.sfu.handle_datagram(h.now, source, data);
        while h.sfu.poll_transmit().is_some() {}
        while h.sfu.poll_event().is_some() {}
    });
}

/// Slot rewriting: whatever arrives, no outgoing sequence number is sent
/// twice and every timestamp is defined.
pub fn slot(data: &[u8]) {
    let t0 = Instant::now();
    let mut slot = crate::sfu::internals::Slot::new(str0m::media::Mid::from("0"), 7, 0);
    let mut seqs = [0u64; 4];
    let mut seen = HashSet::new();
    for (i, c) in data.chunks(4).enumerate() {
        let [a, b, d, e] = [
            c[0],
            *c.get(1).unwrap_or(&0),
            *c.get(2).unwrap_or(&0),
            *c.get(3).unwrap_or(&0),
        ];
        let who = usize::from(a % 4);
        let step = i64::from(i16::from_be_bytes([b, d]));
        seqs[who] = (seqs[who] as i64 + step).max(0) as u64;
        let pkt = crate::sfu::internals::Incoming {
            speaker: SpeakerId(who as u64),
            ssrc: u32::from(e % 3),
            seq: seqs[who],
            timestamp: (seqs[who] as u32).wrapping_mul(960),
            marker: e & 0x80 != 0,
        };
        let now = t0 + Duration::from_millis(20 * i as u64);
        if let Some(out) = slot.rewrite(pkt, now) {
            assert!(seen.insert(out.seq), "outgoing {} reused", out.seq);
        }
    }
}

/// Bite assembly: whatever the timestamps, sizes and levels, a bite stays
/// within its caps.
pub fn bite(data: &[u8]) {
    let t0 = Instant::now();
    let config = BiteConfig::default();
    let mut a = BiteAssembler::new(config);
    let clock = UnixClock::new(t0, 0);
    let owner = || Owner {
        conversation: "c",
        userid: "u",
        clientid: "d",
        clock: &clock,
    };
    let mut ts = 0u32;
    let mut now = t0;
    let mut done = Vec::new();
    for c in data.chunks(4) {
        let [x, y, z, w] = [
            c[0],
            *c.get(1).unwrap_or(&0),
            *c.get(2).unwrap_or(&0),
            *c.get(3).unwrap_or(&0),
        ];
        ts = ts.wrapping_add(u32::from_be_bytes([0, x, y, 0]));
        now += Duration::from_millis(u64::from(z));
        let payload = vec![0xF8; usize::from(w) * 6];
        done.extend(a.on_packet(PeerId(1), owner(), ts, &payload, w & 1 == 1, now));
        a.handle_timeout(now, &mut done);
    }
    done.extend(a.flush(PeerId(1)));
    for b in &done {
        assert!(b.packets <= config.max_packets, "{} packets", b.packets);
        assert!(
            b.audio.byte_len() <= config.max_bytes,
            "{} bytes",
            b.audio.byte_len()
        );
        assert!(!crate::sink::bite_file::to_ogg(&b.audio).is_empty());
    }
}

/// A cluster message off NATS: the bytes as they came (they must never
/// open without the key), and, from the second byte on, a body sealed with
/// the key by a node the first byte names, so the checks an authenticated
/// message still passes are fuzzed too. Whatever passes the checks is
/// within the local bounds.
pub fn cluster(data: &[u8]) {
    use crate::cluster::seal::{ClusterKey, Kind, Opener, Sealer};
    use crate::cluster::validate::{self, MAX_BATCH_PACKETS, MAX_HEARTBEAT_ITEMS};
    use crate::sfu::ClusterInput;
    let Ok(key) = ClusterKey::new(&[0x42; 32]) else {
        return;
    };
    let now = Instant::now();
    let now_ms = 1_700_000_000_000;
    let mut opener = Opener::new(vec![key.clone()]);
    assert!(
        opener.open(data, "beep.sfu.join", now_ms, now).is_err(),
        "bytes made without the key opened"
    );
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kind = match which % 3 {
        0 => Kind::Heartbeat,
        1 => Kind::Join,
        _ => Kind::Media,
    };
    let node = ["a", "node-b", "x\r\n"][usize::from(which / 3) % 3];
    let mut sealer = Sealer::new(&key, node, u64::from(which));
    let sealed = sealer.seal(kind, "beep.sfu.heartbeat", now_ms, body);
    let Ok(opened) = opener.open(&sealed, "beep.sfu.heartbeat", now_ms, now) else {
        assert!(
            node.contains('\r'),
            "a sealed message from a valid node did not open"
        );
        return;
    };
    assert_eq!(opened.body, body, "the body round-trips");
    let Ok(checked) = validate::check(opened.kind, &opened.node, &opened.body) else {
        return;
    };
    match checked.input {
        ClusterInput::Heartbeat {
            conversations,
            users,
            ..
        } => {
            assert!(
                conversations.len() <= MAX_HEARTBEAT_ITEMS && users.len() <= MAX_HEARTBEAT_ITEMS
            );
            assert!(users
                .iter()
                .all(|m| !m.userid.is_empty() && m.userid.len() <= 256));
        }
        ClusterInput::Media { packets, .. } => {
            assert!(packets.len() <= MAX_BATCH_PACKETS);
            assert!(packets
                .iter()
                .all(|p| !p.payload.is_empty() && p.payload.len() <= 1_500));
        }
        ClusterInput::Join(m) => assert!(!m.conversation.is_empty() && m.conversation.len() <= 256),
        ClusterInput::Goodbye { .. } => {}
    }
}

/// RED (RFC 2198) from a sender: whatever the bytes, checking never panics;
/// what passes yields at most 2 recovered packets, each inside the gap it
/// fills, and every RED payload we build from it round-trips through our
/// own checks and str0m's decoder with the same primary.
pub fn red(data: &[u8]) {
    use crate::sfu::red::{unwrap, History};
    use std::sync::Arc;
    let Some((&first, packet)) = data.split_first() else {
        return;
    };
    let Ok(u) = unwrap(packet, 111) else {
        return;
    };
    let mut h = History::default();
    for i in 0..4u64 {
        h.push(7, i, i as u32 * 960, &Arc::from(&[0xF8, i as u8][..]), 3);
    }
    let seq = 4 + u64::from(first % 8);
    let ts = (seq as u32).wrapping_mul(960);
    let recovered = h.recoverable(7, seq, ts, &u);
    assert!(recovered.len() <= 2, "{} recovered", recovered.len());
    for r in &recovered {
        assert!(
            r.seq > 3 && r.seq < seq,
            "recovered seq {} outside the gap",
            r.seq
        );
        let after_newest = r.ts.wrapping_sub(3 * 960);
        assert!(
            after_newest != 0 && after_newest < 1 << 31,
            "recovered ts {}",
            r.ts
        );
        h.push(7, r.seq, r.ts, &r.payload, 3);
    }
    let primary: Arc<[u8]> = Arc::from(u.primary);
    let red = h.redundancy(7, ts, &primary, usize::from(first % 4));
    for n in 0..=3 {
        let built = red.payload(n, 111);
        let back = unwrap(&built, 111).expect("what we build passes our own checks");
        assert_eq!(back.primary, u.primary);
        assert!(back.redundant().count() <= n);
        let blocks = str0m::rtp::RedDecoder::decode(&built).expect("str0m decodes ours");
        assert_eq!(blocks.last().map(|b| b.payload), Some(u.primary));
    }
}
