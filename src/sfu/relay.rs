//! The core's side of a cluster: what other nodes said (heartbeats, joins,
//! their speakers' packets) goes in through [`Sfu::handle_cluster`]; what
//! they must hear comes out as [`SfuEvent::Joined`] and [`SfuEvent::Relay`],
//! and [`Sfu::presence`] is what this node's heartbeat says. Remote speakers
//! take part in speaker selection like local ones and are forwarded on the
//! same slot path; they never reach the bite assembler (their own node cuts
//! their bites).

use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use str0m::rtp::ExtensionValues;

use super::api::{ClusterInput, Member, Presence, RelayedPacket};
use super::conversation::membership::Stamp;
use super::ids::SpeakerId;
use super::nodes::{NodeRefusal, RemoteSpeaker};
use super::opus;
use super::peer::slot::Incoming;
use super::peer::Forward;
use super::timer::TimerKey;
use super::{forward, Sfu, SfuEvent};
use crate::log_limit::LogLimit;

/// Nodes coming and going are logged at most once a second: node ids come
/// from other nodes, one of which may be hostile.
static NODE_CHANGES: LogLimit = LogLimit::new(Duration::from_secs(1));
/// Joins applied from other nodes are logged at most once a second.
static REMOTE_JOINS: LogLimit = LogLimit::new(Duration::from_secs(1));

impl Sfu {
    /// Feeds what another node of the cluster said.
    pub fn handle_cluster(&mut self, now: Instant, input: ClusterInput) {
        match input {
            ClusterInput::Heartbeat {
                node,
                conversations,
                users,
                first,
                last,
            } => {
                let known = self.nodes.node_count();
                let idle = match self
                    .nodes
                    .heartbeat(&node, conversations, (first, last), now)
                {
                    Ok(idle) => idle,
                    Err(_) => {
                        self.stats.cluster_nodes_refused += 1;
                        return;
                    }
                };
                if self.nodes.node_count() > known {
                    NODE_CHANGES.log(now, |more| {
                        info!("cluster: node {node} is up ({more} more node changes since the last line)")
                    });
                }
                self.forget_speakers(idle);
                for m in &users {
                    self.apply_member(m, now);
                    if let Some(until) = self.members.seen_elsewhere(&m.userid, now) {
                        self.timers.push(until, TimerKey::Grace(m.userid.clone()));
                    }
                }
            }
            ClusterInput::Goodbye { node } => self.drop_node(&node, "said goodbye", now),
            ClusterInput::Join(m) => self.apply_member(&m, now),
            ClusterInput::Media { node, packets } => {
                for p in packets {
                    self.on_relayed(&node, p, now);
                }
            }
        }
        self.arm_cluster();
        self.process_pending(now);
    }

    /// What this node's heartbeat tells the others.
    pub fn presence(&self) -> Presence {
        Presence {
            conversations: self.convs.with_members().map(str::to_string).collect(),
            users: self
                .members
                .with_clients()
                .filter_map(|(userid, key, stamp)| {
                    Some(Member {
                        userid: userid.to_string(),
                        conversation: self.convs.name(key)?.to_string(),
                        stamp: stamp.counter,
                        origin: stamp.origin.clone(),
                    })
                })
                .collect(),
        }
    }

    /// True (once) if a conversation gained its first local member or lost
    /// its last since the last call: the driver then sends a heartbeat soon
    /// instead of at the next second.
    pub fn take_presence_changed(&mut self) -> bool {
        self.convs.take_presence_changed()
    }

    /// The cluster timer fired: drops the nodes that fell silent.
    pub(super) fn cluster_timeout(&mut self, now: Instant) {
        self.cluster_armed = false;
        for node in self.nodes.silent_nodes(now) {
            self.drop_node(&node, "fell silent", now);
        }
        let idle = self.nodes.prune_speakers(now);
        self.forget_speakers(idle);
        self.arm_cluster();
    }

    /// Hands a local speaker's packet to the driver for the other nodes.
    pub(super) fn relay_out(&mut self, to: Arc<[Arc<str>]>, packet: RelayedPacket) {
        self.stats.relay_packets_out += 1;
        self.stats.relay_bytes_out += packet.payload.len() as u64;
        self.events.push_back(SfuEvent::Relay { to, packet });
    }

    fn apply_member(&mut self, m: &Member, now: Instant) {
        if self.shutting_down || m.userid.is_empty() || m.conversation.is_empty() {
            return;
        }
        let stamp = Stamp {
            counter: m.stamp,
            origin: m.origin.clone(),
        };
        if self.apply_join(now, &m.userid, &m.conversation, stamp) {
            REMOTE_JOINS.log(now, |more| {
                info!(
                    "user {} joined conversation {} on another node ({more} more since the last line)",
                    m.userid, m.conversation
                )
            });
        }
    }

    fn drop_node(&mut self, node: &str, why: &str, now: Instant) {
        if let Some(speakers) = self.nodes.remove_node(node) {
            NODE_CHANGES.log(now, |more| {
                info!(
                    "cluster: node {node} {why}; {} of its speakers dropped ({more} more node changes since the last line)",
                    speakers.len()
                )
            });
            self.forget_speakers(speakers);
        }
    }

    fn forget_speakers(&mut self, speakers: Vec<RemoteSpeaker>) {
        for s in speakers {
            self.histories.remove(&s.id);
            self.convs.remove_speaker(s.conv, s.id);
        }
    }

    /// Keeps one cluster entry in the timer heap while other nodes are known.
    fn arm_cluster(&mut self) {
        if self.cluster_armed {
            return;
        }
        if let Some(at) = self.nodes.next_deadline() {
            self.timers.push(at, TimerKey::Cluster);
            self.cluster_armed = true;
        }
    }

    /// Another node's speaker: selection, then the same slot path as a
    /// local packet, with the speaker's CSRC as its node sent it.
    fn on_relayed(&mut self, node: &str, p: RelayedPacket, now: Instant) {
        self.stats.relay_packets_in += 1;
        self.stats.relay_bytes_in += p.payload.len() as u64;
        let Some(key) = self.convs.key(&p.conversation) else {
            self.stats.relay_dropped_no_conversation += 1;
            return;
        };
        let mut idle = Vec::new();
        let spoke = self
            .nodes
            .speaking(node, p.speaker, key, p.payload.len(), now, &mut idle);
        self.forget_speakers(idle);
        let s = match spoke {
            Ok(s) => s,
            Err(NodeRefusal::OverBudget(_)) => {
                self.stats.relay_dropped_over_budget += 1;
                return;
            }
            Err(NodeRefusal::TooManySpeakers) => {
                self.stats.relay_dropped_too_many_speakers += 1;
                return;
            }
            Err(NodeRefusal::TooManyNodes) => {
                self.stats.relay_dropped_too_many_nodes += 1;
                return;
            }
        };
        if let Some(old) = s.moved_from {
            self.convs.remove_speaker(old, s.id);
        }
        let level = p.level.and_then(|l| i8::try_from(l).ok());
        let payload: Arc<[u8]> = Arc::from(p.payload);
        let heard_level = opus::heard_level(level, &payload);
        let Some(heard) = self.convs.on_packet(key, s.id, heard_level, now) else {
            return;
        };
        let ext = ExtensionValues {
            audio_level: level,
            voice_activity: p.voice_activity,
            ..Default::default()
        };
        let incoming = Incoming {
            speaker: s.id,
            ssrc: p.ssrc,
            seq: p.seq,
            timestamp: p.timestamp,
            marker: p.marker,
        };
        let red = forward::remember(
            &mut self.histories,
            self.config.red_distance,
            &incoming,
            &payload,
        );
        let fwd = Forward {
            incoming,
            csrc: p.csrc,
            ext: &ext,
            payload: &payload,
            red: &red,
            recovered: false,
        };
        let n = self
            .peers
            .fan_out(heard.listeners, &fwd, now, &mut self.timers, &mut self.out);
        forward::count_fan_out(&mut self.stats, n);
    }
}

/// The relayed form of a local speaker's admitted packet.
pub(super) fn relayed(
    conversation: String,
    speaker: SpeakerId,
    csrc: u32,
    fwd: &Incoming,
    ext: &ExtensionValues,
    payload: &[u8],
) -> RelayedPacket {
    RelayedPacket {
        conversation,
        speaker: speaker.0,
        csrc,
        ssrc: fwd.ssrc,
        seq: fwd.seq,
        timestamp: fwd.timestamp,
        marker: fwd.marker,
        level: ext.audio_level.map(i32::from),
        voice_activity: ext.voice_activity,
        payload: payload.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::{Request, SfuConfig, UnixClock};
    use std::time::Duration;

    fn sfu() -> Sfu {
        Sfu::new(
            SfuConfig::new("127.0.0.1:50000".parse().unwrap()),
            // 2023-11-14 in Unix microseconds: a realistic wall clock.
            UnixClock::new(Instant::now(), 1_700_000_000_000_000),
        )
    }

    fn join_here(s: &mut Sfu, now: Instant, userid: &str, conversation: &str) {
        s.handle_request(
            now,
            Request::Join {
                userid: userid.into(),
                conversation: conversation.into(),
            },
        );
    }

    fn member(userid: &str, conversation: &str, stamp: u64) -> Member {
        Member {
            userid: userid.into(),
            conversation: conversation.into(),
            stamp,
            origin: "remote".into(),
        }
    }

    #[test]
    fn remote_speakers_red_histories_are_bounded_and_forgotten_with_them() {
        let t0 = Instant::now();
        let mut s = sfu();
        join_here(&mut s, t0, "local", "c");
        let heartbeat = |s: &mut Sfu, now| {
            s.handle_cluster(
                now,
                ClusterInput::Heartbeat {
                    node: "b".into(),
                    conversations: vec!["c".into()],
                    users: Vec::new(),
                    first: true,
                    last: true,
                },
            )
        };
        heartbeat(&mut s, t0);
        // A node inventing a fresh speaker id for every packet.
        let packets = (0..5_000u64)
            .map(|i| RelayedPacket {
                conversation: "c".into(),
                speaker: i,
                ssrc: 1,
                seq: 1,
                payload: vec![0xF8; 40],
                ..Default::default()
            })
            .collect();
        s.handle_cluster(
            t0,
            ClusterInput::Media {
                node: "b".into(),
                packets,
            },
        );
        let kept = s.histories.len();
        assert!(
            kept > 0 && kept <= super::super::nodes::MAX_SPEAKERS_PER_NODE,
            "{kept} histories"
        );
        // Silent remote speakers are forgotten, their histories with them.
        heartbeat(&mut s, t0 + Duration::from_secs(6));
        assert_eq!(s.histories.len(), 0);
    }

    #[test]
    fn a_local_join_is_announced_and_a_remote_one_is_not_echoed() {
        let t0 = Instant::now();
        let mut s = sfu();
        join_here(&mut s, t0, "a", "x");
        let joined: Vec<_> = std::iter::from_fn(|| s.poll_event())
            .filter_map(|e| match e {
                SfuEvent::Joined(m) => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(joined.len(), 1);
        assert_eq!(
            (joined[0].userid.as_str(), joined[0].conversation.as_str()),
            ("a", "x")
        );
        s.handle_cluster(t0, ClusterInput::Join(member("b", "x", 1)));
        assert!(
            std::iter::from_fn(|| s.poll_event()).all(|e| !matches!(e, SfuEvent::Joined(_))),
            "a join from another node is not broadcast again"
        );
        assert_eq!(s.snapshot().conversations, 1);
    }

    #[test]
    fn an_older_remote_join_does_not_undo_a_newer_local_one() {
        let t0 = Instant::now();
        let mut s = sfu();
        join_here(&mut s, t0, "a", "new");
        // Stamp 0: made before any membership the local join knew of.
        s.handle_cluster(t0, ClusterInput::Join(member("a", "old", 0)));
        assert_eq!(
            s.snapshot().conversations,
            1,
            "the older join left nothing behind"
        );
        assert_eq!(s.members.conversation("a"), s.convs.key("new"));
    }

    #[test]
    fn a_node_that_falls_silent_is_dropped_by_the_core_timer() {
        let t0 = Instant::now();
        let mut s = sfu();
        let heartbeat = ClusterInput::Heartbeat {
            node: "b".into(),
            conversations: vec!["x".into()],
            users: vec![],
            first: true,
            last: true,
        };
        s.handle_cluster(t0, heartbeat);
        assert_eq!(s.snapshot().cluster_nodes, 1);
        let due = s.poll_timeout().expect("the cluster timer is armed");
        assert!(due <= t0 + Duration::from_secs(3));
        s.handle_timeout(t0 + Duration::from_secs(3));
        assert_eq!(s.snapshot().cluster_nodes, 0);
        s.handle_cluster(t0, ClusterInput::Goodbye { node: "c".into() });
        assert_eq!(
            s.snapshot().cluster_nodes,
            0,
            "goodbye from an unknown node"
        );
    }

    #[test]
    fn presence_lists_only_users_with_a_client_here() {
        let t0 = Instant::now();
        let mut s = sfu();
        s.handle_cluster(t0, ClusterInput::Join(member("remote", "x", 5)));
        let p = s.presence();
        assert!(p.users.is_empty(), "{p:?}");
        assert!(p.conversations.is_empty(), "no local member of x");
    }

    /// A core named `node` whose wall clock is `skew_s` seconds off.
    fn node(node: &str, skew_s: i64) -> Sfu {
        let mut config = SfuConfig::new("127.0.0.1:50000".parse().unwrap());
        config.node_id = node.into();
        let unix_us = (1_700_000_000i64 + skew_s) as u64 * 1_000_000;
        Sfu::new(config, UnixClock::new(Instant::now(), unix_us))
    }

    fn joins(s: &mut Sfu) -> Vec<Member> {
        std::iter::from_fn(|| s.poll_event())
            .filter_map(|e| match e {
                SfuEvent::Joined(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn in_conversation(s: &Sfu, userid: &str, name: &str) -> bool {
        s.members.conversation(userid).is_some()
            && s.members.conversation(userid) == s.convs.key(name)
    }

    #[test]
    fn a_skewed_clock_cannot_undo_a_join_that_returned_200() {
        for (skew_a, skew_b) in [(0, 3_600), (3_600, 0), (0, -3_600)] {
            let t0 = Instant::now();
            let (mut a, mut b) = (node("a", skew_a), node("b", skew_b));
            join_here(&mut b, t0, "u", "x");
            let first = joins(&mut b);
            for m in &first {
                a.handle_cluster(t0, ClusterInput::Join(m.clone()));
            }
            join_here(&mut a, t0, "u", "y");
            for m in joins(&mut a) {
                b.handle_cluster(t0, ClusterInput::Join(m));
            }
            // The older join arrives again (late, or replayed by a node).
            for m in first {
                a.handle_cluster(t0, ClusterInput::Join(m.clone()));
                b.handle_cluster(t0, ClusterInput::Join(m));
            }
            assert!(in_conversation(&a, "u", "y"), "skew {skew_a}/{skew_b}: a");
            assert!(in_conversation(&b, "u", "y"), "skew {skew_a}/{skew_b}: b");
        }
    }

    #[test]
    fn concurrent_joins_on_two_nodes_settle_on_the_same_conversation() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node("a", 0), node("b", 0));
        join_here(&mut a, t0, "u", "from-a");
        join_here(&mut b, t0, "u", "from-b");
        let (ja, jb) = (joins(&mut a), joins(&mut b));
        for m in jb {
            a.handle_cluster(t0, ClusterInput::Join(m));
        }
        for m in ja {
            b.handle_cluster(t0, ClusterInput::Join(m));
        }
        assert!(in_conversation(&a, "u", "from-b") && in_conversation(&b, "u", "from-b"));
    }
}
