//! The other nodes of a cluster as this node's core knows them: which are
//! alive, which conversations each has members of (where local speakers
//! must be relayed), and the remote speakers heard from each, with the
//! [`SpeakerId`]s they speak under here.
//!
//! Pure state with time passed in, like every part of the core. What
//! arrives over NATS is authenticated and checked on side threads; this
//! module still bounds what a node (which may be compromised) can make it
//! hold: at most [`MAX_NODES`] nodes, [`MAX_SPEAKERS_PER_NODE`] speakers
//! each, every speaker within a local peer's media budget, and speakers
//! forgotten after [`SPEAKER_IDLE`] of silence.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ids::{ConvKey, SpeakerId};
use super::peer::budget::{Budget, BudgetConfig, Overrun};

/// A node not heard from for this long is taken for dead.
pub(crate) const NODE_SILENCE: Duration = Duration::from_secs(3);
/// A remote speaker with no packet for this long is forgotten (it may come
/// back and gets a fresh id).
const SPEAKER_IDLE: Duration = Duration::from_secs(5);
/// Remote speakers take ids from here up, far above any local peer id.
const REMOTE_SPEAKER_BASE: u64 = 1 << 62;
/// Most other nodes known at once.
pub(crate) const MAX_NODES: usize = 256;
/// Most speakers one node may have known here at once.
pub(crate) const MAX_SPEAKERS_PER_NODE: usize = 1_024;
/// Most conversations one node may say it has (over all of a heartbeat's
/// parts).
const MAX_CONVERSATIONS_PER_NODE: usize = 65_536;

/// One remote speaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteSpeaker {
    /// The id it speaks under in this node's conversations.
    pub id: SpeakerId,
    /// The conversation it speaks in.
    pub conv: ConvKey,
    last: Instant,
}

/// A remote speaker's state here: who it is, and its media budget.
#[derive(Debug)]
struct Voice {
    speaker: RemoteSpeaker,
    budget: Budget,
}

#[derive(Debug)]
struct Node {
    last_seen: Instant,
    conversations: HashSet<String>,
    /// Conversations of a heartbeat whose last part has not arrived yet.
    pending: Option<HashSet<String>>,
    /// By the speaker's id on its own node.
    speakers: HashMap<u64, Voice>,
}

impl Node {
    fn new(now: Instant) -> Self {
        Node {
            last_seen: now,
            conversations: HashSet::new(),
            pending: None,
            speakers: HashMap::new(),
        }
    }

    /// Forgets the speakers silent for [`SPEAKER_IDLE`]; returns them.
    fn prune(&mut self, now: Instant, out: &mut Vec<RemoteSpeaker>) {
        self.speakers.retain(|_, v| {
            let keep = now.saturating_duration_since(v.speaker.last) < SPEAKER_IDLE;
            if !keep {
                out.push(v.speaker);
            }
            keep
        });
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

/// Why a remote packet or heartbeat was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeRefusal {
    /// The node cap is reached and this node is new.
    TooManyNodes,
    /// The node has the most speakers allowed, none of them idle.
    TooManySpeakers,
    /// The speaker is over a local peer's media budget.
    OverBudget(Overrun),
}

/// Every other node of the cluster this one has heard from.
#[derive(Debug)]
pub(crate) struct Nodes {
    nodes: HashMap<String, Node>,
    /// Conversation name → the nodes with members of it, shared by every
    /// relayed packet's event (no copy per packet).
    relay_to: HashMap<String, Arc<[Arc<str>]>>,
    next_speaker: u64,
    /// The budget each remote speaker gets (a local peer's).
    budget: BudgetConfig,
}

impl Default for Nodes {
    fn default() -> Self {
        Nodes::new(BudgetConfig::default())
    }
}

impl Nodes {
    /// No node yet; each remote speaker will get `budget`.
    pub fn new(budget: BudgetConfig) -> Self {
        Nodes {
            nodes: HashMap::new(),
            relay_to: HashMap::new(),
            next_speaker: 0,
            budget,
        }
    }

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

    /// The node's entry, made if there is room.
    fn node(&mut self, node: &str, now: Instant) -> Result<&mut Node, NodeRefusal> {
        if !self.nodes.contains_key(node) {
            if self.nodes.len() >= MAX_NODES {
                return Err(NodeRefusal::TooManyNodes);
            }
            self.nodes.insert(node.to_string(), Node::new(now));
        }
        self.nodes.get_mut(node).ok_or(NodeRefusal::TooManyNodes)
    }

    /// A heartbeat (or one part of it): `node` is alive and has members of
    /// `conversations`. The node's set is replaced when the `last` part
    /// arrives. Returns the speakers of that node that went idle (to
    /// forget).
    pub fn heartbeat(
        &mut self,
        node: &str,
        conversations: Vec<String>,
        (first, last): (bool, bool),
        now: Instant,
    ) -> Result<Vec<RemoteSpeaker>, NodeRefusal> {
        let n = self.node(node, now)?;
        n.last_seen = now;
        let mut idle = Vec::new();
        n.prune(now, &mut idle);
        if first || n.pending.is_none() {
            n.pending = Some(HashSet::new());
        }
        if let Some(p) = &mut n.pending {
            let room = MAX_CONVERSATIONS_PER_NODE.saturating_sub(p.len());
            p.extend(conversations.into_iter().take(room));
        }
        if last {
            let fresh = n.pending.take().unwrap_or_default();
            if fresh != n.conversations {
                n.conversations = fresh;
                self.rebuild_relay_to();
            }
        }
        Ok(idle)
    }

    /// The node said goodbye or fell silent: returns its speakers (`None`
    /// if the node was not known).
    pub fn remove_node(&mut self, node: &str) -> Option<Vec<RemoteSpeaker>> {
        let n = self.nodes.remove(node)?;
        if !n.conversations.is_empty() {
            self.rebuild_relay_to();
        }
        Some(n.speakers.into_values().map(|v| v.speaker).collect())
    }

    /// The nodes silent for [`NODE_SILENCE`] at `now`.
    pub fn silent_nodes(&self, now: Instant) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_seen) >= NODE_SILENCE)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets every node's speakers silent for [`SPEAKER_IDLE`].
    pub fn prune_speakers(&mut self, now: Instant) -> Vec<RemoteSpeaker> {
        let mut idle = Vec::new();
        for n in self.nodes.values_mut() {
            n.prune(now, &mut idle);
        }
        idle
    }

    /// When the next node may fall silent.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes
            .values()
            .map(|n| n.last_seen + NODE_SILENCE)
            .min()
    }

    /// A packet of `payload` bytes from `speaker` of `node` arrived for
    /// conversation `conv`: the id it speaks under here, if the node, its
    /// speaker count and the speaker's budget allow (media also proves the
    /// node alive). Idle speakers pruned to make room go to `idle`.
    pub fn speaking(
        &mut self,
        node: &str,
        speaker: u64,
        conv: ConvKey,
        payload: usize,
        now: Instant,
        idle: &mut Vec<RemoteSpeaker>,
    ) -> Result<Speaking, NodeRefusal> {
        let budget = self.budget;
        let next = &mut self.next_speaker;
        let n = {
            if !self.nodes.contains_key(node) && self.nodes.len() >= MAX_NODES {
                return Err(NodeRefusal::TooManyNodes);
            }
            self.nodes
                .entry(node.to_string())
                .or_insert_with(|| Node::new(now))
        };
        n.last_seen = now;
        if !n.speakers.contains_key(&speaker) && n.speakers.len() >= MAX_SPEAKERS_PER_NODE {
            n.prune(now, idle);
            if n.speakers.len() >= MAX_SPEAKERS_PER_NODE {
                return Err(NodeRefusal::TooManySpeakers);
            }
        }
        let v = n.speakers.entry(speaker).or_insert_with(|| {
            *next += 1;
            Voice {
                speaker: RemoteSpeaker {
                    id: SpeakerId(REMOTE_SPEAKER_BASE + *next),
                    conv,
                    last: now,
                },
                budget: Budget::new(budget, now),
            }
        });
        v.budget
            .admit(payload, now)
            .map_err(NodeRefusal::OverBudget)?;
        let s = &mut v.speaker;
        s.last = now;
        let moved_from = (s.conv != conv).then(|| std::mem::replace(&mut s.conv, conv));
        Ok(Speaking {
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
        c.heartbeat("b", vec!["x".into(), "y".into()], (true, true), t0)
            .unwrap();
        c.heartbeat("c", vec!["y".into()], (true, true), t0)
            .unwrap();
        assert_eq!(names(c.relay_targets("x")), vec!["b"]);
        assert_eq!(names(c.relay_targets("y")), vec!["b", "c"]);
        assert!(c.relay_targets("z").is_none(), "nobody else has z");
        c.heartbeat("b", vec![], (true, true), t0).unwrap();
        assert!(c.relay_targets("x").is_none(), "b left x");
        assert_eq!(names(c.relay_targets("y")), vec!["c"]);
    }

    #[test]
    fn a_silent_node_is_found_and_its_speakers_are_returned() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        c.heartbeat("b", vec!["x".into()], (true, true), t0)
            .unwrap();
        let s = c
            .speaking("b", 7, ConvKey(1), 80, t0, &mut Vec::new())
            .unwrap();
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
        let a = c
            .speaking("b", 1, ConvKey(1), 80, t0, &mut Vec::new())
            .unwrap();
        let b = c
            .speaking("c", 1, ConvKey(1), 80, t0, &mut Vec::new())
            .unwrap();
        assert_ne!(a.id, b.id, "same peer id on two nodes: two speakers");
        assert!(a.id.0 >= REMOTE_SPEAKER_BASE);
        assert_eq!(
            c.speaking("b", 1, ConvKey(1), 80, t0, &mut Vec::new())
                .unwrap()
                .id,
            a.id
        );
        let moved = c
            .speaking("b", 1, ConvKey(2), 80, t0, &mut Vec::new())
            .unwrap();
        assert_eq!(moved.moved_from, Some(ConvKey(1)));
        let idle = c
            .heartbeat("b", vec![], (true, true), t0 + SPEAKER_IDLE)
            .unwrap();
        assert_eq!(idle.len(), 1);
        assert_eq!(c.speaker_count(), 1, "c's speaker stays");
    }

    #[test]
    fn a_heartbeat_in_parts_replaces_the_conversations_when_its_last_part_arrives() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        c.heartbeat("b", vec!["x".into()], (true, false), t0)
            .unwrap();
        assert!(c.relay_targets("x").is_none(), "not complete yet");
        c.heartbeat("b", vec!["y".into()], (false, true), t0)
            .unwrap();
        assert_eq!(names(c.relay_targets("x")), vec!["b"]);
        assert_eq!(names(c.relay_targets("y")), vec!["b"]);
        c.heartbeat("b", vec!["z".into()], (true, true), t0)
            .unwrap();
        assert!(c.relay_targets("x").is_none() && c.relay_targets("y").is_none());
    }

    #[test]
    fn fresh_speaker_ids_without_end_stay_bounded_and_idle_ones_make_room() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        let mut idle = Vec::new();
        let mut refused = 0;
        for i in 0..100_000u64 {
            match c.speaking("b", i, ConvKey(1), 80, t0, &mut idle) {
                Ok(_) => {}
                Err(NodeRefusal::TooManySpeakers) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(c.speaker_count(), MAX_SPEAKERS_PER_NODE);
        assert_eq!(refused, 100_000 - MAX_SPEAKERS_PER_NODE as u64);
        let later = t0 + SPEAKER_IDLE;
        assert!(c
            .speaking("b", 1 << 40, ConvKey(1), 80, later, &mut idle)
            .is_ok());
        assert_eq!(idle.len(), MAX_SPEAKERS_PER_NODE, "silence pruned them");
        assert_eq!(c.speaker_count(), 1);
        assert_eq!(c.prune_speakers(later + SPEAKER_IDLE).len(), 1);
    }

    #[test]
    fn a_remote_speaker_has_a_local_peers_budget_and_nodes_are_capped() {
        let t0 = Instant::now();
        let mut c = Nodes::default();
        let mut idle = Vec::new();
        let over = (0..1_000)
            .filter(|_| c.speaking("b", 1, ConvKey(1), 80, t0, &mut idle).is_err())
            .count();
        assert!(
            over > 900,
            "a burst of 1,000 packets at once: {over} refused"
        );
        for n in 0..MAX_NODES {
            c.heartbeat(&format!("n{n}"), vec![], (true, true), t0).ok();
        }
        assert_eq!(
            c.heartbeat("one-too-many", vec![], (true, true), t0),
            Err(NodeRefusal::TooManyNodes)
        );
        assert_eq!(c.node_count(), MAX_NODES);
    }
}
