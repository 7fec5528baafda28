//! `GET /connect`: the WebSocket signalling session of one peer, as bytes
//! and time. Claims are checked before the upgrade (400); after it, every
//! frame, loop reply and tick goes through [`Session`], which decides what
//! happens (the close codes are listed in `crate::signalling::close`).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info};
use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use super::claims;
use crate::log_limit::LogLimit;

/// Refused offers are logged at most once a second, with the number left
/// out (a client may retry in a loop).
static REFUSED: LogLimit = LogLimit::new(Duration::from_secs(1));
use super::request::Request;
use super::response::Response;
use super::Context;
use crate::command::{Command, PeerNotice};
use crate::sfu::{self, Claim, Reply, MAX_OFFER_BYTES};
use crate::signalling::close::outcome_label;
use crate::signalling::session::ConnectReply;
use crate::signalling::{Action, CloseCode, ReadFault, Session};

/// How often a waiting session looks at its peer's notices.
const TICK: Duration = Duration::from_millis(50);
/// How long to wait for the media loop to answer an offer.
const LOOP_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to drain the client's input after our close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The socket under the WebSocket, with a deadline on reads: tungstenite's
/// `read` loops over frames until a message is complete, so without it a
/// client sending empty continuation frames would keep the session from
/// ever looking at its clock.
struct Deadline {
    stream: TcpStream,
    until: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.until {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

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
    let sock = Deadline {
        stream: sock,
        until: Instant::now(),
    };
    let ws = WebSocket::from_partially_read(sock, req.leftover, Role::Server, Some(config));
    let mut conn = Connection {
        ws,
        ctx,
        claim,
        session: Session::new(Instant::now(), ctx.connect_timeout),
        notices: None,
    };
    let (code, reason) = conn.run();
    conn.close(code, &reason);
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

/// The I/O side of one session: the socket, the channels, the clock.
struct Connection<'a> {
    ws: WebSocket<Deadline>,
    ctx: &'a Context,
    claim: Claim,
    session: Session,
    notices: Option<Receiver<PeerNotice>>,
}

/// What one read produced.
enum Frame {
    Text(String),
    Nothing,
    Closed,
    Fault(ReadFault),
}

impl Connection<'_> {
    /// Runs the session; returns the close code and reason to end it with.
    fn run(&mut self) -> (CloseCode, String) {
        loop {
            let mut action = self.next_input();
            loop {
                action = match action {
                    Action::None => break,
                    Action::Close(code, why) => return (code, why),
                    Action::Send(text) => {
                        if self.ws.send(Message::text(text)).is_err() {
                            return (CloseCode::Normal, String::new());
                        }
                        Action::None
                    }
                    Action::Connect(offer) => {
                        let reply = self.connect(offer);
                        self.session.on_connect_reply(reply)
                    }
                    Action::Candidate(peer, candidate) => {
                        let cmd = Command::fire(sfu::Request::Candidate { peer, candidate });
                        match self.ctx.handle.send(cmd) {
                            Ok(()) => Action::None,
                            Err(e) => self.session.on_send_failed(e),
                        }
                    }
                };
            }
        }
    }

    /// The next thing that happened: a notice from the loop, the deadline,
    /// or a frame (waiting at most one tick).
    fn next_input(&mut self) -> Action {
        if let Some(n) = self.notices.as_ref().and_then(|n| n.try_recv().ok()) {
            if n == PeerNotice::Connected {
                self.ctx.metrics.outcome("ws_connected");
            }
            return self.session.on_notice(n);
        }
        let tick = self.session.on_tick(Instant::now());
        if tick != Action::None {
            return tick;
        }
        match self.read() {
            Frame::Text(t) => self.session.on_text(&t),
            Frame::Nothing => Action::None,
            Frame::Closed => {
                if let Some(peer) = self.session.peer() {
                    // The peer connects anyway or times out in the core.
                    debug!("peer {peer}: client closed the WebSocket before connecting");
                }
                self.session.on_client_closed()
            }
            Frame::Fault(f) => self.session.on_fault(f),
        }
    }

    /// Hands the offer to the media loop and waits for the answer.
    fn connect(&mut self, offer: String) -> ConnectReply {
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let (notice_tx, notice_rx) = crossbeam_channel::bounded(4);
        let cmd = Command {
            request: sfu::Request::Connect {
                claim: self.claim.clone(),
                offer,
            },
            reply: Some(reply_tx),
            notices: Some(notice_tx),
        };
        if let Err(e) = self.ctx.handle.send(cmd) {
            return ConnectReply::NotSent(e);
        }
        match reply_rx.recv_timeout(LOOP_REPLY_TIMEOUT) {
            Ok(Reply::Connect(Ok((peer, answer)))) => {
                debug!(
                    "peer {peer} ({}/{}) offered; answer sent",
                    self.claim.userid, self.claim.clientid
                );
                self.notices = Some(notice_rx);
                ConnectReply::Answer(Ok((peer, answer)))
            }
            Ok(Reply::Connect(Err(e))) => {
                self.ctx.metrics.outcome(outcome_label(&e));
                REFUSED.log(Instant::now(), |more| {
                    info!(
                        "offer from {}/{} refused: {e} ({more} more refused since the last line)",
                        self.claim.userid, self.claim.clientid
                    )
                });
                ConnectReply::Answer(Err(e))
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                ConnectReply::TimedOut
            }
        }
    }

    /// Reads one frame, waiting at most about one tick.
    fn read(&mut self) -> Frame {
        self.ws.get_mut().until = Instant::now() + TICK;
        match self.ws.read() {
            Ok(Message::Text(t)) => Frame::Text(t.as_str().to_string()),
            Ok(Message::Binary(_)) => Frame::Fault(ReadFault::Binary),
            Ok(Message::Close(_)) => Frame::Closed,
            Ok(_) => Frame::Nothing, // ping/pong (answered by tungstenite), raw frames
            Err(WsError::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                Frame::Nothing
            }
            Err(WsError::Capacity(e)) => Frame::Fault(ReadFault::TooBig(e.to_string())),
            Err(WsError::Utf8(_)) => Frame::Fault(ReadFault::BadUtf8),
            Err(WsError::Protocol(e)) => Frame::Fault(ReadFault::Protocol(e.to_string())),
            Err(_) => Frame::Closed,
        }
    }

    /// Sends the close frame, then stops writing and drains what the client
    /// still sends for a bounded time, so the close frame is delivered
    /// instead of being lost to a reset (closing a socket with unread input
    /// resets the connection).
    fn close(&mut self, code: CloseCode, reason: &str) {
        let mut reason = reason.to_string();
        // A close reason must fit in a control frame (123 bytes).
        while reason.len() > 123 {
            reason.pop();
        }
        let frame = CloseFrame {
            code: WsCloseCode::from(code.code()),
            reason: reason.into(),
        };
        let _ = self.ws.close(Some(frame));
        let _ = self.ws.flush();
        let stream = &mut self.ws.get_mut().stream;
        let _ = stream.shutdown(Shutdown::Write);
        let until = Instant::now() + CLOSE_LINGER;
        let mut sink = [0u8; 4096];
        while Instant::now() < until {
            match stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    }
}
