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

use std::fmt;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hmac;

/// First bytes of every cluster message (version 1 of the envelope).
pub(super) const MAGIC: &[u8; 4] = b"BSC1";
/// Shortest cluster key, in bytes.
pub(crate) const MIN_KEY_BYTES: usize = 32;
/// A message sent further than this from the receiver's clock (either
/// way) is refused: the stated clock skew the cluster tolerates.
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(600);
pub(super) const TAG_LEN: usize = 16;

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
    pub(super) fn from_byte(b: u8) -> Option<Kind> {
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
    pub(super) fn sender_key(&self, node: &str, instance: u64) -> LessSafeKey {
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

pub(super) fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

pub(super) fn aad(header: &[u8], subject: &str) -> Vec<u8> {
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

pub(crate) use super::open::Opener;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
