//! One client's peer connection as the core sees it: its `Rtc`, who it
//! belongs to, its slots and its deadlines.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::format::Codec;
use str0m::media::{Mid, Pt};
use str0m::Rtc;

use super::conversation::ConvKey;
use super::slot::Slot;
use super::PeerId;

/// Who a peer belongs to, from the `X-User-Claim` header set by the auth proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Beep user id.
    pub userid: String,
    /// The user's device (client) id.
    pub clientid: String,
}

/// A connected or connecting client.
#[derive(Debug)]
pub struct Peer {
    /// Core-assigned id, never reused.
    pub id: PeerId,
    /// Whose client this is.
    pub claim: Claim,
    /// The WebRTC state machine.
    pub rtc: Rtc,
    /// The server-side ICE ufrag this peer's STUN checks carry.
    pub ufrag: String,
    /// Addresses datagrams from this peer were routed from.
    pub addrs: Vec<SocketAddr>,
    /// Audio m-lines the server sends on.
    pub slots: Vec<Slot>,
    /// Number of audio m-lines the peer sends on.
    pub sending_mlines: usize,
    /// ICE + DTLS are up.
    pub connected: bool,
    /// The conversation this peer takes part in.
    pub conversation: Option<ConvKey>,
    /// When the peer was created (for the connect timeout).
    pub created: Instant,
    /// When the last datagram arrived (for the idle timeout).
    pub last_rx: Instant,
    /// The `Rtc`'s own next timeout.
    pub rtc_deadline: Instant,
    /// The deadline currently in the timer heap for this peer, if any.
    pub armed: Option<Instant>,
}

impl Peer {
    /// The earliest moment this peer needs attention.
    pub fn next_deadline(&self, connect_timeout: Duration, idle_timeout: Duration) -> Instant {
        let mut d = self.rtc_deadline.min(self.last_rx + idle_timeout);
        if !self.connected {
            d = d.min(self.created + connect_timeout);
        }
        d
    }

    /// The peer's payload type for Opus on `mid`.
    pub fn opus_pt(&self, mid: Mid) -> Option<Pt> {
        let remote = self.rtc.media(mid).map(|m| m.remote_pts()).unwrap_or(&[]);
        let opus = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .filter(|p| p.spec().codec == Codec::Opus);
        let mut first = None;
        for p in opus {
            if remote.is_empty() || remote.contains(&p.pt()) {
                return Some(p.pt());
            }
            first.get_or_insert(p.pt());
        }
        first
    }

    /// Short description for logs: `peer 7 (alice/phone)`.
    pub fn label(&self) -> String {
        format!(
            "peer {} ({}/{})",
            self.id.0, self.claim.userid, self.claim.clientid
        )
    }
}
