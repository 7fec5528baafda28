//! What draining an `Rtc` produced: datagrams to send now, and work that
//! touches other state (a packet to forward, a peer that connected or died),
//! handled by the facade once the drain is over, so no two `Rtc`s are ever
//! borrowed at once (str0m's rule: drain after every mutation).

use std::collections::VecDeque;

use str0m::net::Transmit;
use str0m::rtp::RtpPacket;

use crate::sfu::api::CloseReason;
use crate::sfu::ids::PeerId;

/// Work found while draining an `Rtc`.
// RTP packets dominate and are moved, not boxed: the queue's buffer is
// reused, so boxing would add an allocation per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Pending {
    /// ICE and DTLS came up.
    Connected(PeerId),
    /// The peer must go.
    Close(PeerId, CloseReason),
    /// A decrypted packet from this peer.
    Rtp(PeerId, RtpPacket),
}

/// Datagrams and deferred work, filled by [`super::Peer`] drains.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Datagrams ready for the socket, oldest first.
    pub transmits: VecDeque<Transmit>,
    /// Work for the facade, oldest first.
    pub pending: VecDeque<Pending>,
}
