//! The cluster's envelope: every message a node publishes is authenticated
//! with the cluster key and its body encrypted (AES-256-GCM, aws-lc-rs), so
//! that nothing on Beep's shared NATS can forge, replay or read it.
//!
//! Wire format, all integers big-endian:
//!
//! ```text
//! "BSC1" | key id (4) | kind (1) | node length (1) | node | instance (8) | counter (8) | sent ms (8) | ciphertext and 16-byte tag
//! ```
//!
//! - Each sender boot (`node`, `instance`) seals with a key of its own,
//!   derived from the cluster key with HMAC-SHA256, so the 64-bit message
//!   counter alone makes every nonce unique.
//! - The associated data is the whole header and the subject the message
//!   was sent on: a message cannot be moved to another kind, node or subject.
//! - A receiver keeps a 64-message replay window per sender boot and
//!   refuses messages sent more than [`MAX_SKEW`] from its own clock, so a
//!   captured message replayed later changes nothing (it is either in the
//!   window or too old).
//! - Nothing is decoded before it is authenticated, and a receiver derives a
//!   sender's key before authentication but caches it only after.
//!
//! The node id travels in the clear (it names the sender's key); user ids,
//! conversation ids and audio never do.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hmac;

use super::valid_node_id;

/// First bytes of every cluster message (version 1 of the envelope).
const MAGIC: &[u8; 4] = b"BSC1";
/// Shortest cluster key, in bytes.
pub(crate) const MIN_KEY_BYTES: usize = 32;
/// A message sent further than this from the receiver's clock (either
/// way) is refused: the stated clock skew the cluster tolerates.
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(600);
/// Sender boots whose keys and replay windows are kept.
const MAX_SENDERS: usize = 1024;
/// A sender boot not heard from for this long is forgotten (its messages
/// are then older than [`MAX_SKEW`] and refused anyway).
const SENDER_TTL: Duration = Duration::from_secs(1200);
const TAG_LEN: usize = 16;

/// What a cluster message carries, bound into its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A node's presence (or goodbye).
    Heartbeat = 1,
    /// A join accepted on the sender.
    Join = 2,
    /// Relayed media for the receiver.
    Media = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Heartbeat),
            2 => Some(Kind::Join),
            3 => Some(Kind::Media),
            _ => None,
        }
    }
}

/// Why a message was refused before decoding (the `reason` label of
/// `beep_sfu_cluster_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not an envelope: too short, wrong magic, unknown kind.
    Malformed,
    /// The sender's node id is not a valid subject token.
    BadNode,
    /// Sealed with a key this node does not have (another deployment).
    UnknownKey,
    /// The tag did not verify: forged, altered, or moved to another subject.
    Forged,
    /// Already seen, or older than the replay window.
    Replayed,
    /// Sent further from this node's clock than the stated skew.
    Stale,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::BadNode => "bad_node_id",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Forged => "forged",
            Refusal::Replayed => "replayed",
            Refusal::Stale => "stale",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One cluster key: its id on the wire and its HMAC key.
#[derive(Clone)]
pub struct ClusterKey {
    id: u32,
    hmac: hmac::Key,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({:08x})", self.id)
    }
}

impl ClusterKey {
    /// A key from at least [`MIN_KEY_BYTES`] bytes of secret.
    pub fn new(secret: &[u8]) -> Result<ClusterKey, String> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(format!(
                "a cluster key needs at least {MIN_KEY_BYTES} bytes, this one has {}",
                secret.len()
            ));
        }
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&hmac, b"beep-sfu cluster key id");
        let b = tag.as_ref();
        Ok(ClusterKey {
            id: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            hmac,
        })
    }

    /// The id that names this key on the wire (not secret).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The AES-256-GCM key of one sender boot.
    fn sender_key(&self, node: &str, instance: u64) -> LessSafeKey {
        let mut ctx = hmac::Context::with_key(&self.hmac);
        ctx.update(b"beep-sfu cluster v1 seal");
        ctx.update(&[node.len() as u8]);
        ctx.update(node.as_bytes());
        ctx.update(&instance.to_be_bytes());
        let tag = ctx.sign();
        // 32 bytes of HMAC-SHA256 are exactly an AES-256 key.
        let unbound = UnboundKey::new(&AES_256_GCM, tag.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC-SHA256 output is 32 bytes"));
        LessSafeKey::new(unbound)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(header: &[u8], subject: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + subject.len());
    a.extend_from_slice(header);
    a.extend_from_slice(subject.as_bytes());
    a
}

/// This node's sealing side: its key, id and boot, and its counter.
pub(crate) struct Sealer {
    key: LessSafeKey,
    key_id: u32,
    node: String,
    instance: u64,
    counter: u64,
}

impl Sealer {
    /// Seals for `node` (a valid node id) in boot `instance`.
    pub fn new(key: &ClusterKey, node: &str, instance: u64) -> Sealer {
        Sealer {
            key: key.sender_key(node, instance),
            key_id: key.id(),
            node: node.to_string(),
            instance,
            counter: 0,
        }
    }

    /// The sealed message for `subject`.
    pub fn seal(&mut self, kind: Kind, subject: &str, sent_ms: u64, body: &[u8]) -> Vec<u8> {
        self.counter += 1;
        let mut out = Vec::with_capacity(42 + self.node.len() + body.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.push(kind as u8);
        out.push(self.node.len() as u8);
        out.extend_from_slice(self.node.as_bytes());
        out.extend_from_slice(&self.instance.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&sent_ms.to_be_bytes());
        let header_len = out.len();
        let aad = aad(&out, subject);
        let mut body = body.to_vec();
        // Sealing into a Vec cannot fail for a message under 64 GB.
        if self
            .key
            .seal_in_place_append_tag(nonce(self.counter), Aad::from(&aad), &mut body)
            .is_err()
        {
            body.clear();
        }
        out.truncate(header_len);
        out.extend_from_slice(&body);
        out
    }

    /// Bytes the envelope adds to a body.
    pub fn overhead(&self) -> usize {
        30 + self.node.len() + TAG_LEN + 8
    }
}

/// A message that passed authentication.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    /// What it carries.
    pub kind: Kind,
    /// The sender's node id (validated).
    pub node: String,
    /// The sender's boot.
    pub instance: u64,
    /// The plaintext body (still to decode and validate).
    pub body: Vec<u8>,
}

struct Sender {
    key: LessSafeKey,
    /// Highest counter accepted, and which of the 64 below it were seen.
    top: u64,
    seen: u64,
    last: Instant,
}

/// True if `counter` is new for a window whose highest counter is `top`
/// and whose last 64 are marked in `seen`.
fn in_window(top: u64, seen: u64, counter: u64) -> bool {
    counter > top || (top - counter < 64 && seen & (1 << (top - counter)) == 0)
}

impl Sender {
    /// Records `counter`; false if it was seen or is below the window.
    fn accept(&mut self, counter: u64) -> bool {
        if !in_window(self.top, self.seen, counter) {
            return false;
        }
        if counter > self.top {
            let shift = counter - self.top;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.top = counter;
            true
        } else {
            self.seen |= 1 << (self.top - counter);
            true
        }
    }
}

/// The receiving side: the keys accepted, and each sender boot's key and
/// replay window.
pub(crate) struct Opener {
    keys: Vec<ClusterKey>,
    senders: HashMap<(String, u64), Sender>,
}

impl Opener {
    /// Accepts messages sealed with any of `keys` (two during a roll).
    pub fn new(keys: Vec<ClusterKey>) -> Opener {
        Opener {
            keys,
            senders: HashMap::new(),
        }
    }

    /// Authenticates and decrypts one message received on `subject`.
    /// `now_ms` is this node's Unix time, `now` its monotonic time.
    pub fn open(
        &mut self,
        data: &[u8],
        subject: &str,
        now_ms: u64,
        now: Instant,
    ) -> Result<Opened, Refusal> {
        let h = Header::parse(data)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id() == h.key_id)
            .ok_or(Refusal::UnknownKey)?;
        let skew = MAX_SKEW.as_millis() as u64;
        if h.sent_ms.saturating_add(skew) < now_ms || h.sent_ms > now_ms.saturating_add(skew) {
            return Err(Refusal::Stale);
        }
        let id = (h.node.to_string(), h.instance);
        // A quick look before the crypto: seen already?
        if let Some(s) = self.senders.get(&id) {
            if !in_window(s.top, s.seen, h.counter) {
                return Err(Refusal::Replayed);
            }
        }
        let aad = aad(&data[..h.header_len], subject);
        let mut body = data[h.header_len..].to_vec();
        // An unknown sender's key is derived to check the tag, and kept
        // only if the message is genuine.
        let fresh = match self.senders.contains_key(&id) {
            true => None,
            false => Some(key.sender_key(h.node, h.instance)),
        };
        let k = match (&fresh, self.senders.get(&id)) {
            (Some(k), _) => k,
            (None, Some(s)) => &s.key,
            (None, None) => return Err(Refusal::Malformed),
        };
        let opened_len = k
            .open_in_place(nonce(h.counter), Aad::from(&aad), &mut body)
            .map_err(|_| Refusal::Forged)?
            .len();
        body.truncate(opened_len);
        if let Some(key) = fresh {
            self.make_room(now);
            let sender = Sender {
                key,
                top: 0,
                seen: 0,
                last: now,
            };
            self.senders.insert(id.clone(), sender);
        }
        let s = self.senders.get_mut(&id).ok_or(Refusal::Malformed)?;
        if !s.accept(h.counter) {
            return Err(Refusal::Replayed);
        }
        s.last = now;
        Ok(Opened {
            kind: h.kind,
            node: id.0,
            instance: h.instance,
            body,
        })
    }

    /// Forgets senders not heard from for [`SENDER_TTL`], and the oldest
    /// one if the table is still full.
    fn make_room(&mut self, now: Instant) {
        if self.senders.len() < MAX_SENDERS {
            return;
        }
        self.senders
            .retain(|_, s| now.saturating_duration_since(s.last) < SENDER_TTL);
        if self.senders.len() >= MAX_SENDERS {
            if let Some(oldest) = self
                .senders
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                self.senders.remove(&oldest);
            }
        }
    }
}

/// The clear header of a message.
struct Header<'a> {
    key_id: u32,
    kind: Kind,
    node: &'a str,
    instance: u64,
    counter: u64,
    sent_ms: u64,
    header_len: usize,
}

impl<'a> Header<'a> {
    fn parse(data: &'a [u8]) -> Result<Header<'a>, Refusal> {
        let get = |r: std::ops::Range<usize>| data.get(r).ok_or(Refusal::Malformed);
        let u64_at = |at: usize| -> Result<u64, Refusal> {
            let b = get(at..at + 8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok(u64::from_be_bytes(a))
        };
        if get(0..4)? != MAGIC {
            return Err(Refusal::Malformed);
        }
        let k = get(4..8)?;
        let key_id = u32::from_be_bytes([k[0], k[1], k[2], k[3]]);
        let kind = Kind::from_byte(get(8..9)?[0]).ok_or(Refusal::Malformed)?;
        let node_len = usize::from(get(9..10)?[0]);
        let node = std::str::from_utf8(get(10..10 + node_len)?).map_err(|_| Refusal::BadNode)?;
        if !valid_node_id(node) {
            return Err(Refusal::BadNode);
        }
        let at = 10 + node_len;
        let header_len = at + 24;
        if data.len() < header_len + TAG_LEN {
            return Err(Refusal::Malformed);
        }
        Ok(Header {
            key_id,
            kind,
            node,
            instance: u64_at(at)?,
            counter: u64_at(at + 8)?,
            sent_ms: u64_at(at + 16)?,
            header_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_700_000_000_000;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn a_sealed_message_opens_once_and_only_where_it_was_sent() {
        let mut s = Sealer::new(&key(1), "a", 7);
        let mut o = Opener::new(vec![key(1)]);
        let now = Instant::now();
        let m = s.seal(Kind::Join, "beep.sfu.join", NOW_MS, b"hello");
        assert!(
            !m.windows(5).any(|w| w == b"hello"),
            "the body is encrypted"
        );
        let got = o.open(&m, "beep.sfu.join", NOW_MS, now).unwrap();
        assert_eq!(
            (got.kind, got.node.as_str(), got.instance),
            (Kind::Join, "a", 7)
        );
        assert_eq!(got.body, b"hello");
        assert_eq!(
            o.open(&m, "beep.sfu.join", NOW_MS, now),
            Err(Refusal::Replayed)
        );
        let m2 = s.seal(Kind::Join, "beep.sfu.join", NOW_MS, b"again");
        assert_eq!(
            o.open(&m2, "beep.sfu.media.b", NOW_MS, now),
            Err(Refusal::Forged),
            "moved to another subject"
        );
    }

    #[test]
    fn forged_altered_foreign_and_stale_messages_are_refused() {
        let now = Instant::now();
        let mut o = Opener::new(vec![key(1)]);
        let mut s = Sealer::new(&key(1), "a", 7);
        let mut m = s.seal(Kind::Heartbeat, "x", NOW_MS, b"body");
        let last = m.len() - 1;
        m[last] ^= 1;
        assert_eq!(o.open(&m, "x", NOW_MS, now), Err(Refusal::Forged));
        let mut other = Sealer::new(&key(2), "a", 7);
        let m = other.seal(Kind::Heartbeat, "x", NOW_MS, b"body");
        assert_eq!(o.open(&m, "x", NOW_MS, now), Err(Refusal::UnknownKey));
        let m = s.seal(Kind::Heartbeat, "x", NOW_MS, b"body");
        let late = NOW_MS + MAX_SKEW.as_millis() as u64 + 1;
        assert_eq!(o.open(&m, "x", late, now), Err(Refusal::Stale));
        assert_eq!(
            o.open(b"garbage", "x", NOW_MS, now).err(),
            Some(Refusal::Malformed)
        );
        let mut bad = s.seal(Kind::Heartbeat, "x", NOW_MS, b"body");
        bad[10] = b'\r';
        assert_eq!(o.open(&bad, "x", NOW_MS, now).err(), Some(Refusal::BadNode));
    }

    #[test]
    fn out_of_order_messages_inside_the_window_open_and_old_ones_do_not() {
        let now = Instant::now();
        let mut s = Sealer::new(&key(1), "a", 1);
        let mut o = Opener::new(vec![key(1), key(2)]);
        let ms: Vec<Vec<u8>> = (0..100)
            .map(|_| s.seal(Kind::Media, "m", NOW_MS, b"p"))
            .collect();
        assert!(o.open(&ms[99], "m", NOW_MS, now).is_ok());
        assert!(
            o.open(&ms[50], "m", NOW_MS, now).is_ok(),
            "inside the window"
        );
        assert_eq!(o.open(&ms[50], "m", NOW_MS, now), Err(Refusal::Replayed));
        assert_eq!(o.open(&ms[10], "m", NOW_MS, now), Err(Refusal::Replayed));
    }

    #[test]
    fn keys_shorter_than_32_bytes_are_refused() {
        assert!(ClusterKey::new(&[0; 31]).is_err());
        assert_ne!(key(1).id(), key(2).id());
    }
}
