//! WebSocket close codes the server ends a signalling session with, and the
//! code each refusal maps to.
//!
//! | code | meaning |
//! |---|---|
//! | 1000 | connected, or the client hung up |
//! | 1001 | server shutting down |
//! | 1002 | WebSocket protocol error |
//! | 1003 | binary frame (only text is spoken) |
//! | 1007 | malformed message or offer, or no Opus in the offer |
//! | 1008 | protocol misuse (candidate before offer, second offer, too many candidates), or the user already has `--max-peers-per-user` clients |
//! | 1009 | message too big |
//! | 1011 | the peer failed (ICE/DTLS), a server error, or the media loop did not answer |
//! | 1013 | server at its peer limit or overloaded; retry later |
//! | 4408 | not connected within the connect timeout |

use crate::sfu::{CloseReason, ConnectError};

/// Why the server closed a signalling WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseCode {
    /// 1000: done (connected), or the client left.
    Normal,
    /// 1001: the server is going away.
    GoingAway,
    /// 1002: the client broke the WebSocket protocol.
    ProtocolError,
    /// 1003: a frame type we do not speak (binary).
    Unsupported,
    /// 1007: a message we could not understand.
    InvalidPayload,
    /// 1008: a message out of order or over a limit.
    PolicyViolation,
    /// 1009: a message too big.
    TooBig,
    /// 1011: the server failed.
    InternalError,
    /// 1013: overloaded or full; retry later.
    TryAgainLater,
    /// 4408: not connected within the connect timeout (mirrors HTTP 408).
    ConnectTimeout,
}

impl CloseCode {
    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::ConnectTimeout => 4408,
        }
    }
}

impl ConnectError {
    /// The close code a refused offer ends its session with.
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            ConnectError::ServerFull { .. } => CloseCode::TryAgainLater,
            ConnectError::UserLimit { .. } => CloseCode::PolicyViolation,
            ConnectError::ShuttingDown => CloseCode::GoingAway,
            ConnectError::MalformedOffer(_) | ConnectError::NoOpus => CloseCode::InvalidPayload,
            ConnectError::Internal(_) => CloseCode::InternalError,
        }
    }
}

/// The label a refused offer is counted under in the signalling outcome
/// metric (`beep_sfu_signalling_outcomes_total{outcome=…}`), beside its
/// close code: both say how the session ended.
pub(crate) fn outcome_label(e: &ConnectError) -> &'static str {
    match e {
        ConnectError::ServerFull { .. } => "ws_server_full",
        ConnectError::UserLimit { .. } => "ws_user_limit",
        ConnectError::ShuttingDown => "ws_shutting_down",
        ConnectError::MalformedOffer(_) => "ws_malformed_offer",
        ConnectError::NoOpus => "ws_no_opus",
        ConnectError::Internal(_) => "ws_internal_error",
    }
}

impl CloseReason {
    /// The close code a session ends with when its peer is removed before
    /// connecting.
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            CloseReason::ConnectTimeout => CloseCode::ConnectTimeout,
            CloseReason::Shutdown => CloseCode::GoingAway,
            _ => CloseCode::InternalError,
        }
    }
}
