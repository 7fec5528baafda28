//! Simulated WebRTC participants and what every participant measures.
//! [`WebRtcParticipant`] is a full str0m client of beep-sfu (WebSocket
//! offer/answer, `POST /join`, ICE/DTLS/SRTP over UDP); the relay
//! baseline's plain-UDP one is in `udp_participant.rs`. Both send
//! Opus-sized packets carrying their sender id, sequence and send time, and
//! record what they receive ([`Tally`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use beep_sfu::testkit::{ClientOutput, OpusClient};
use mio::net::UdpSocket;

use crate::voice::{self, Voice};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// Payload size of every packet (a typical Opus voice frame).
pub const PAYLOAD: usize = 80;

/// What a participant measured.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Packets sent whose send time is inside the window.
    pub sent_in_window: u64,
    /// Packets received whose send time is inside the window.
    pub received_in_window: u64,
    /// One-way latencies (µs) of packets sent inside the window.
    pub latencies_us: Vec<u32>,
    /// The subset of those whose sender is on another node of a cluster.
    pub cross_latencies_us: Vec<u32>,
}

/// Which node of a cluster participant `i` is on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    /// Nodes (1 or 0: a single server).
    pub nodes: usize,
    /// Members per room.
    pub room_size: usize,
    /// Whole rooms per node, instead of alternating members.
    pub by_room: bool,
}

impl Placement {
    /// The node of participant `i`.
    pub fn node_of(&self, i: u32) -> usize {
        let (i, n) = (i as usize, self.nodes.max(1));
        if self.by_room {
            (i / self.room_size.max(1)) % n
        } else {
            i % n
        }
    }
}

/// The measurement window, as offsets from the run's epoch.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Start (ns since epoch).
    pub from_ns: u64,
    /// End (ns since epoch).
    pub to_ns: u64,
}

impl Window {
    pub fn contains(&self, ns: u64) -> bool {
        ns >= self.from_ns && ns < self.to_ns
    }
}

/// Builds a payload: TOC, `B`, sender, sequence, send time.
pub fn payload(sender: u32, seq: u32, sent_ns: u64) -> [u8; PAYLOAD] {
    let mut p = [0x55u8; PAYLOAD];
    p[0] = 0xF8;
    p[1] = b'B';
    p[2..6].copy_from_slice(&sender.to_be_bytes());
    p[6..10].copy_from_slice(&seq.to_be_bytes());
    p[10..18].copy_from_slice(&sent_ns.to_be_bytes());
    p
}

/// Reads sender and send time back from a payload.
pub fn parse(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < 18 || p[1] != b'B' {
        return None;
    }
    let sender = u32::from_be_bytes(p[2..6].try_into().ok()?);
    let sent = u64::from_be_bytes(p[10..18].try_into().ok()?);
    Some((sender, sent))
}

pub fn record(
    tally: &mut Tally,
    window: Option<Window>,
    epoch: Instant,
    now: Instant,
    sent_ns: u64,
    cross: bool,
) {
    if let Some(w) = window {
        if w.contains(sent_ns) {
            tally.received_in_window += 1;
            let now_ns = now.duration_since(epoch).as_nanos() as u64;
            let us = (now_ns.saturating_sub(sent_ns) / 1000) as u32;
            tally.latencies_us.push(us);
            if cross {
                tally.cross_latencies_us.push(us);
            }
        }
    }
}

/// A str0m client of beep-sfu.
pub struct WebRtcParticipant {
    /// Index, also the sender id in payloads.
    pub id: u32,
    /// How it reaches the server.
    pub link: Link,
    rtc: OpusClient,
    /// Packets sent (numbers the payloads).
    sent: u32,
    /// When signalling started.
    pub started: Instant,
    /// When ICE+DTLS came up.
    pub connected_at: Option<Instant>,
    /// What it measured.
    pub tally: Tally,
    buf: Vec<u8>,
    /// Where everyone is, for telling cross-node packets apart.
    pub placement: Placement,
    /// When it last sent a DTX frame.
    last_dtx: Option<Instant>,
}

/// How a participant reaches the server: its own UDP socket, or one ICE-TCP
/// connection (RFC 4571 frames) to the server's passive candidate.
pub enum Link {
    /// Plain UDP.
    Udp(UdpSocket),
    /// ICE over TCP.
    Tcp {
        /// The connection.
        stream: mio::net::TcpStream,
        /// The server's TCP candidate.
        server: SocketAddr,
        /// Bytes read, not yet a whole frame.
        rbuf: Vec<u8>,
        /// Frames not yet written.
        wbuf: Vec<u8>,
    },
}

impl Link {
    /// Registers the socket or the connection for readability.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> std::io::Result<()> {
        match self {
            Link::Udp(s) => registry.register(s, token, mio::Interest::READABLE),
            Link::Tcp { stream, .. } => registry.register(stream, token, mio::Interest::READABLE),
        }
    }

    /// Gives the socket or connection a new token.
    pub fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> std::io::Result<()> {
        match self {
            Link::Udp(s) => registry.reregister(s, token, mio::Interest::READABLE),
            Link::Tcp { stream, .. } => registry.reregister(stream, token, mio::Interest::READABLE),
        }
    }
}

/// The server's passive ICE-TCP candidate in an answer, if any.
fn tcp_candidate(answer: &str) -> Option<SocketAddr> {
    answer.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let is_tcp =
            f.first()?.starts_with("a=candidate:") && f.get(2)?.eq_ignore_ascii_case("tcp");
        let passive = f.windows(2).any(|w| w[0] == "tcptype" && w[1] == "passive");
        if !(is_tcp && passive) {
            return None;
        }
        let ip: std::net::IpAddr = f.get(4)?.parse().ok()?;
        Some(SocketAddr::new(ip, f.get(5)?.parse().ok()?))
    })
}

impl WebRtcParticipant {
    /// Creates the client, does the WebSocket offer/answer with the server;
    /// with `tcp`, it offers only an ICE-TCP candidate and connects to the
    /// server's passive one.
    pub fn signal(
        id: u32,
        http: SocketAddr,
        userid: &str,
        slots: usize,
        bind_ip: std::net::IpAddr,
        tcp: bool,
    ) -> Result<Self, String> {
        let started = Instant::now();
        let std_sock = std::net::UdpSocket::bind((bind_ip, 0)).map_err(|e| format!("bind: {e}"))?;
        std_sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = std_sock.local_addr().map_err(|e| e.to_string())?;
        let socket = UdpSocket::from_std(std_sock);
        let mut rtc = if tcp {
            OpusClient::new_tcp(SocketAddr::new(bind_ip, 9), Instant::now())?
        } else {
            OpusClient::new(addr, Instant::now())?
        };
        let offer = rtc.offer(true, slots.max(1) - 1)?;
        let claim = serde_json::json!({"userid": userid, "clientid": format!("c{id}")}).to_string();
        let mut req = format!("ws://{http}/connect")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut()
            .insert("X-User-Claim", claim.parse().map_err(|_| "claim header")?);
        let signalling = TcpStream::connect_timeout(&http, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        signalling
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        // Refusals keep a fixed prefix ("http 503", "close 1013") so the
        // storm can tell what to retry.
        let (mut ws, _) = tungstenite::client(req, signalling).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
                format!("http {}", r.status().as_u16())
            }
            e => format!("websocket: {e}"),
        })?;
        ws.send(Message::text(offer)).map_err(|e| e.to_string())?;
        let answer = match ws.read().map_err(|e| format!("answer: {e}"))? {
            Message::Text(t) => t.as_str().to_string(),
            Message::Close(Some(f)) => {
                return Err(format!("close {}: {}", u16::from(f.code), f.reason))
            }
            other => return Err(format!("expected an answer, got {other:?}")),
        };
        rtc.accept_answer(&answer)?;
        // The server closes the socket once connected; we need nothing more from it.
        drop(ws);
        let link = if tcp {
            let server = tcp_candidate(&answer).ok_or("the answer has no passive TCP candidate")?;
            let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
                .map_err(|e| format!("ICE-TCP connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Link::Tcp {
                stream: mio::net::TcpStream::from_std(s),
                server,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
            }
        } else {
            Link::Udp(socket)
        };
        Ok(WebRtcParticipant {
            id,
            link,
            rtc,
            sent: 0,
            started,
            connected_at: None,
            tally: Tally::default(),
            buf: vec![0; 2048],
            placement: Placement::default(),
            last_dtx: None,
        })
    }

    /// `POST /join/{conversation}` for this participant's user.
    pub fn join(http: SocketAddr, userid: &str, id: u32, conversation: &str) -> Result<(), String> {
        let claim = serde_json::json!({"userid": userid, "clientid": format!("c{id}")}).to_string();
        let mut s =
            TcpStream::connect_timeout(&http, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "POST /join/{conversation} HTTP/1.1\r\nHost: x\r\nX-User-Claim: {claim}\r\nContent-Length: 0\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        if resp.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            let status = resp.split_whitespace().nth(1).unwrap_or("none");
            Err(format!(
                "join http {status}: {}",
                resp.lines().next().unwrap_or("no answer")
            ))
        }
    }

    /// Says goodbye the way a closing browser tab does (DTLS close_notify),
    /// so the server frees the peer at once.
    pub fn close(&mut self, epoch: Instant) {
        let _ = self.rtc.rtc_mut().close();
        self.drain(epoch, None, Instant::now());
    }

    /// Reads everything waiting on the socket or connection.
    pub fn on_readable(&mut self, epoch: Instant, window: Option<Window>) {
        loop {
            let now = Instant::now();
            match &mut self.link {
                Link::Udp(socket) => match socket.recv_from(&mut self.buf) {
                    Ok((n, source)) => self.rtc.handle_datagram(now, source, &self.buf[..n]),
                    Err(_) => return,
                },
                Link::Tcp {
                    stream,
                    server,
                    rbuf,
                    ..
                } => {
                    match stream.read(&mut self.buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => rbuf.extend_from_slice(&self.buf[..n]),
                    }
                    let mut at = 0;
                    while rbuf.len() - at >= 2 {
                        let len = usize::from(u16::from_be_bytes([rbuf[at], rbuf[at + 1]]));
                        if rbuf.len() - at - 2 < len {
                            break;
                        }
                        self.rtc.handle_receive(
                            now,
                            str0m::net::Protocol::Tcp,
                            *server,
                            &rbuf[at + 2..at + 2 + len],
                        );
                        at += 2 + len;
                    }
                    rbuf.drain(..at);
                }
            }
            self.drain(epoch, window, now);
        }
    }

    /// Advances time; sends one packet of speech, or a DTX frame when one
    /// is due, as `voice` says.
    pub fn on_tick(&mut self, epoch: Instant, window: Option<Window>, voice: Voice) {
        let now = Instant::now();
        if voice == Voice::Dtx
            && self.connected_at.is_some()
            && voice::dtx_due(&mut self.last_dtx, now)
        {
            self.rtc.send(&voice::DTX_FRAME, -127, now);
        }
        if voice == Voice::Talk && self.connected_at.is_some() {
            let sent_ns = now.duration_since(epoch).as_nanos() as u64;
            let data = payload(self.id, self.sent, sent_ns);
            if self.rtc.send(&data, -25, now) {
                if window.is_some_and(|w| w.contains(sent_ns)) {
                    self.tally.sent_in_window += 1;
                }
                self.sent += 1;
            }
        }
        self.rtc.handle_timeout(now);
        self.drain(epoch, window, now);
    }

    fn drain(&mut self, epoch: Instant, window: Option<Window>, now: Instant) {
        while let Some(out) = self.rtc.poll_output() {
            match out {
                ClientOutput::Transmit(t) => match &mut self.link {
                    Link::Udp(socket) => {
                        let _ = socket.send_to(&t.contents, t.destination);
                    }
                    Link::Tcp { wbuf, .. } => {
                        wbuf.extend_from_slice(&(t.contents.len() as u16).to_be_bytes());
                        wbuf.extend_from_slice(&t.contents);
                    }
                },
                ClientOutput::Connected => self.connected_at = Some(now),
                ClientOutput::Rtp(_, p) => {
                    if let Some((sender, sent)) = parse(&p.payload) {
                        let pl = self.placement;
                        let cross = pl.node_of(sender) != pl.node_of(self.id);
                        record(&mut self.tally, window, epoch, now, sent, cross);
                    }
                }
            }
        }
        // Over TCP: write what the connection takes now; the rest waits for
        // the next turn.
        if let Link::Tcp { stream, wbuf, .. } = &mut self.link {
            let mut written = 0;
            while written < wbuf.len() {
                match stream.write(&wbuf[written..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => written += n,
                }
            }
            wbuf.drain(..written);
        }
    }
}
