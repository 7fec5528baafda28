//! What tests and benchmarks may see of the core beyond its driving
//! surface (feature `test-kit`, and unit tests): a few getters, and the
//! parts themselves for benchmarks of each alone.

use super::peer::Peer;
use super::{PeerId, Sfu};

impl Sfu {
    /// UNSTABLE: test hook, not public API. The conversation a user is in.
    pub fn _conversation_of(&self, userid: &str) -> Option<&str> {
        self.convs.name(self.members.conversation(userid)?)
    }

    /// UNSTABLE: test hook, not public API. How many slots a peer was given.
    pub fn _slot_count(&self, peer: PeerId) -> Option<usize> {
        self.peers.get(peer).map(Peer::slot_count)
    }

    /// UNSTABLE: test hook, not public API. How many addresses a peer is
    /// known (routed) by.
    pub fn _peer_addrs(&self, peer: PeerId) -> Option<usize> {
        self.peers.get(peer).map(|p| p.addrs().len())
    }

    /// UNSTABLE: test hook, not public API. How many addresses the demux
    /// routes, over all peers.
    pub fn _routes(&self) -> usize {
        self.peers._routes()
    }

    /// UNSTABLE: test hook, not public API. True if this peer exists and
    /// is connected.
    pub fn _is_connected(&self, peer: PeerId) -> bool {
        self.peers.get(peer).is_some_and(Peer::is_connected)
    }
}

/// The core's parts, for benchmarks of each alone (feature `test-kit` only).
#[cfg(feature = "test-kit")]
pub mod internals {
    pub use crate::sfu::bite::{BiteAssembler, Owner};
    pub use crate::sfu::conversation::Conversations;
    pub use crate::sfu::ids::{ConvKey, SpeakerId};
    pub use crate::sfu::peer::demux::{kind, stun_local_ufrag, Demux, Kind};
    pub use crate::sfu::peer::slot::{Incoming, Rewritten, Slot};
    pub use crate::sfu::timer::{TimerHeap, TimerKey};
    pub use crate::sink::bite_file::to_ogg as bite_to_ogg;
}
