//! A conversation: its connected members, its active speakers, and who
//! listens to whom.

use std::collections::HashMap;

use super::speaker::SpeakerSelector;
use super::PeerId;

/// Interned conversation id, so the hot path hashes a number, not a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvKey(pub u64);

/// One conversation's state.
#[derive(Debug)]
pub struct Conversation {
    /// The conversation id clients joined with.
    pub name: String,
    /// Connected peers taking part (every client of every joined user).
    pub members: Vec<PeerId>,
    /// Users whose membership points here (connected or in their grace period).
    pub users: usize,
    /// Who is speaking.
    pub selector: SpeakerSelector,
    /// For each active speaker, the (subscriber, slot index) pairs that carry
    /// it: rebuilt when the active set or the membership changes, read on
    /// every forwarded packet.
    pub listeners: HashMap<PeerId, Vec<(PeerId, usize)>>,
}

impl Conversation {
    /// A conversation with no members yet.
    pub fn new(name: String, selector: SpeakerSelector) -> Self {
        Conversation {
            name,
            members: Vec::new(),
            users: 0,
            selector,
            listeners: HashMap::new(),
        }
    }

    /// True when nothing refers to this conversation any more.
    pub fn is_abandoned(&self) -> bool {
        self.members.is_empty() && self.users == 0
    }
}
