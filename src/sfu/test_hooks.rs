//! What tests and benchmarks may see of the core beyond its driving
//! surface (feature `test-kit`, and unit tests): a few getters, and the
//! parts themselves for benchmarks of each alone.

use super::{Peer, PeerId, Sfu};

impl Sfu {
    /// The conversation a user is in (for tests).
    pub fn conversation_of(&self, userid: &str) -> Option<&str> {
        self.convs.name(self.members.conversation(userid)?)
    }

    /// How many slots a peer was given (for tests).
    pub fn slot_count(&self, peer: PeerId) -> Option<usize> {
        self.peers.get(peer).map(Peer::slot_count)
    }

    /// True if this peer exists and is connected (for tests).
    pub fn is_connected(&self, peer: PeerId) -> bool {
        self.peers.get(peer).is_some_and(Peer::is_connected)
    }
}

/// The core's parts, for benchmarks of each alone (feature `test-kit` only).
#[cfg(feature = "test-kit")]
pub mod internals {
    pub use crate::sfu::bite::{BiteAssembler, Owner};
    pub use crate::sfu::conversation::{ConvKey, Conversations, SpeakerId};
    pub use crate::sfu::demux::{kind, stun_local_ufrag, Demux, Kind};
    pub use crate::sfu::slot::{Incoming, Rewritten, Slot};
    pub use crate::sfu::timer::{TimerHeap, TimerKey};
}
