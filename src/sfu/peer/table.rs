//! Every peer, the demux that routes datagrams to them, and the connected
//! count, kept right together: removing a peer here forgets its routes and
//! adjusts the count in one place (quinn's `Endpoint`: it only routes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use str0m::net::{Protocol, Receive};
use str0m::Input;

use super::demux::{self, Demux};
use super::outbox::Outbox;
use super::{Forward, Panicked, Peer, Wrote};
use crate::sfu::ids::PeerId;
use crate::sfu::timer::TimerHeap;

/// What one packet's fan-out did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FanOut {
    /// Writes made.
    pub written: u64,
    /// Of those, writes as RED.
    pub red: u64,
    /// Writes that panicked inside str0m.
    pub panicked: u64,
}

/// Why a datagram reached no `Rtc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Not STUN, DTLS or RTP by its first byte, or unparsable.
    Malformed,
    /// From an unknown address, and not a STUN check for a known ufrag.
    UnknownSource,
    /// The peer's `Rtc` refused it.
    Rejected,
}

/// The peers and their routes.
#[derive(Default)]
pub(crate) struct PeerTable {
    /// Boxed: a `Peer` is about 10 KB (its `Rtc` inline), and a map of
    /// inline peers keeps a table sized for the peak forever (20 MB after
    /// 1,000 peers came and went) in one block glibc cannot give back.
    peers: HashMap<PeerId, Box<Peer>>,
    demux: Demux,
    connected: usize,
    next_id: u64,
}

impl PeerTable {
    /// A fresh id, never handed out before.
    pub fn next_id(&mut self) -> PeerId {
        self.next_id += 1;
        PeerId(self.next_id)
    }

    /// Number of peers, connecting or connected.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Number of connected peers.
    pub fn connected(&self) -> usize {
        self.connected
    }

    /// True if a server ufrag is already routed to a peer.
    pub fn ufrag_taken(&self, ufrag: &str) -> bool {
        self.demux.ufrag_taken(ufrag)
    }

    /// Addresses the demux routes (for the test hooks).
    #[cfg(any(test, feature = "test-kit"))]
    pub fn _routes(&self) -> usize {
        self.demux._routes()
    }

    /// A peer by id.
    pub fn get(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(&id).map(|p| &**p)
    }

    /// A peer by id, to change.
    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.peers.get_mut(&id).map(|p| &mut **p)
    }

    /// Every peer's id (for shutdown).
    pub fn ids(&self) -> Vec<PeerId> {
        self.peers.keys().copied().collect()
    }

    /// Adds a peer and routes STUN for its ufrag to it.
    pub fn insert(&mut self, peer: Peer) {
        self.demux.add_ufrag(peer.ufrag().to_string(), peer.id());
        self.peers.insert(peer.id(), Box::new(peer));
    }

    /// Marks a peer connected; true the first time.
    pub fn mark_connected(&mut self, id: PeerId) -> bool {
        let first = self.peers.get_mut(&id).is_some_and(|p| p.set_connected());
        if first {
            self.connected += 1;
        }
        first
    }

    /// Removes a peer with its routes. The table shrinks once it is a
    /// quarter full, so a peak's table is not kept for good.
    pub fn remove(&mut self, id: PeerId) -> Option<Box<Peer>> {
        let peer = self.peers.remove(&id)?;
        self.demux.forget(id, peer.ufrag(), peer.addrs());
        if peer.is_connected() {
            self.connected -= 1;
        }
        if self.peers.capacity() > 64 && self.peers.len() * 4 < self.peers.capacity() {
            self.peers.shrink_to(self.peers.len() * 2);
        }
        Some(peer)
    }

    /// Writes one packet to each listener's slot and re-arms each
    /// listener's timer: local and relayed packets take this same path.
    /// Returns how many writes were made (and how many of those as RED),
    /// and how many panicked inside str0m (each of those listeners is
    /// closing).
    pub fn fan_out(
        &mut self,
        listeners: &[(PeerId, usize)],
        fwd: &Forward,
        now: Instant,
        timers: &mut TimerHeap,
        out: &mut Outbox,
    ) -> FanOut {
        let mut n = FanOut::default();
        for &(sub, idx) in listeners {
            let Some(peer) = self.peers.get_mut(&sub) else {
                continue;
            };
            match peer.forward(idx, fwd, now, out) {
                Ok(Wrote::Opus) => n.written += 1,
                Ok(Wrote::Red) => {
                    n.written += 1;
                    n.red += 1;
                }
                Ok(Wrote::Nothing) => {}
                Err(Panicked) => n.panicked += 1,
            }
            peer.arm(timers);
        }
        n
    }

    /// Routes one datagram to its peer and feeds it there. `local` is the
    /// address it was delivered to. Returns the peer that was fed and
    /// whether its `Rtc` took the input.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        proto: Protocol,
        local: SocketAddr,
        source: SocketAddr,
        buf: &[u8],
        out: &mut Outbox,
    ) -> Result<(PeerId, bool), Dropped> {
        let id = match demux::kind(buf) {
            Some(demux::Kind::Stun) => {
                demux::stun_local_ufrag(buf).and_then(|u| self.demux.by_ufrag(u))
            }
            Some(demux::Kind::Other) => self.demux.by_addr(&(proto, source)),
            None => return Err(Dropped::Malformed),
        };
        let id = id.ok_or(Dropped::UnknownSource)?;
        let input = Receive::new(proto, source, local, buf)
            .map(|r| Input::Receive(now, r))
            .map_err(|_| Dropped::Malformed)?;
        let peer = self.peers.get_mut(&id).ok_or(Dropped::UnknownSource)?;
        if !peer.accepts(&input) {
            return Err(Dropped::Rejected);
        }
        let remote = (proto, source);
        let (learned, evicted) = peer.on_received_from(now, remote, demux::MAX_ADDRS_PER_PEER);
        if let Some(old) = evicted {
            self.demux.forget_addr(id, old);
        }
        // `source` is now one of the peer's addresses (the oldest made room).
        if learned || self.demux.by_addr(&remote) != Some(id) {
            self.demux.learn_addr(remote, id);
        }
        Ok((id, peer.handle_input(input, out)))
    }
}
