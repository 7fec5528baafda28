//! The identifiers every part of the core shares. They live in this leaf
//! (as str0m keeps its ids in `rtp/id.rs`) so no part imports them from the
//! facade above it.

use std::fmt;

/// Identifies a peer for its whole life; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who is speaking in a conversation. A local peer speaks as
/// `SpeakerId::from(peer)`; the id space is the peers' own, so a speaker
/// that is not a local peer (another node's) only needs an id nobody else
/// uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpeakerId(pub u64);

impl From<PeerId> for SpeakerId {
    fn from(p: PeerId) -> Self {
        SpeakerId(p.0)
    }
}

/// Interned conversation id, so the hot path hashes a number, not a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvKey(pub u64);
