//! The core's driving vocabulary, as plain data: [`Request`] in and
//! [`Reply`] out of [`super::Sfu::handle_request`], [`SfuEvent`]s out of
//! [`super::Sfu::poll_event`], and the errors they carry. The media loop
//! pairs a request with a reply channel (`crate::command`); the in-memory
//! harness calls the core with the same enum.

use std::fmt;
use std::sync::Arc;

use super::bite::FinishedBite;
use super::peer::{Claim, CloseReason};
pub use crate::proto::cluster::{Member, RelayedPacket};

/// Identifies a peer for its whole life; ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the driver must act on besides sending datagrams.
#[derive(Debug)]
pub enum SfuEvent {
    /// ICE and DTLS are up for this peer.
    PeerConnected(PeerId),
    /// The peer is gone and all its state freed.
    PeerClosed {
        /// Which peer.
        peer: PeerId,
        /// Why.
        reason: CloseReason,
    },
    /// A talk spurt is finished and ready to publish.
    Bite(FinishedBite),
    /// A join was accepted here: the other nodes of a cluster must apply it.
    Joined(Member),
    /// A local speaker's packet for the other nodes that have members of
    /// its conversation.
    Relay {
        /// The node ids it goes to (shared between packets).
        to: Arc<[Arc<str>]>,
        /// The packet.
        packet: RelayedPacket,
    },
}

/// What the other nodes of a cluster said (decoded by the driver; the core
/// sees no NATS).
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterInput {
    /// A node is alive, has members of `conversations`, and clients of
    /// `users`.
    Heartbeat {
        /// The node's id.
        node: String,
        /// Conversations with a connected member there.
        conversations: Vec<String>,
        /// Users with a client there, with their memberships.
        users: Vec<Member>,
    },
    /// A node stopped cleanly.
    Goodbye {
        /// The node's id.
        node: String,
    },
    /// A join accepted on another node.
    Join(Member),
    /// Packets of another node's speakers.
    Media {
        /// The sending node's id.
        node: String,
        /// Its speakers' packets, in order.
        packets: Vec<RelayedPacket>,
    },
}

/// What this node tells the others in its heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Presence {
    /// Conversations with a connected member here.
    pub conversations: Vec<String>,
    /// Users with a client here, with their memberships.
    pub users: Vec<Member>,
}

/// One request to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create a peer from a client's SDP offer.
    Connect {
        /// Who is connecting.
        claim: Claim,
        /// The SDP offer text.
        offer: String,
    },
    /// A trickled remote ICE candidate (`candidate:…` or `a=candidate:…`).
    Candidate {
        /// For which peer.
        peer: PeerId,
        /// The candidate line.
        candidate: String,
    },
    /// Move every client of a user into a conversation (permission already
    /// checked by the caller).
    Join {
        /// The user.
        userid: String,
        /// The conversation id.
        conversation: String,
    },
    /// Close every peer and refuse new work.
    Shutdown,
}

/// The core's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To `Connect`: the new peer and its SDP answer, or why not.
    Connect(Result<(PeerId, String), ConnectError>),
    /// To `Candidate`: added, or why it was not.
    Candidate(Result<(), String>),
    /// To `Join`: applied, or why not.
    Join(Result<(), JoinError>),
    /// To `Shutdown`: every peer is closing.
    Shutdown,
}

/// Why a connect was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The peer limit is reached.
    ServerFull,
    /// This user already has the most clients allowed.
    UserLimit,
    /// The server is shutting down.
    ShuttingDown,
    /// The offer could not be parsed or accepted.
    MalformedOffer(String),
    /// The offer has no audio m-line with Opus.
    NoOpus,
    /// The server failed (not the client's fault).
    Internal(String),
}

impl ConnectError {
    /// Label for the signalling outcome metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ConnectError::ServerFull => "ws_server_full",
            ConnectError::UserLimit => "ws_user_limit",
            ConnectError::ShuttingDown => "ws_shutting_down",
            ConnectError::MalformedOffer(_) => "ws_malformed_offer",
            ConnectError::NoOpus => "ws_no_opus",
            ConnectError::Internal(_) => "ws_internal_error",
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::ServerFull => write!(f, "server is at its peer limit"),
            ConnectError::UserLimit => write!(f, "this user has too many connected clients"),
            ConnectError::ShuttingDown => write!(f, "server is shutting down"),
            ConnectError::MalformedOffer(e) => write!(f, "malformed offer: {e}"),
            ConnectError::NoOpus => write!(f, "offer has no audio m-line with Opus"),
            ConnectError::Internal(e) => write!(f, "server error: {e}"),
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The server is shutting down.
    ShuttingDown,
}
