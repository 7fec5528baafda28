//! The receiving side of the cluster's envelope (`seal.rs`): the clear
//! header parsed with bounds, the tag checked before anything is decoded,
//! and a 64-message replay window per sender boot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey};

use super::seal::{aad, nonce, ClusterKey, Kind, Refusal, MAGIC, MAX_SKEW, TAG_LEN};
use super::valid_node_id;

/// Sender boots whose keys and replay windows are kept.
const MAX_SENDERS: usize = 1024;
/// A sender boot not heard from for this long is forgotten (its messages
/// are then older than [`MAX_SKEW`] and refused anyway).
const SENDER_TTL: Duration = Duration::from_secs(1200);

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
