//! A peer's life as the facade sees it: it connects (and joins its user's
//! conversation), its timers fire, it leaves a conversation, it goes.

use std::time::Instant;

use log::info;
use str0m::net::Protocol;
use str0m::Input;

use super::conversation::membership::PeerGone;
use super::ids::{ConvKey, PeerId, SpeakerId};
use super::peer::PeerTimer;
use super::timer::TimerKey;
use super::{bite_event, CloseReason, Sfu, SfuEvent};

impl Sfu {
    pub(super) fn on_connected(&mut self, id: PeerId, now: Instant) {
        if !self.peers.mark_connected(id) {
            return;
        }
        let Some(peer) = self.peers.get(id) else {
            return;
        };
        self.stats.peers_connected += 1;
        match peer.addrs().first() {
            Some((proto, a)) => info!("{} connected from {a} ({proto:?})", peer.label()),
            None => info!("{} connected", peer.label()),
        }
        self.events.push_back(SfuEvent::PeerConnected(id));
        if let Some(key) = self.members.peer_connected(&peer.claim().userid) {
            self.convs.add_member(key, id, peer.slot_count(), now);
        }
        self.arm(id);
    }

    pub(super) fn peer_timeout(&mut self, id: PeerId, at: Instant, now: Instant) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if peer.armed() != Some(at) {
            return; // stale entry
        }
        peer.set_armed(None);
        match peer.expired(now) {
            Some(PeerTimer::Connect) => self.remove_peer(id, CloseReason::ConnectTimeout, now),
            Some(PeerTimer::Idle) => self.remove_peer(id, CloseReason::Idle, now),
            Some(PeerTimer::Rtc) => {
                self.stats.rtc_timeouts += 1;
                if !peer.handle_input(Input::Timeout(now), &mut self.out) {
                    self.stats.dropped_rejected += 1;
                }
                peer.arm(&mut self.timers);
            }
            None => peer.arm(&mut self.timers),
        }
    }

    /// Takes a peer out of its conversation, finishing its open bite.
    pub(super) fn leave(&mut self, key: ConvKey, id: PeerId, now: Instant) {
        if let Some(b) = self.bites.flush(id) {
            self.events.push_back(bite_event(b));
        }
        self.convs.remove_member(key, id, now);
    }

    pub(super) fn remove_peer(&mut self, id: PeerId, reason: CloseReason, now: Instant) {
        if let Some(key) = self.convs.of(id) {
            self.leave(key, id, now);
        }
        let Some(mut peer) = self.peers.remove(id) else {
            return;
        };
        self.histories.remove(&SpeakerId::from(id));
        // Say goodbye (DTLS close_notify, RTCP BYE) if the peer got that far.
        peer.close(&mut self.out);
        let userid = &peer.claim().userid;
        let keep = !self.shutting_down;
        if let PeerGone::GraceUntil(t) = self.members.peer_removed(userid, id, now, keep) {
            self.timers.push(t, TimerKey::Grace(userid.clone()));
        }
        self.stats.peers_closed += 1;
        info!("{} closed: {reason}", peer.label());
        self.events.push_back(SfuEvent::PeerClosed {
            peer: id,
            reason,
            tcp: peer
                .addrs()
                .iter()
                .filter(|(proto, _)| *proto == Protocol::Tcp)
                .map(|(_, a)| *a)
                .collect(),
        });
    }
}
