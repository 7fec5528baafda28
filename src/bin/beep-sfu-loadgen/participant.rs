//! Simulated participants. [`WebRtcParticipant`] is a full str0m client of
//! beep-sfu (WebSocket offer/answer, `POST /join`, ICE/DTLS/SRTP over UDP);
//! [`UdpParticipant`] speaks plain UDP to the bare relay baseline. Both send
//! Opus-sized packets carrying their sender id, sequence and send time, and
//! record what they receive.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use beep_sfu::testkit::{ClientOutput, OpusClient};
use mio::net::UdpSocket;
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
    fn contains(&self, ns: u64) -> bool {
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

fn record(tally: &mut Tally, window: Option<Window>, epoch: Instant, now: Instant, sent_ns: u64) {
    if let Some(w) = window {
        if w.contains(sent_ns) {
            tally.received_in_window += 1;
            let now_ns = now.duration_since(epoch).as_nanos() as u64;
            tally
                .latencies_us
                .push((now_ns.saturating_sub(sent_ns) / 1000) as u32);
        }
    }
}

/// A str0m client of beep-sfu.
pub struct WebRtcParticipant {
    /// Index, also the sender id in payloads.
    pub id: u32,
    /// Its UDP socket.
    pub socket: UdpSocket,
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
}

impl WebRtcParticipant {
    /// Creates the client, does the WebSocket offer/answer with the server.
    pub fn signal(
        id: u32,
        http: SocketAddr,
        userid: &str,
        slots: usize,
        bind_ip: std::net::IpAddr,
    ) -> Result<Self, String> {
        let started = Instant::now();
        let std_sock = std::net::UdpSocket::bind((bind_ip, 0)).map_err(|e| format!("bind: {e}"))?;
        std_sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = std_sock.local_addr().map_err(|e| e.to_string())?;
        let socket = UdpSocket::from_std(std_sock);
        let mut rtc = OpusClient::new(addr, Instant::now())?;
        let offer = rtc.offer(true, slots.max(1) - 1)?;
        let claim = serde_json::json!({"userid": userid, "clientid": format!("c{id}")}).to_string();
        let mut req = format!("ws://{http}/connect")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut()
            .insert("X-User-Claim", claim.parse().map_err(|_| "claim header")?);
        let tcp = TcpStream::connect_timeout(&http, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (mut ws, _) = tungstenite::client(req, tcp).map_err(|e| format!("websocket: {e}"))?;
        ws.send(Message::text(offer)).map_err(|e| e.to_string())?;
        let answer = match ws.read().map_err(|e| format!("answer: {e}"))? {
            Message::Text(t) => t.as_str().to_string(),
            other => return Err(format!("expected an answer, got {other:?}")),
        };
        rtc.accept_answer(&answer)?;
        // The server closes the socket once connected; we need nothing more from it.
        drop(ws);
        Ok(WebRtcParticipant {
            id,
            socket,
            rtc,
            sent: 0,
            started,
            connected_at: None,
            tally: Tally::default(),
            buf: vec![0; 2048],
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
            Err(format!(
                "join: {}",
                resp.lines().next().unwrap_or("no answer")
            ))
        }
    }

    /// Reads everything waiting on the socket.
    pub fn on_readable(&mut self, epoch: Instant, window: Option<Window>) {
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    self.rtc.handle_datagram(now, source, &self.buf[..n]);
                    self.drain(epoch, window, now);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => return,
            }
        }
    }

    /// Advances time; sends one packet if `talk`.
    pub fn on_tick(&mut self, epoch: Instant, window: Option<Window>, talk: bool) {
        let now = Instant::now();
        if talk && self.connected_at.is_some() {
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
                ClientOutput::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                ClientOutput::Connected => self.connected_at = Some(now),
                ClientOutput::Rtp(_, p) => {
                    if let Some((_, sent)) = parse(&p.payload) {
                        record(&mut self.tally, window, epoch, now, sent);
                    }
                }
            }
        }
    }
}

/// A plain-UDP participant of the bare relay baseline.
pub struct UdpParticipant {
    /// Index, also the sender id.
    pub id: u32,
    /// Group (room) id.
    pub room: u32,
    /// Its socket.
    pub socket: UdpSocket,
    relay: SocketAddr,
    seq: u32,
    /// What it measured.
    pub tally: Tally,
    buf: Vec<u8>,
}

impl UdpParticipant {
    /// Binds a socket and registers with the relay.
    pub fn new(
        id: u32,
        room: u32,
        relay: SocketAddr,
        bind_ip: std::net::IpAddr,
    ) -> std::io::Result<Self> {
        let s = std::net::UdpSocket::bind((bind_ip, 0))?;
        s.set_nonblocking(true)?;
        let p = UdpParticipant {
            id,
            room,
            socket: UdpSocket::from_std(s),
            relay,
            seq: 0,
            tally: Tally::default(),
            buf: vec![0; 2048],
        };
        // A registration datagram (seq u32::MAX is not forwarded by the relay).
        p.socket.send_to(&p.datagram(u32::MAX, 0), relay)?;
        Ok(p)
    }

    fn datagram(&self, seq: u32, sent_ns: u64) -> Vec<u8> {
        let mut d = Vec::with_capacity(8 + 12 + PAYLOAD);
        d.extend_from_slice(&self.room.to_be_bytes());
        d.extend_from_slice(&seq.to_be_bytes());
        // Pad like an RTP header with the audio level extension would.
        d.extend_from_slice(&[0u8; 12]);
        d.extend_from_slice(&payload(self.id, seq, sent_ns));
        d
    }

    /// Reads everything waiting on the socket.
    pub fn on_readable(&mut self, epoch: Instant, window: Option<Window>) {
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, _)) => {
                    let now = Instant::now();
                    if n >= 20 {
                        if let Some((_, sent)) = parse(&self.buf[20..n]) {
                            record(&mut self.tally, window, epoch, now, sent);
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Sends one packet if `talk`.
    pub fn on_tick(&mut self, epoch: Instant, window: Option<Window>, talk: bool) {
        if !talk {
            return;
        }
        let sent_ns = Instant::now().duration_since(epoch).as_nanos() as u64;
        if window.is_some_and(|w| w.contains(sent_ns)) {
            self.tally.sent_in_window += 1;
        }
        let d = self.datagram(self.seq, sent_ns);
        self.seq = self.seq.wrapping_add(1) % (u32::MAX - 1);
        let _ = self.socket.send_to(&d, self.relay);
    }
}
