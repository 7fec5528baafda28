//! Which peer a datagram belongs to, in O(1).
//!
//! DTLS and SRTP are routed by source address and transport (a client's UDP
//! address and another client's TCP connection may share an IP and port). STUN is routed by the ICE
//! username fragment the server gave the peer in its answer (the first half
//! of the STUN USERNAME), which is how a peer's first datagram, or a datagram
//! from a new address, finds its peer without scanning every `Rtc`.

use std::collections::HashMap;
use std::net::SocketAddr;

use str0m::ice::StunMessage;
use str0m::net::Protocol;

use crate::sfu::ids::PeerId;

/// Most addresses one peer may be known by (each ICE candidate pair it
/// tries adds one); bounds memory against a peer that sprays addresses.
pub const MAX_ADDRS_PER_PEER: usize = 8;

/// Where a datagram came from: transport and remote address.
pub type Origin = (Protocol, SocketAddr);

/// What kind of datagram this is, by its first byte (RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// STUN (ICE connectivity checks).
    Stun,
    /// DTLS, RTP or RTCP: routed by address.
    Other,
}

/// Classifies a datagram by its first byte.
pub fn kind(buf: &[u8]) -> Option<Kind> {
    match buf.first()? {
        0..=3 => Some(Kind::Stun),
        20..=63 | 128..=191 => Some(Kind::Other),
        _ => None,
    }
}

/// The local (server) ufrag named in a STUN request's USERNAME, if any.
pub fn stun_local_ufrag(buf: &[u8]) -> Option<&str> {
    let msg = StunMessage::parse(buf).ok()?;
    let username = msg.username()?;
    username.split(':').next()
}

/// The two routing maps.
#[derive(Debug, Default)]
pub struct Demux {
    by_addr: HashMap<Origin, PeerId>,
    by_ufrag: HashMap<String, PeerId>,
}

impl Demux {
    /// Addresses routed (for the test hooks).
    #[cfg(any(test, feature = "test-kit"))]
    pub fn _routes(&self) -> usize {
        self.by_addr.len()
    }

    /// The peer that owns datagrams from `source` (non-STUN).
    pub fn by_addr(&self, source: &Origin) -> Option<PeerId> {
        self.by_addr.get(source).copied()
    }

    /// The peer whose server ufrag is `ufrag`.
    pub fn by_ufrag(&self, ufrag: &str) -> Option<PeerId> {
        self.by_ufrag.get(ufrag).copied()
    }

    /// True if `ufrag` is already taken by a peer.
    pub fn ufrag_taken(&self, ufrag: &str) -> bool {
        self.by_ufrag.contains_key(ufrag)
    }

    /// Registers a new peer's server ufrag.
    pub fn add_ufrag(&mut self, ufrag: String, peer: PeerId) {
        self.by_ufrag.insert(ufrag, peer);
    }

    /// Points `source` at `peer` (a STUN check from it was accepted).
    pub fn learn_addr(&mut self, source: Origin, peer: PeerId) {
        self.by_addr.insert(source, peer);
    }

    /// Forgets a peer's ufrag and those of its addresses that still point at it.
    pub fn forget(&mut self, peer: PeerId, ufrag: &str, addrs: &[Origin]) {
        if self.by_ufrag.get(ufrag) == Some(&peer) {
            self.by_ufrag.remove(ufrag);
        }
        for a in addrs {
            self.forget_addr(peer, *a);
        }
    }

    /// Forgets one address if it still points at `peer`.
    pub fn forget_addr(&mut self, peer: PeerId, addr: Origin) {
        if self.by_addr.get(&addr) == Some(&peer) {
            self.by_addr.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_first_byte() {
        assert_eq!(kind(&[0, 1]), Some(Kind::Stun));
        assert_eq!(kind(&[22]), Some(Kind::Other));
        assert_eq!(kind(&[0x80]), Some(Kind::Other));
        assert_eq!(kind(&[]), None);
        assert_eq!(kind(&[255]), None);
        assert_eq!(kind(&[70]), None);
    }

    #[test]
    fn garbage_stun_has_no_ufrag() {
        assert_eq!(stun_local_ufrag(&[0, 1, 0, 0]), None);
        assert_eq!(stun_local_ufrag(&[0u8; 20]), None);
    }

    #[test]
    fn forget_leaves_addresses_taken_over_by_others() {
        let mut d = Demux::default();
        let a = (
            Protocol::Udp,
            "127.0.0.1:1000".parse::<SocketAddr>().unwrap(),
        );
        d.add_ufrag("u1".into(), PeerId(1));
        d.learn_addr(a, PeerId(1));
        // The address is taken over by a reconnecting peer.
        d.learn_addr(a, PeerId(2));
        d.forget(PeerId(1), "u1", &[a]);
        assert_eq!(d.by_addr(&a), Some(PeerId(2)));
        assert_eq!(d.by_ufrag("u1"), None);
    }
}
