//! `GET /connect`: the WebSocket signalling session of one peer.
//!
//! Claims are checked before the upgrade (400). After it: the first text
//! frame is the offer, the answer goes back in the same style, `ice::`
//! frames add candidates, and the server closes with 1000 once the peer is
//! connected, or with a descriptive code and reason otherwise:
//!
//! | code | meaning |
//! |---|---|
//! | 1000 | connected |
//! | 1001 | server shutting down |
//! | 1003 | binary frame (only text is spoken) |
//! | 1007 | malformed message or offer, or no Opus in the offer |
//! | 1008 | protocol misuse (candidate before offer, second offer), or the user already has `--max-peers-per-user` clients |
//! | 1009 | message too big |
//! | 1011 | the peer failed (ICE/DTLS), or the media loop did not answer |
//! | 1013 | server at its peer limit or overloaded; retry later |
//! | 4408 | not connected within the connect timeout |

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use super::claims;
use super::request::Request;
use super::response::Response;
use super::Context;
use crate::command::{Command, PeerNotice, SendError};
use crate::sfu::{Claim, CloseReason, ConnectError, PeerId, MAX_OFFER_BYTES};
use crate::signalling::{format_answer, parse_client_message, ClientMessage};

/// How often a waiting session looks at its peer's notices.
const TICK: Duration = Duration::from_millis(50);
/// How long to wait for the media loop to answer an offer.
const LOOP_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the client's close reply.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Close code for "not connected in time" (an application code mirroring HTTP 408).
pub const CLOSE_CONNECT_TIMEOUT: u16 = 4408;

/// Serves the request. Returns a response only when refusing before the
/// upgrade; after the upgrade the session speaks WebSocket itself.
pub fn serve(stream: &mut TcpStream, req: Request, ctx: &Context) -> Option<Response> {
    let claim = match claims::from_request(&req, ctx.dev) {
        Ok(c) => c,
        Err(e) => return Some(Response::text(400, e)),
    };
    if !req.header_has_token("upgrade", "websocket")
        || !req.header_has_token("connection", "upgrade")
    {
        return Some(
            Response::text(400, "GET /connect must be a WebSocket upgrade")
                .header("Upgrade", "websocket"),
        );
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Some(
            Response::text(426, "WebSocket version 13 required")
                .header("Sec-WebSocket-Version", "13"),
        );
    }
    let Some(key) = req
        .header("sec-websocket-key")
        .map(|k| k.trim().to_string())
    else {
        return Some(Response::text(400, "missing Sec-WebSocket-Key"));
    };
    let accept = derive_accept_key(key.as_bytes());
    let mut upgrade = Response::with_type(101, "text/plain", Vec::new());
    upgrade.headers = vec![
        ("Upgrade", "websocket".into()),
        ("Connection", "Upgrade".into()),
        ("Sec-WebSocket-Accept", accept),
    ];
    if write_upgrade(stream, &upgrade).is_err() {
        return None;
    }
    let Ok(sock) = stream.try_clone() else {
        return None;
    };
    let _ = sock.set_read_timeout(Some(TICK));
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_OFFER_BYTES + 1024))
        .max_frame_size(Some(MAX_OFFER_BYTES + 1024));
    let ws = WebSocket::from_partially_read(sock, req.leftover, Role::Server, Some(config));
    let mut session = Session {
        ws,
        reader_broken: false,
        ctx,
        claim,
        deadline: Instant::now() + ctx.connect_timeout,
    };
    let (code, reason) = session.run();
    session.close(code, &reason);
    None
}

/// Writes the 101 without the Content-Type/Length headers a normal response has.
fn write_upgrade(stream: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    use std::io::Write;
    let mut head = String::from("HTTP/1.1 101 Switching Protocols\r\n");
    for (n, v) in &r.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.flush()
}

struct Session<'a> {
    ws: WebSocket<TcpStream>,
    /// The frame reader hit an error it cannot resume from (oversized or
    /// invalid frame): do not read again, only send the close frame.
    reader_broken: bool,
    ctx: &'a Context,
    claim: Claim,
    deadline: Instant,
}

/// What one read produced.
enum Read {
    Text(String),
    Nothing,
    Closed,
    Fatal(u16, String),
}

impl Session<'_> {
    /// Runs the session; returns the close code and reason to end it with.
    fn run(&mut self) -> (u16, String) {
        let (sdp, style) = loop {
            if Instant::now() >= self.deadline {
                return (
                    CLOSE_CONNECT_TIMEOUT,
                    "no offer within the connect timeout".into(),
                );
            }
            match self.read() {
                Read::Text(t) => match parse_client_message(&t) {
                    Ok(ClientMessage::Offer { sdp, style }) => break (sdp, style),
                    Ok(ClientMessage::Candidate(_)) => {
                        return (1008, "the offer must come before candidates".into())
                    }
                    Err(e) => return (1007, e),
                },
                Read::Nothing => continue,
                Read::Closed => return (1000, String::new()),
                Read::Fatal(code, why) => return (code, why),
            }
        };
        let (peer, answer, notices) = match self.connect(sdp) {
            Ok(v) => v,
            Err((code, why)) => return (code, why),
        };
        if self
            .ws
            .send(Message::text(format_answer(style, &answer)))
            .is_err()
        {
            return (1000, String::new());
        }
        loop {
            match notices.try_recv() {
                Ok(PeerNotice::Connected) => {
                    self.ctx.metrics.outcome("ws_connected");
                    return (1000, "connected".into());
                }
                Ok(PeerNotice::Closed(reason)) => {
                    return match reason {
                        CloseReason::ConnectTimeout => (CLOSE_CONNECT_TIMEOUT, reason.to_string()),
                        CloseReason::Shutdown => (1001, reason.to_string()),
                        other => (1011, format!("peer {other}")),
                    };
                }
                Err(_) => {}
            }
            if Instant::now() >= self.deadline + Duration::from_secs(1) {
                // The core removes the peer at the deadline too; this is the backstop.
                return (
                    CLOSE_CONNECT_TIMEOUT,
                    "not connected within the connect timeout".into(),
                );
            }
            match self.read() {
                Read::Text(t) => match parse_client_message(&t) {
                    Ok(ClientMessage::Candidate(candidate)) => {
                        if self
                            .ctx
                            .handle
                            .send(Command::Candidate { peer, candidate })
                            .is_err()
                        {
                            return (1013, "server busy".into());
                        }
                    }
                    Ok(ClientMessage::Offer { .. }) => {
                        return (1008, "renegotiation is not supported".into())
                    }
                    Err(e) => return (1007, e),
                },
                Read::Nothing => {}
                Read::Closed => {
                    // The client hung up before connecting; the peer will
                    // connect anyway or time out in the core.
                    debug!("peer {peer}: client closed the WebSocket before connecting");
                    return (1000, String::new());
                }
                Read::Fatal(code, why) => return (code, why),
            }
        }
    }

    /// Hands the offer to the media loop and waits for the answer.
    fn connect(
        &mut self,
        sdp: String,
    ) -> Result<(PeerId, String, Receiver<PeerNotice>), (u16, String)> {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let (notice_tx, notice_rx) = crossbeam_channel::bounded(4);
        let cmd = Command::Connect {
            claim: self.claim.clone(),
            offer: sdp,
            reply: reply_tx,
            notices: notice_tx,
        };
        match self.ctx.handle.send(cmd) {
            Ok(()) => {}
            Err(SendError::Full) => return Err((1013, "server busy; retry shortly".into())),
            Err(SendError::Stopped) => return Err((1001, "server shutting down".into())),
        }
        match reply_rx.recv_timeout(LOOP_REPLY_TIMEOUT) {
            Ok(Ok((peer, answer))) => {
                debug!(
                    "peer {peer} ({}/{}) offered; answer sent",
                    self.claim.userid, self.claim.clientid
                );
                Ok((peer, answer, notice_rx))
            }
            Ok(Err(e)) => {
                self.ctx.metrics.outcome(match e {
                    ConnectError::ServerFull => "ws_server_full",
                    ConnectError::UserLimit => "ws_user_limit",
                    ConnectError::ShuttingDown => "ws_shutting_down",
                    ConnectError::MalformedOffer(_) => "ws_malformed_offer",
                    ConnectError::NoOpus => "ws_no_opus",
                });
                info!(
                    "offer from {}/{} refused: {e}",
                    self.claim.userid, self.claim.clientid
                );
                Err(match e {
                    ConnectError::ServerFull => (1013, e.to_string()),
                    ConnectError::UserLimit => (1008, e.to_string()),
                    ConnectError::ShuttingDown => (1001, e.to_string()),
                    ConnectError::MalformedOffer(_) | ConnectError::NoOpus => (1007, e.to_string()),
                })
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                Err((1011, "media loop did not answer in time".into()))
            }
        }
    }

    /// Reads one frame, waiting at most one tick.
    fn read(&mut self) -> Read {
        match self.ws.read() {
            Ok(Message::Text(t)) => Read::Text(t.as_str().to_string()),
            Ok(Message::Binary(_)) => {
                Read::Fatal(1003, "binary frames are not supported; send text".into())
            }
            Ok(Message::Close(_)) => Read::Closed,
            Ok(_) => Read::Nothing, // ping/pong (answered by tungstenite), raw frames
            Err(WsError::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                Read::Nothing
            }
            Err(WsError::Capacity(e)) => {
                self.reader_broken = true;
                Read::Fatal(1009, format!("message too big: {e}"))
            }
            Err(WsError::Utf8(_)) => {
                self.reader_broken = true;
                Read::Fatal(1007, "text frame is not valid UTF-8".into())
            }
            Err(WsError::Protocol(e)) => {
                self.reader_broken = true;
                Read::Fatal(1002, format!("protocol error: {e}"))
            }
            Err(_) => Read::Closed,
        }
    }

    /// Sends the close frame and waits briefly for the client's reply.
    fn close(&mut self, code: u16, reason: &str) {
        let mut reason = reason.to_string();
        // A close reason must fit in a control frame (123 bytes).
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if self.ws.close(Some(frame)).is_err() || self.reader_broken {
            let _ = self.ws.flush();
            return;
        }
        let until = Instant::now() + CLOSE_LINGER;
        while Instant::now() < until {
            match self.ws.read() {
                Ok(_) => {}
                Err(WsError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    let _ = self.ws.flush();
                }
                Err(_) => break,
            }
        }
    }
}
