//! One `/connect` session as a state machine with no I/O: text frames,
//! read faults, replies and notices from the media loop, and clock ticks go
//! in; a frame to send, a request for the loop, or a close comes out.
//! `crate::http::connect` moves the bytes and keeps the clock.

use std::time::{Duration, Instant};

use super::message::{format_answer, parse_client_message, ClientMessage, Style};
use super::CloseCode;
use crate::command::{PeerNotice, SendError};
use crate::sfu::{ConnectError, PeerId};

/// How long after the connect deadline a session waits for the core's own
/// verdict before closing on its own (the core removes the peer at the
/// deadline too; this is the backstop).
const BACKSTOP: Duration = Duration::from_secs(1);
/// Most trickled candidates one session may send. The server is ICE-lite
/// and learns addresses from STUN checks; a browser sends a handful.
pub(crate) const MAX_CANDIDATES: usize = 32;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing; read on.
    None,
    /// Send this text frame.
    Send(String),
    /// Hand this offer to the media loop and report the reply with
    /// [`Session::on_connect_reply`].
    Connect(String),
    /// Hand this trickled candidate to the media loop.
    Candidate(PeerId, String),
    /// End the session with this close code and reason.
    Close(CloseCode, String),
}

/// A frame the WebSocket layer could not turn into text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadFault {
    /// A binary frame.
    Binary,
    /// A frame or message over the size limit.
    TooBig(String),
    /// A text frame that is not UTF-8.
    BadUtf8,
    /// Broken WebSocket framing.
    Protocol(String),
}

/// What the media loop answered to an offer.
#[derive(Debug)]
pub(crate) enum ConnectReply {
    /// The loop answered.
    Answer(Result<(PeerId, String), ConnectError>),
    /// The loop could not be reached.
    NotSent(SendError),
    /// The loop did not answer in time.
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NoOffer,
    Offered(Style),
    Answered(PeerId),
}

/// One signalling session.
#[derive(Debug)]
pub(crate) struct Session {
    state: State,
    deadline: Instant,
    candidates: usize,
}

impl Session {
    /// A session opened at `now`; the peer must be connected by
    /// `now + connect_timeout`.
    pub fn new(now: Instant, connect_timeout: Duration) -> Self {
        Session {
            state: State::NoOffer,
            deadline: now + connect_timeout,
            candidates: 0,
        }
    }

    /// The peer this session created, once the loop answered.
    pub fn peer(&self) -> Option<PeerId> {
        match self.state {
            State::Answered(p) => Some(p),
            _ => None,
        }
    }

    /// A text frame from the client.
    pub fn on_text(&mut self, text: &str) -> Action {
        let msg = match parse_client_message(text) {
            Ok(m) => m,
            Err(e) => return Action::Close(CloseCode::InvalidPayload, e),
        };
        match (self.state, msg) {
            (State::NoOffer, ClientMessage::Offer { sdp, style }) => {
                self.state = State::Offered(style);
                Action::Connect(sdp)
            }
            (State::NoOffer, ClientMessage::Candidate(_)) => Action::Close(
                CloseCode::PolicyViolation,
                "the offer must come before candidates".into(),
            ),
            (State::Answered(_), ClientMessage::Candidate(_))
                if self.candidates >= MAX_CANDIDATES =>
            {
                Action::Close(
                    CloseCode::PolicyViolation,
                    format!("more than {MAX_CANDIDATES} candidates"),
                )
            }
            (State::Answered(peer), ClientMessage::Candidate(c)) => {
                self.candidates += 1;
                Action::Candidate(peer, c)
            }
            (_, ClientMessage::Offer { .. }) => Action::Close(
                CloseCode::PolicyViolation,
                "renegotiation is not supported".into(),
            ),
            // The driver waits for the loop's answer before it reads again.
            (State::Offered(_), ClientMessage::Candidate(_)) => Action::None,
        }
    }

    /// A frame that could not be read as text.
    pub fn on_fault(&mut self, fault: ReadFault) -> Action {
        match fault {
            ReadFault::Binary => Action::Close(
                CloseCode::Unsupported,
                "binary frames are not supported; send text".into(),
            ),
            ReadFault::TooBig(e) => {
                Action::Close(CloseCode::TooBig, format!("message too big: {e}"))
            }
            ReadFault::BadUtf8 => Action::Close(
                CloseCode::InvalidPayload,
                "text frame is not valid UTF-8".into(),
            ),
            ReadFault::Protocol(e) => {
                Action::Close(CloseCode::ProtocolError, format!("protocol error: {e}"))
            }
        }
    }

    /// The client closed the WebSocket (or the connection ended).
    pub fn on_client_closed(&mut self) -> Action {
        Action::Close(CloseCode::Normal, String::new())
    }

    /// What became of the offer handed to the loop.
    pub fn on_connect_reply(&mut self, reply: ConnectReply) -> Action {
        let State::Offered(style) = self.state else {
            return Action::None;
        };
        match reply {
            ConnectReply::Answer(Ok((peer, answer))) => {
                self.state = State::Answered(peer);
                Action::Send(format_answer(style, &answer))
            }
            ConnectReply::Answer(Err(e)) => Action::Close(e.close_code(), e.to_string()),
            ConnectReply::NotSent(e) => self.on_send_failed(e),
            ConnectReply::TimedOut => Action::Close(
                CloseCode::InternalError,
                "media loop did not answer in time".into(),
            ),
        }
    }

    /// A request for the loop could not be queued.
    pub fn on_send_failed(&mut self, e: SendError) -> Action {
        match e {
            SendError::Full => Action::Close(
                CloseCode::TryAgainLater,
                "server busy; retry shortly".into(),
            ),
            SendError::Stopped => {
                Action::Close(CloseCode::GoingAway, "server shutting down".into())
            }
        }
    }

    /// News about the session's peer from the loop.
    pub fn on_notice(&mut self, notice: PeerNotice) -> Action {
        match notice {
            PeerNotice::Connected => Action::Close(CloseCode::Normal, "connected".into()),
            PeerNotice::Closed(reason) => {
                let code = reason.close_code();
                let why = if code == CloseCode::InternalError {
                    format!("peer {reason}")
                } else {
                    reason.to_string()
                };
                Action::Close(code, why)
            }
        }
    }

    /// Time passed; closes the session when its deadline is over.
    pub fn on_tick(&mut self, now: Instant) -> Action {
        match self.state {
            State::NoOffer if now >= self.deadline => Action::Close(
                CloseCode::ConnectTimeout,
                "no offer within the connect timeout".into(),
            ),
            State::Answered(_) if now >= self.deadline + BACKSTOP => Action::Close(
                CloseCode::ConnectTimeout,
                "not connected within the connect timeout".into(),
            ),
            _ => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::{CloseReason, InternalError, OfferError};

    const T: Duration = Duration::from_secs(30);

    fn closed_with(a: Action) -> u16 {
        match a {
            Action::Close(c, _) => c.code(),
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[test]
    fn offer_answer_candidates_connected() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        assert_eq!(
            s.on_text("offer::v=0\r\n"),
            Action::Connect("v=0\r\n".into())
        );
        let a = s.on_connect_reply(ConnectReply::Answer(Ok((PeerId(3), "v=0".into()))));
        assert_eq!(a, Action::Send("answer::v=0".into()));
        assert_eq!(s.peer(), Some(PeerId(3)));
        assert_eq!(
            s.on_text("ice::candidate:1 1 udp 1 1.2.3.4 5 typ host"),
            Action::Candidate(PeerId(3), "candidate:1 1 udp 1 1.2.3.4 5 typ host".into())
        );
        assert_eq!(closed_with(s.on_notice(PeerNotice::Connected)), 1000);
    }

    #[test]
    fn candidates_beyond_the_cap_close_the_session() {
        let mut s = Session::new(Instant::now(), T);
        s.on_text("v=0");
        s.on_connect_reply(ConnectReply::Answer(Ok((PeerId(1), "v=0".into()))));
        for _ in 0..MAX_CANDIDATES {
            assert!(matches!(
                s.on_text("ice::candidate:x"),
                Action::Candidate(..)
            ));
        }
        assert_eq!(closed_with(s.on_text("ice::candidate:x")), 1008);
    }

    #[test]
    fn misuse_and_garbage_get_their_codes() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        assert_eq!(closed_with(s.on_text("ice::x")), 1008);
        assert_eq!(closed_with(s.on_text("hello")), 1007);
        assert_eq!(closed_with(s.on_fault(ReadFault::Binary)), 1003);
        assert_eq!(closed_with(s.on_fault(ReadFault::TooBig("x".into()))), 1009);
        assert_eq!(closed_with(s.on_fault(ReadFault::BadUtf8)), 1007);
        assert_eq!(
            closed_with(s.on_fault(ReadFault::Protocol("x".into()))),
            1002
        );
        s.on_text("v=0");
        s.on_connect_reply(ConnectReply::Answer(Ok((PeerId(1), "v=0".into()))));
        assert_eq!(closed_with(s.on_text("v=0")), 1008, "no renegotiation");
    }

    #[test]
    fn refusals_map_to_codes() {
        for (e, code) in [
            (ConnectError::ServerFull { limit: 1 }, 1013),
            (ConnectError::UserLimit { limit: 1 }, 1008),
            (ConnectError::ShuttingDown, 1001),
            (ConnectError::NoOpus, 1007),
            (ConnectError::MalformedOffer(OfferError::NotSdp), 1007),
            (ConnectError::Internal(InternalError::StackPanicked), 1011),
        ] {
            let mut s = Session::new(Instant::now(), T);
            s.on_text("v=0");
            assert_eq!(
                closed_with(s.on_connect_reply(ConnectReply::Answer(Err(e)))),
                code
            );
        }
        let mut s = Session::new(Instant::now(), T);
        s.on_text("v=0");
        assert_eq!(
            closed_with(s.on_connect_reply(ConnectReply::TimedOut)),
            1011
        );
        let mut s = Session::new(Instant::now(), T);
        s.on_text("v=0");
        assert_eq!(
            closed_with(s.on_connect_reply(ConnectReply::NotSent(SendError::Full))),
            1013
        );
    }

    #[test]
    fn deadlines_and_peer_fates() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, T);
        assert_eq!(s.on_tick(t0 + T / 2), Action::None);
        assert_eq!(closed_with(s.on_tick(t0 + T)), 4408);
        let mut s = Session::new(t0, T);
        s.on_text("v=0");
        s.on_connect_reply(ConnectReply::Answer(Ok((PeerId(1), "v=0".into()))));
        assert_eq!(s.on_tick(t0 + T), Action::None, "the core decides first");
        assert_eq!(closed_with(s.on_tick(t0 + T + BACKSTOP)), 4408);
        assert_eq!(
            closed_with(s.on_notice(PeerNotice::Closed(CloseReason::ConnectTimeout))),
            4408
        );
        assert_eq!(
            closed_with(s.on_notice(PeerNotice::Closed(CloseReason::Shutdown))),
            1001
        );
        assert_eq!(
            closed_with(s.on_notice(PeerNotice::Closed(CloseReason::Disconnected))),
            1011
        );
    }
}
