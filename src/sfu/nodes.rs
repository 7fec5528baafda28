//! The other nodes of a cluster as this node's core knows them: which are
//! alive, which conversations each has members of (where local speakers
//! must be relayed), and the remote speakers heard from each, with the
//! [`SpeakerId`]s they speak under here.
//!
//! Pure state with time passed in, like every part of the core. What
//! arrives over NATS is decoded on side threads; this module only decides.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ids::{ConvKey, SpeakerId};

/// A node not heard from for this long is taken for dead.
pub(crate) const NODE_SILENCE: Duration = Duration::from_secs(3);
/// A remote speaker with no packet for this long is forgotten (it may come
/// back and gets a fresh id).
const SPEAKER_IDLE: Duration = Duration::from_secs(5);
/// Remote speakers take ids from here up, far above any local peer id.
const REMOTE_SPEAKER_BASE: u64 = 1 << 62;

/// One remote speaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteSpeaker {
    /// The id it speaks under in this node's conversations.
    pub id: SpeakerId,
    /// The conversation it speaks in.
    pub conv: ConvKey,
    last: Instant,
}

#[derive(Debug)]
struct Node {
    last_seen: Instant,
    conversations: HashSet<String>,
    /// By the speaker's id on its own node.
    speakers: HashMap<u64, RemoteSpeaker>,
}

impl Node {
    fn new(now: Instant) -> Self {
        Node {
            last_seen: now,
            conversations: HashSet::new(),
            speakers: HashMap::new(),
        }
    }
}

/// What happened to a remote speaker's id when a packet arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Speaking {
    /// The id it speaks under here.
    pub id: SpeakerId,
    /// Set when it spoke in another conversation before (leave that one).
    pub moved_from: Option<ConvKey>,
}

/// Every other node of the cluster this one has heard from.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    nodes: HashMap<String, Node>,
    /// Conversation name → the nodes with members of it, shared by every
    /// relayed packet's event (no copy per packet).
    relay_to: HashMap<String, Arc<[Arc<str>]>>,
    next_speaker: u64,
}

impl Nodes {
    /// Other nodes alive.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Remote speakers currently known.
    pub fn speaker_count(&self) -> usize {
        self.nodes.values().map(|n| n.speakers.len()).sum()
    }

    /// The nodes a local speaker in `conversation` must be relayed to.
    pub fn relay_targets(&self, conversation: &str) -> Option<&Arc<[Arc<str>]>> {
        self.relay_to.get(conversation)
    }

    /// A heartbeat: `node` is alive and has members of `conversations`.
    /// Returns the speakers of that node that went idle (to forget).
    pub fn heartbeat(
        &mut self,
        node: &str,
        conversations: Vec<String>,
        now: Instant,
    ) -> Vec<RemoteSpeaker> {
        if !self.nodes.contains_key(node) {
            self.nodes.insert(node.to_string(), Node::new(now));
        }
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        n.last_seen = now;
        let mut idle = Vec::new();
        n.speakers.retain(|_, s| {
            let keep = now.duration_since(s.last) < SPEAKER_IDLE;
            if !keep {
                idle.push(*s);
            }
            keep
        });
        let fresh: HashSet<String> = conversations.into_iter().collect();
        if fresh != n.conversations {
            n.conversations = fresh;
            self.rebuild_relay_to();
        }
        idle
    }

    /// The node said goodbye or fell silent: returns its speakers (`None`
    /// if the node was not known).
    pub fn remove_node(&mut self, node: &str) -> Option<Vec<RemoteSpeaker>> {
        let n = self.nodes.remove(node)?;
        if !n.conversations.is_empty() {
            self.rebuild_relay_to();
        }
        Some(n.speakers.into_values().collect())
    }

    /// The nodes silent for [`NODE_SILENCE`] at `now`.
    pub fn silent_nodes(&self, now: Instant) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) >= NODE_SILENCE)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the next node may fall silent.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes
            .values()
            .map(|n| n.last_seen + NODE_SILENCE)
            .min()
    }

    /// A packet from `speaker` of `node` arrived for conversation `conv`:
    /// the id it speaks under here (media also proves the node alive).
    pub fn speaking(
        &mut self,
        node: &str,
        speaker: u64,
        conv: ConvKey,
        now: Instant,
    ) -> Option<Speaking> {
        if !self.nodes.contains_key(node) {
            self.nodes.insert(node.to_string(), Node::new(now));
        }
        let next = &mut self.next_speaker;
        let n = self.nodes.get_mut(node)?;
        n.last_seen = now;
        let s = n.speakers.entry(speaker).or_insert_with(|| {
            *next += 1;
            RemoteSpeaker {
                id: SpeakerId(REMOTE_SPEAKER_BASE + *next),
                conv,
                last: now,
            }
        });
        s.last = now;
        let moved_from = (s.conv != conv).then(|| std::mem::replace(&mut s.conv, conv));
        Some(Speaking {
            id: s.id,
            moved_from,
        })
    }

    fn rebuild_relay_to(&mut self) {
        let mut by_conv: HashMap<&str, Vec<Arc<str>>> = HashMap::new();
        for (id, n) in &self.nodes {
            for c in &n.conversations {
                by_conv.entry(c).or_default().push(Arc::from(id.as_str()));
            }
        }
        self.relay_to = by_conv
            .into_iter()
            .map(|(c, mut nodes)| {
                nodes.sort();
                (c.to_string(), Arc::from(nodes))
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: Option<&Arc<[Arc<str>]>>) -> Vec<String> {
        t.map(|t| t.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn media_goes_only_to_nodes_that_have_members_of_the_conversation() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        c.heartbeat("b", vec!["x".into(), "y".into()], t0);
        c.heartbeat("c", vec!["y".into()], t0);
        assert_eq!(names(c.relay_targets("x")), vec!["b"]);
        assert_eq!(names(c.relay_targets("y")), vec!["b", "c"]);
        assert!(c.relay_targets("z").is_none(), "nobody else has z");
        c.heartbeat("b", vec![], t0);
        assert!(c.relay_targets("x").is_none(), "b left x");
        assert_eq!(names(c.relay_targets("y")), vec!["c"]);
    }

    #[test]
    fn a_silent_node_is_found_and_its_speakers_are_returned() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        c.heartbeat("b", vec!["x".into()], t0);
        let s = c.speaking("b", 7, ConvKey(1), t0).unwrap();
        assert_eq!(c.speaker_count(), 1);
        assert!(c.silent_nodes(t0 + NODE_SILENCE / 2).is_empty());
        assert_eq!(c.next_deadline(), Some(t0 + NODE_SILENCE));
        assert_eq!(c.silent_nodes(t0 + NODE_SILENCE), vec!["b".to_string()]);
        let gone = c.remove_node("b").unwrap();
        assert_eq!(gone.iter().map(|r| r.id).collect::<Vec<_>>(), vec![s.id]);
        assert_eq!(c.node_count(), 0);
        assert!(c.relay_targets("x").is_none());
    }

    #[test]
    fn remote_speakers_get_stable_ids_of_their_own_and_idle_ones_are_forgotten() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        let a = c.speaking("b", 1, ConvKey(1), t0).unwrap();
        let b = c.speaking("c", 1, ConvKey(1), t0).unwrap();
        assert_ne!(a.id, b.id, "same peer id on two nodes: two speakers");
        assert!(a.id.0 >= REMOTE_SPEAKER_BASE);
        assert_eq!(c.speaking("b", 1, ConvKey(1), t0).unwrap().id, a.id);
        let moved = c.speaking("b", 1, ConvKey(2), t0).unwrap();
        assert_eq!(moved.moved_from, Some(ConvKey(1)));
        let idle = c.heartbeat("b", vec![], t0 + SPEAKER_IDLE);
        assert_eq!(idle.len(), 1);
        assert_eq!(c.speaker_count(), 1, "c's speaker stays");
    }
}
