//! The core's driving vocabulary, as plain data: [`Request`] in and
//! [`Reply`] out of [`super::Sfu::handle_request`], [`SfuEvent`]s out of
//! [`super::Sfu::poll_event`], and the errors they carry. The media loop
//! pairs a request with a reply channel (`crate::command`); the in-memory
//! harness calls the core with the same enum.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use super::bite::FinishedBite;
use super::ids::PeerId;
pub use crate::proto::cluster::{Member, RelayedPacket};

/// Who a peer belongs to, from the `X-User-Claim` header set by the auth proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Beep user id.
    pub userid: String,
    /// The user's device (client) id.
    pub clientid: String,
}

/// Why a peer was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// ICE/DTLS did not complete within the connect timeout.
    ConnectTimeout,
    /// No datagram for the idle timeout.
    Idle,
    /// ICE reported the peer disconnected, or DTLS was closed.
    Disconnected,
    /// The peer's WebRTC stack failed.
    Failed(PeerFailure),
    /// The server is shutting down.
    Shutdown,
}

/// How a peer's WebRTC stack (str0m) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFailure {
    /// str0m panicked on an input; only this peer is closed.
    Panicked,
    /// str0m returned an error while being drained (its text).
    Rtc(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ConnectTimeout => write!(f, "not connected within the connect timeout"),
            CloseReason::Idle => write!(f, "no traffic within the idle timeout"),
            CloseReason::Disconnected => write!(f, "disconnected"),
            CloseReason::Failed(PeerFailure::Panicked) => {
                write!(f, "failed: the WebRTC stack panicked on an input")
            }
            CloseReason::Failed(PeerFailure::Rtc(e)) => write!(f, "failed: {e}"),
            CloseReason::Shutdown => write!(f, "server shutting down"),
        }
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
        /// The remote addresses of its ICE-TCP connections, for the driver
        /// to close (they would otherwise hold their slots).
        tcp: Vec<SocketAddr>,
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
        /// The first part of a heartbeat split for NATS's `max_payload`
        /// (true for a heartbeat in one part).
        first: bool,
        /// The last part: the node's conversations are replaced by those of
        /// every part since the first.
        last: bool,
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
    Candidate(Result<(), CandidateError>),
    /// To `Join`: applied, or why not.
    Join(Result<(), JoinError>),
    /// To `Shutdown`: every peer is closing.
    Shutdown,
}

/// Why a connect was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The peer limit (`limit` peers) is reached.
    ServerFull {
        /// The limit (`--max-peers`).
        limit: usize,
    },
    /// This user already has the most clients allowed.
    UserLimit {
        /// The limit (`--max-peers-per-user`).
        limit: usize,
    },
    /// The server is shutting down.
    ShuttingDown,
    /// The offer could not be parsed or accepted.
    MalformedOffer(OfferError),
    /// The offer has no audio m-line with Opus.
    NoOpus,
    /// The server failed (not the client's fault).
    Internal(InternalError),
}

/// What is wrong with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferError {
    /// Larger than the limit.
    TooLarge {
        /// Its size in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// It does not start with `v=0`.
    NotSdp,
    /// str0m could not parse it (str0m's reason).
    Unparsable(String),
    /// str0m parsed it but would not accept it (str0m's reason).
    Refused(String),
}

/// A failure on the server's side while creating a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InternalError {
    /// A configured server candidate address was refused by str0m.
    ServerCandidate(SocketAddr),
    /// str0m panicked while accepting this offer.
    StackPanicked,
    /// The peer failed while being set up, right after its offer.
    FailedAtOnce(PeerId),
}

/// Why a trickled candidate was not added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandidateError {
    /// str0m panicked parsing it.
    Unparsable {
        /// For which peer.
        peer: PeerId,
    },
    /// It is not a valid candidate line (str0m's reason).
    Malformed {
        /// For which peer.
        peer: PeerId,
        /// What str0m said.
        reason: String,
    },
    /// The peer no longer exists.
    PeerGone(PeerId),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::ServerFull { limit } => {
                write!(f, "server is at its limit of {limit} peers")
            }
            ConnectError::UserLimit { limit } => {
                write!(
                    f,
                    "this user has {limit} connected clients, the most allowed"
                )
            }
            ConnectError::ShuttingDown => write!(f, "server is shutting down"),
            ConnectError::MalformedOffer(e) => write!(f, "malformed offer: {e}"),
            ConnectError::NoOpus => write!(f, "offer has no audio m-line with Opus"),
            ConnectError::Internal(e) => write!(f, "server error: {e}"),
        }
    }
}

impl fmt::Display for OfferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OfferError::TooLarge { len, limit } => {
                write!(f, "offer of {len} bytes is larger than {limit} bytes")
            }
            OfferError::NotSdp => write!(f, "an SDP offer starts with v=0"),
            OfferError::Unparsable(e) => write!(f, "{e}"),
            OfferError::Refused(e) => write!(f, "refused: {e}"),
        }
    }
}

impl fmt::Display for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InternalError::ServerCandidate(a) => write!(f, "server candidate {a} was refused"),
            InternalError::StackPanicked => write!(f, "the WebRTC stack failed on this offer"),
            InternalError::FailedAtOnce(p) => write!(f, "peer {p} failed right after its offer"),
        }
    }
}

impl fmt::Display for CandidateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CandidateError::Unparsable { peer } => {
                write!(f, "peer {peer}: candidate could not be parsed")
            }
            CandidateError::Malformed { peer, reason } => {
                write!(f, "peer {peer}: bad candidate: {reason}")
            }
            CandidateError::PeerGone(peer) => write!(f, "peer {peer} is gone"),
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The server is shutting down.
    ShuttingDown,
}
