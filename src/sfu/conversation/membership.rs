//! Which conversation each user is in, which clients they have, and the
//! grace period that keeps a user in their conversation while no client is
//! connected (a phone switching networks). Membership is per user: a join
//! moves every client of the user, and clients that connect later follow.
//!
//! This module only answers "what changed"; the facade applies the changes
//! to conversations.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sfu::ids::{ConvKey, PeerId};

/// Orders a user's memberships across a cluster without reading any clock:
/// a per-user counter (one more than the newest membership the accepting
/// node knew of), ties broken by the accepting node's id. A join that
/// returned 200 is newer than every membership its node knew, so no older
/// one can undo it, however the nodes' clocks disagree.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp {
    /// How many memberships came before, as the accepting node knew.
    pub counter: u64,
    /// The node that accepted the join.
    pub origin: String,
}

#[derive(Debug, Default)]
struct User {
    conversation: Option<ConvKey>,
    /// Which membership this is: across a cluster, the newest wins.
    stamp: Stamp,
    peers: Vec<PeerId>,
    grace_until: Option<Instant>,
}

/// What a grace timer found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Grace {
    /// The user is forgotten; they leave this conversation.
    Expired(Option<ConvKey>),
    /// The grace was extended (another node still has the user's clients):
    /// check again then.
    Later(Instant),
    /// The user has a client again, or is gone already.
    Nothing,
}

/// What a join changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Moved {
    /// The conversation the user left, if any.
    pub from: Option<ConvKey>,
    /// Every client of the user (the facade moves the connected ones).
    pub peers: Vec<PeerId>,
    /// Set when the user has no client: the grace period starts now and
    /// ends then.
    pub grace_until: Option<Instant>,
}

/// What a peer's removal changed for its user.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PeerGone {
    /// The user still has clients, or was in no conversation.
    Nothing,
    /// The user's last client left; membership is kept until then.
    GraceUntil(Instant),
}

/// Every user with a client or a membership.
#[derive(Debug)]
pub(crate) struct Memberships {
    users: HashMap<String, User>,
    grace: Duration,
}

impl Memberships {
    /// No users; memberships outlive a user's last client by `grace`.
    pub fn new(grace: Duration) -> Self {
        Memberships {
            users: HashMap::new(),
            grace,
        }
    }

    /// The conversation a user is in.
    #[cfg(any(test, feature = "test-kit"))]
    pub fn conversation(&self, userid: &str) -> Option<ConvKey> {
        self.users.get(userid)?.conversation
    }

    /// How many clients a user has.
    pub fn client_count(&self, userid: &str) -> usize {
        self.users.get(userid).map_or(0, |u| u.peers.len())
    }

    /// Records a new client of a user.
    pub fn add_peer(&mut self, userid: &str, peer: PeerId) {
        self.user_mut(userid).peers.push(peer);
    }

    /// A client connected: its user's grace period ends; returns the
    /// conversation the client belongs in.
    pub fn peer_connected(&mut self, userid: &str) -> Option<ConvKey> {
        let user = self.users.get_mut(userid)?;
        user.grace_until = None;
        user.conversation
    }

    /// Points the user at `to`; `None` if they were already there.
    #[cfg(test)]
    pub fn join(&mut self, userid: &str, to: ConvKey, now: Instant) -> Option<Moved> {
        let stamp = Stamp {
            counter: u64::MAX,
            origin: String::new(),
        };
        self.join_stamped(userid, to, stamp, now)
    }

    /// Points the user at `to` if the membership stamped `stamp` is not
    /// older than the one the user has; `None` if nothing moved.
    pub fn join_stamped(
        &mut self,
        userid: &str,
        to: ConvKey,
        stamp: Stamp,
        now: Instant,
    ) -> Option<Moved> {
        let grace = self.grace;
        let user = self.user_mut(userid);
        if stamp < user.stamp {
            return None;
        }
        user.stamp = stamp;
        if user.conversation == Some(to) {
            return None;
        }
        let from = user.conversation.replace(to);
        let grace_until = user.peers.is_empty().then(|| now + grace);
        if grace_until.is_some() {
            user.grace_until = grace_until;
        }
        Some(Moved {
            from,
            peers: user.peers.clone(),
            grace_until,
        })
    }

    /// A client is gone. If it was the user's last, the membership is kept
    /// for the grace period (unless `keep` is false: shutdown), else the
    /// user is forgotten.
    pub fn peer_removed(
        &mut self,
        userid: &str,
        peer: PeerId,
        now: Instant,
        keep: bool,
    ) -> PeerGone {
        let Some(user) = self.users.get_mut(userid) else {
            return PeerGone::Nothing;
        };
        user.peers.retain(|p| *p != peer);
        if !user.peers.is_empty() {
            return PeerGone::Nothing;
        }
        if keep && user.conversation.is_some() {
            let until = now + self.grace;
            user.grace_until = Some(until);
            return PeerGone::GraceUntil(until);
        }
        self.users.remove(userid);
        PeerGone::Nothing
    }

    /// The grace timer of a user fired: if no client came back (here or,
    /// as far as we heard, on another node), the user is forgotten.
    pub fn grace_expired(&mut self, userid: &str, now: Instant) -> Grace {
        let Some(user) = self.users.get(userid) else {
            return Grace::Nothing;
        };
        match user.grace_until {
            _ if !user.peers.is_empty() => Grace::Nothing,
            None => Grace::Nothing,
            Some(g) if g > now => Grace::Later(g),
            Some(_) => Grace::Expired(self.users.remove(userid).and_then(|u| u.conversation)),
        }
    }

    /// Another node has a client of this user: a user with no client here
    /// keeps their membership a full grace period from now. Returns the
    /// deadline if a grace timer must be armed (none was pending).
    pub fn seen_elsewhere(&mut self, userid: &str, now: Instant) -> Option<Instant> {
        let grace = self.grace;
        let user = self.users.get_mut(userid)?;
        if !user.peers.is_empty() {
            return None;
        }
        let pending = user.grace_until.is_some();
        user.grace_until = Some(now + grace);
        (!pending).then_some(now + grace)
    }

    /// The stamp for a join accepted here, on node `origin`: newer than
    /// every membership of the user this node knows, so a local join always
    /// applies (no clock is read).
    pub fn next_stamp(&self, userid: &str, origin: &str) -> Stamp {
        let current = self.users.get(userid).map_or(0, |u| u.stamp.counter);
        Stamp {
            counter: current.saturating_add(1),
            origin: origin.to_string(),
        }
    }

    /// Users with a client here, with their conversation and its stamp
    /// (what a heartbeat tells the other nodes).
    pub fn with_clients(&self) -> impl Iterator<Item = (&str, ConvKey, &Stamp)> {
        self.users.iter().filter_map(|(id, u)| {
            let c = u.conversation?;
            (!u.peers.is_empty()).then_some((id.as_str(), c, &u.stamp))
        })
    }

    fn user_mut(&mut self, userid: &str) -> &mut User {
        self.users.entry(userid.to_string()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(counter: u64) -> Stamp {
        Stamp {
            counter,
            origin: "n".into(),
        }
    }

    #[test]
    fn join_moves_all_clients_and_reports_the_old_conversation() {
        let t0 = Instant::now();
        let mut m = Memberships::new(Duration::from_secs(60));
        m.add_peer("a", PeerId(1));
        m.add_peer("a", PeerId(2));
        let moved = m.join("a", ConvKey(1), t0).unwrap();
        assert_eq!(moved.from, None);
        assert_eq!(moved.peers, vec![PeerId(1), PeerId(2)]);
        assert_eq!(moved.grace_until, None);
        assert_eq!(m.join("a", ConvKey(1), t0), None, "already there");
        assert_eq!(m.join("a", ConvKey(2), t0).unwrap().from, Some(ConvKey(1)));
    }

    #[test]
    fn last_client_leaving_starts_the_grace_and_expiry_forgets_the_user() {
        let t0 = Instant::now();
        let g = Duration::from_secs(60);
        let mut m = Memberships::new(g);
        m.add_peer("a", PeerId(1));
        m.join("a", ConvKey(7), t0);
        assert_eq!(
            m.peer_removed("a", PeerId(1), t0, true),
            PeerGone::GraceUntil(t0 + g)
        );
        assert_eq!(
            m.grace_expired("a", t0 + g / 2),
            Grace::Later(t0 + g),
            "not yet"
        );
        assert_eq!(m.conversation("a"), Some(ConvKey(7)));
        assert_eq!(
            m.grace_expired("a", t0 + g),
            Grace::Expired(Some(ConvKey(7)))
        );
        assert_eq!(m.conversation("a"), None);
    }

    #[test]
    fn a_client_coming_back_cancels_the_grace() {
        let t0 = Instant::now();
        let g = Duration::from_secs(60);
        let mut m = Memberships::new(g);
        m.add_peer("a", PeerId(1));
        m.join("a", ConvKey(7), t0);
        m.peer_removed("a", PeerId(1), t0, true);
        m.add_peer("a", PeerId(2));
        assert_eq!(m.peer_connected("a"), Some(ConvKey(7)));
        assert_eq!(m.grace_expired("a", t0 + g), Grace::Nothing);
    }

    #[test]
    fn the_newest_membership_wins_whatever_order_joins_arrive_in() {
        let t0 = Instant::now();
        let mut m = Memberships::new(Duration::from_secs(60));
        m.add_peer("a", PeerId(1));
        assert!(m.join_stamped("a", ConvKey(2), st(200), t0).is_some());
        assert!(
            m.join_stamped("a", ConvKey(1), st(100), t0).is_none(),
            "older"
        );
        assert_eq!(m.conversation("a"), Some(ConvKey(2)));
        let listed: Vec<_> = m.with_clients().collect();
        assert_eq!(listed, vec![("a", ConvKey(2), &st(200))]);
    }

    #[test]
    fn clients_on_another_node_keep_the_membership_alive() {
        let t0 = Instant::now();
        let g = Duration::from_secs(60);
        let mut m = Memberships::new(g);
        // A join from another node for a user with no client here.
        assert_eq!(
            m.join_stamped("a", ConvKey(1), st(5), t0)
                .unwrap()
                .grace_until,
            Some(t0 + g)
        );
        // Its heartbeat says the user still has a client there.
        assert_eq!(
            m.seen_elsewhere("a", t0 + g / 2),
            None,
            "a timer is pending"
        );
        assert_eq!(m.grace_expired("a", t0 + g), Grace::Later(t0 + g / 2 + g));
        assert_eq!(
            m.grace_expired("a", t0 + g / 2 + g),
            Grace::Expired(Some(ConvKey(1)))
        );
        assert_eq!(
            m.seen_elsewhere("a", t0),
            None,
            "forgotten users are not revived"
        );
    }

    #[test]
    fn joining_with_no_client_starts_the_grace_and_shutdown_keeps_nothing() {
        let t0 = Instant::now();
        let g = Duration::from_secs(60);
        let mut m = Memberships::new(g);
        assert_eq!(
            m.join("a", ConvKey(1), t0).unwrap().grace_until,
            Some(t0 + g)
        );
        m.add_peer("b", PeerId(3));
        m.join("b", ConvKey(1), t0);
        assert_eq!(m.peer_removed("b", PeerId(3), t0, false), PeerGone::Nothing);
        assert_eq!(m.conversation("b"), None);
    }
}
