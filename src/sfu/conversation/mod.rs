//! Conversations: their members, the speaker selector, which speaker each
//! member's slots carry, and the listener table the forwarding path reads.
//!
//! This is the pure forwarding decision, "a packet from S at level L
//! arrived: who hears it, on which slot", with no `Rtc` in sight. A speaker
//! is a [`SpeakerId`], which need not be a local peer.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

pub(crate) mod membership;
pub(crate) mod speaker;

use super::ids::PeerId;
pub use super::ids::{ConvKey, SpeakerId};
use speaker::{SpeakerConfig, SpeakerSelector};

/// Most speakers one conversation's selector keeps active.
const MAX_ACTIVE_SPEAKERS: usize = 16;

/// One listener: a local peer and the speaker on each of its slots.
#[derive(Debug)]
struct Listener {
    peer: PeerId,
    slots: Vec<Option<SpeakerId>>,
}

/// One conversation's state.
#[derive(Debug)]
struct Conversation {
    name: String,
    members: Vec<Listener>,
    /// Users whose membership points here (connected or in their grace period).
    users: usize,
    /// How many members have each slot count (for the selector's capacity
    /// without a scan).
    slot_counts: BTreeMap<usize, usize>,
    selector: SpeakerSelector,
    /// For each active speaker, the (subscriber, slot index) pairs that carry
    /// it: rebuilt when the ranking or the membership changes, read on every
    /// forwarded packet.
    listeners: HashMap<SpeakerId, Vec<(PeerId, usize)>>,
}

impl Conversation {
    /// Sizes the selector for the largest member (plus one, so a member who
    /// speaks still hears someone); true if that changed the ranking.
    fn resize(&mut self, now: Instant) -> bool {
        let most_slots = self.slot_counts.keys().next_back().copied().unwrap_or(1);
        self.selector
            .set_capacity((most_slots + 1).min(MAX_ACTIVE_SPEAKERS), now)
    }
}

/// Who hears a packet.
pub struct Heard<'a> {
    /// The conversation's id, as clients joined it.
    pub name: &'a str,
    /// (subscriber, slot index) pairs that carry the speaker.
    pub listeners: &'a [(PeerId, usize)],
    /// The speaker is among the conversation's active speakers (after this
    /// packet).
    pub active: bool,
}

/// Every conversation, by interned key and by name.
#[derive(Debug)]
pub struct Conversations {
    by_key: HashMap<ConvKey, Conversation>,
    keys: HashMap<String, ConvKey>,
    member_of: HashMap<PeerId, ConvKey>,
    next_key: u64,
    speaker: SpeakerConfig,
    scratch: Vec<SpeakerId>,
    /// Times a slot mapping was rebuilt.
    reassignments: u64,
    /// Set when a conversation gained its first or lost its last member.
    presence_changed: bool,
}

impl Conversations {
    /// No conversations; selectors are tuned by `speaker`.
    pub fn new(speaker: SpeakerConfig) -> Self {
        Conversations {
            by_key: HashMap::new(),
            keys: HashMap::new(),
            member_of: HashMap::new(),
            next_key: 0,
            speaker,
            scratch: Vec::new(),
            reassignments: 0,
            presence_changed: false,
        }
    }

    /// Number of conversations with members or users.
    pub fn count(&self) -> usize {
        self.by_key.len()
    }

    /// Times a slot mapping was rebuilt.
    pub fn reassignments(&self) -> u64 {
        self.reassignments
    }

    /// The key of a conversation, created if it does not exist.
    pub fn intern(&mut self, name: &str) -> ConvKey {
        if let Some(k) = self.keys.get(name) {
            return *k;
        }
        self.next_key += 1;
        let k = ConvKey(self.next_key);
        self.keys.insert(name.to_string(), k);
        self.by_key.insert(
            k,
            Conversation {
                name: name.to_string(),
                members: Vec::new(),
                users: 0,
                slot_counts: BTreeMap::new(),
                selector: SpeakerSelector::new(self.speaker, 2),
                listeners: HashMap::new(),
            },
        );
        k
    }

    /// A conversation's name.
    pub fn name(&self, key: ConvKey) -> Option<&str> {
        self.by_key.get(&key).map(|c| c.name.as_str())
    }

    /// The key of an existing conversation.
    pub fn key(&self, name: &str) -> Option<ConvKey> {
        self.keys.get(name).copied()
    }

    /// Names of the conversations with at least one local member.
    pub fn with_members(&self) -> impl Iterator<Item = &str> {
        self.by_key
            .values()
            .filter(|c| !c.members.is_empty())
            .map(|c| c.name.as_str())
    }

    /// True (once) if a conversation gained its first member or lost its
    /// last since the previous call: the other nodes should hear of it.
    pub fn take_presence_changed(&mut self) -> bool {
        std::mem::take(&mut self.presence_changed)
    }

    /// Forgets a speaker that is not a local member (a remote speaker gone
    /// quiet, or its node gone).
    pub fn remove_speaker(&mut self, key: ConvKey, speaker: SpeakerId) {
        let Some(conv) = self.by_key.get_mut(&key) else {
            return;
        };
        if conv.selector.remove(speaker) {
            self.reassign(key);
        }
    }

    /// The conversation a peer is a member of.
    pub fn of(&self, peer: PeerId) -> Option<ConvKey> {
        self.member_of.get(&peer).copied()
    }

    /// A user's membership now points here.
    pub fn user_entered(&mut self, key: ConvKey) {
        if let Some(c) = self.by_key.get_mut(&key) {
            c.users += 1;
        }
    }

    /// A user's membership no longer points here; drops the conversation
    /// when nothing refers to it.
    pub fn user_left(&mut self, key: ConvKey) {
        if let Some(c) = self.by_key.get_mut(&key) {
            c.users = c.users.saturating_sub(1);
        }
        self.drop_if_abandoned(key);
    }

    /// A connected peer with `slots` slots becomes a listener (and a
    /// potential speaker) in `key`. Only its own slots are mapped, unless the
    /// selector's capacity change moved the ranking (then everyone's are).
    pub fn add_member(&mut self, key: ConvKey, peer: PeerId, slots: usize, now: Instant) {
        if self.member_of.get(&peer) == Some(&key) {
            return;
        }
        let Some(conv) = self.by_key.get_mut(&key) else {
            return;
        };
        self.member_of.insert(peer, key);
        self.presence_changed |= conv.members.is_empty();
        *conv.slot_counts.entry(slots).or_insert(0) += 1;
        let mut member = Listener {
            peer,
            slots: vec![None; slots],
        };
        if conv.resize(now) {
            conv.members.push(member);
            self.reassign(key);
        } else {
            conv.selector
                .top_for(SpeakerId::from(peer), slots, &mut self.scratch);
            for (i, s) in self.scratch.drain(..).enumerate() {
                member.slots[i] = Some(s);
                conv.listeners.entry(s).or_default().push((peer, i));
            }
            conv.members.push(member);
        }
    }

    /// A peer stops listening and speaking in `key`. Only its own entries
    /// are removed, unless it was an active speaker or the capacity change
    /// moved the ranking.
    pub fn remove_member(&mut self, key: ConvKey, peer: PeerId, now: Instant) {
        if self.member_of.get(&peer) != Some(&key) {
            return;
        }
        self.member_of.remove(&peer);
        let Some(conv) = self.by_key.get_mut(&key) else {
            return;
        };
        if let Some(i) = conv.members.iter().position(|m| m.peer == peer) {
            let m = conv.members.swap_remove(i);
            self.presence_changed |= conv.members.is_empty();
            for s in m.slots.iter().flatten() {
                if let Some(l) = conv.listeners.get_mut(s) {
                    l.retain(|(p, _)| *p != peer);
                }
            }
            if let Some(n) = conv.slot_counts.get_mut(&m.slots.len()) {
                *n -= 1;
                if *n == 0 {
                    conv.slot_counts.remove(&m.slots.len());
                }
            }
        }
        let was_speaking = conv.selector.remove(SpeakerId::from(peer));
        if conv.resize(now) || was_speaking {
            self.reassign(key);
        }
        self.drop_if_abandoned(key);
    }

    /// A packet from `speaker` at `audio_level` arrived in `key`: updates
    /// the ranking and says who hears it.
    pub fn on_packet(
        &mut self,
        key: ConvKey,
        speaker: SpeakerId,
        audio_level: Option<i8>,
        now: Instant,
    ) -> Option<Heard<'_>> {
        let conv = self.by_key.get_mut(&key)?;
        if conv.selector.on_packet(speaker, audio_level, now) {
            self.reassign(key);
        }
        let conv = self.by_key.get(&key)?;
        Some(Heard {
            name: &conv.name,
            listeners: conv.listeners.get(&speaker).map_or(&[], Vec::as_slice),
            active: conv.selector.is_active(speaker),
        })
    }

    /// Maps the active speakers onto every member's slots, keeping a
    /// speaker on the slot it already has, and rebuilds the listener table.
    fn reassign(&mut self, key: ConvKey) {
        let Some(conv) = self.by_key.get_mut(&key) else {
            return;
        };
        let desired = &mut self.scratch;
        conv.listeners.clear();
        for m in &mut conv.members {
            conv.selector
                .top_for(SpeakerId::from(m.peer), m.slots.len(), desired);
            for slot in &mut m.slots {
                match *slot {
                    Some(s) if desired.contains(&s) => desired.retain(|d| *d != s),
                    _ => *slot = None,
                }
            }
            let mut next = desired.drain(..);
            for slot in m.slots.iter_mut().filter(|s| s.is_none()) {
                *slot = next.next();
            }
            drop(next);
            for (i, s) in m.slots.iter().enumerate() {
                if let Some(s) = s {
                    conv.listeners.entry(*s).or_default().push((m.peer, i));
                }
            }
        }
        desired.clear();
        self.reassignments += 1;
    }

    /// Drops a conversation nothing refers to any more.
    pub fn drop_if_abandoned(&mut self, key: ConvKey) {
        let abandoned = self
            .by_key
            .get(&key)
            .is_some_and(|c| c.members.is_empty() && c.users == 0);
        if abandoned {
            if let Some(c) = self.by_key.remove(&key) {
                self.keys.remove(&c.name);
                log::debug!("conversation {} is empty and was dropped", c.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LOUD: Option<i8> = Some(-20);

    fn listeners(c: &mut Conversations, k: ConvKey, s: u64, now: Instant) -> Vec<(PeerId, usize)> {
        c.on_packet(k, SpeakerId(s), LOUD, now)
            .map(|h| h.listeners.to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn everyone_hears_a_speaker_but_the_speaker() {
        let t0 = Instant::now();
        let mut c = Conversations::new(SpeakerConfig::default());
        let k = c.intern("room");
        for p in 1..=3 {
            c.add_member(k, PeerId(p), 1, t0);
        }
        let mut heard = listeners(&mut c, k, 1, t0);
        heard.sort();
        assert_eq!(heard, vec![(PeerId(2), 0), (PeerId(3), 0)]);
        assert_eq!(c.name(k), Some("room"));
        assert_eq!(c.of(PeerId(2)), Some(k));
    }

    #[test]
    fn a_speaker_that_is_not_a_member_is_heard() {
        let t0 = Instant::now();
        let mut c = Conversations::new(SpeakerConfig::default());
        let k = c.intern("room");
        c.add_member(k, PeerId(1), 2, t0);
        // Speaker 99 is no local peer (a speaker on another node).
        assert_eq!(listeners(&mut c, k, 99, t0), vec![(PeerId(1), 0)]);
        assert_eq!(listeners(&mut c, k, 98, t0), vec![(PeerId(1), 1)]);
    }

    #[test]
    fn a_speaker_keeps_its_slot_when_another_joins_the_ranking() {
        let t0 = Instant::now();
        let mut c = Conversations::new(SpeakerConfig::default());
        let k = c.intern("room");
        c.add_member(k, PeerId(1), 2, t0);
        assert_eq!(listeners(&mut c, k, 5, t0), vec![(PeerId(1), 0)]);
        let t1 = t0 + Duration::from_millis(20);
        assert_eq!(listeners(&mut c, k, 6, t1), vec![(PeerId(1), 1)]);
        assert_eq!(listeners(&mut c, k, 5, t1), vec![(PeerId(1), 0)]);
    }

    #[test]
    fn the_last_member_and_user_leaving_drops_the_conversation() {
        let t0 = Instant::now();
        let mut c = Conversations::new(SpeakerConfig::default());
        let k = c.intern("room");
        c.user_entered(k);
        c.add_member(k, PeerId(1), 1, t0);
        c.remove_member(k, PeerId(1), t0);
        assert_eq!(c.count(), 1, "the user's membership still points here");
        c.user_left(k);
        assert_eq!(c.count(), 0);
        assert_eq!(c.of(PeerId(1)), None);
    }

    /// Every member hears exactly the top speakers other than itself, and
    /// the listener table is exactly the inverse of the members' slots.
    fn assert_consistent(c: &Conversations, k: ConvKey) {
        let conv = &c.by_key[&k];
        let mut want = Vec::new();
        let mut inverse: HashMap<SpeakerId, Vec<(PeerId, usize)>> = HashMap::new();
        for m in &conv.members {
            conv.selector
                .top_for(SpeakerId::from(m.peer), m.slots.len(), &mut want);
            let mut have: Vec<SpeakerId> = m.slots.iter().flatten().copied().collect();
            have.sort();
            want.sort();
            assert_eq!(have, want, "member {:?}", m.peer);
            for (i, s) in m.slots.iter().enumerate() {
                if let Some(s) = s {
                    inverse.entry(*s).or_default().push((m.peer, i));
                }
            }
        }
        let mut table: HashMap<SpeakerId, Vec<(PeerId, usize)>> = conv
            .listeners
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for v in table.values_mut().chain(inverse.values_mut()) {
            v.sort();
        }
        assert_eq!(table, inverse);
    }

    #[test]
    fn incremental_membership_changes_match_a_full_rebuild() {
        let mut next = crate::sfu::test_rng::xorshift(0x2545_F491_4F6C_DD1Du64);
        let mut now = Instant::now();
        let mut c = Conversations::new(SpeakerConfig::default());
        let k = c.intern("room");
        c.user_entered(k);
        let mut members: Vec<u64> = Vec::new();
        for _ in 0..5_000 {
            now += Duration::from_millis(20);
            let r = next();
            let p = r % 40;
            match (r >> 8) % 10 {
                0..=2 if !members.contains(&p) => {
                    c.add_member(k, PeerId(p), 1 + ((r >> 16) % 4) as usize, now);
                    members.push(p);
                }
                3..=4 if members.contains(&p) => {
                    c.remove_member(k, PeerId(p), now);
                    members.retain(|m| *m != p);
                }
                _ => {
                    let level = Some(-(((r >> 20) % 100) as i8));
                    c.on_packet(k, SpeakerId(p), level, now);
                }
            }
            assert_consistent(&c, k);
        }
    }
}
