//! In-memory wiring of real str0m clients ([`OpusClient`]) to the [`Sfu`] core, with
//! simulated time and no sockets: the harness the core tests and the
//! benchmarks drive (the shape of quinn-proto's paired test endpoints).
//!
//! Every client is a full WebRTC peer (ICE, DTLS, SRTP) in RTP mode, so what
//! a test sees is exactly what a subscriber would decrypt off the wire.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::media::{Mid, Pt};
use str0m::rtp::Ssrc;

use super::client::{ClientOutput, OpusClient};
use crate::sfu::{
    Claim, ConnectError, PeerId, Reply, Request, Sfu, SfuConfig, SfuEvent, UnixClock,
};

/// One RTP packet a client decrypted.
#[derive(Debug, Clone)]
pub struct Received {
    /// The m-line it arrived on.
    pub mid: Mid,
    /// Its SSRC.
    pub ssrc: Ssrc,
    /// Extended sequence number.
    pub seq: u64,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Marker bit.
    pub marker: bool,
    /// Payload type.
    pub pt: u8,
    /// Contributing sources.
    pub csrc: Vec<u32>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// A simulated client: an [`OpusClient`] and what it received.
pub struct Client {
    /// The client's WebRTC state.
    pub rtc: OpusClient,
    /// Its (simulated) address.
    pub addr: SocketAddr,
    /// Its peer id at the server.
    pub peer: PeerId,
    /// Who it claims to be.
    pub claim: Claim,
    /// Everything it received, in order.
    pub received: Vec<Received>,
    /// True once the client's `Rtc` reported Connected.
    pub connected: bool,
}

/// Which way a datagram goes, for a test that loses some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// From client `i` to the core.
    Up(usize),
    /// From the core to client `i`.
    Down(usize),
}

/// Decides whether a datagram in flight is lost.
pub type Loss = Box<dyn FnMut(Leg, &[u8]) -> bool>;

/// True if a datagram is SRTP media (RTP version 2, not an RTCP packet
/// type): what a lossy-network test drops, leaving ICE, DTLS and RTCP be.
pub fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && d[0] >> 6 == 2 && !(192..=223).contains(&d[1])
}

/// The core plus its clients, stepped together in simulated time.
pub struct Harness {
    /// The core under test.
    pub sfu: Sfu,
    /// The clients, by index.
    pub clients: Vec<Client>,
    /// Simulated now.
    pub now: Instant,
    /// Events the core emitted.
    pub events: Vec<SfuEvent>,
    /// Datagrams this returns true for are lost in flight (none if unset).
    pub loss: Option<Loss>,
    server_addr: SocketAddr,
}

impl Harness {
    /// A harness with a core listening at 10.0.0.1:5000 (simulated).
    pub fn new() -> Self {
        let server_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 5000);
        Self::with_config(SfuConfig::new(server_addr))
    }

    /// A harness with a given core configuration.
    pub fn with_config(config: SfuConfig) -> Self {
        let server_addr = config.candidates[0];
        let now = Instant::now();
        Harness {
            sfu: Sfu::new(config, UnixClock::new(now, 0)),
            clients: Vec::new(),
            now,
            events: Vec::new(),
            loss: None,
            server_addr,
        }
    }

    /// Builds a client whose offer has one send-receive audio m-line (when
    /// `send` is true) plus `extra_recv` receive-only audio m-lines, connects
    /// it to the core and returns its index. Does not step time.
    pub fn add_client(
        &mut self,
        userid: &str,
        clientid: &str,
        send: bool,
        extra_recv: usize,
    ) -> usize {
        self.add_client_with(userid, clientid, send, extra_recv, false)
    }

    /// As [`Harness::add_client`], offering RED (`red/48000/2`) if `red`.
    pub fn add_client_with(
        &mut self,
        userid: &str,
        clientid: &str,
        send: bool,
        extra_recv: usize,
        red: bool,
    ) -> usize {
        let n = self.clients.len() as u32;
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, (n / 250) as u8, (n % 250 + 2) as u8)),
            40000 + (n % 20000) as u16,
        );
        let mut rtc = if red {
            OpusClient::new_red(addr, self.now)
        } else {
            OpusClient::new(addr, self.now)
        }
        .expect("valid simulated address");
        let offer = rtc.offer(send, extra_recv).expect("offer with media");
        let claim = Claim {
            userid: userid.into(),
            clientid: clientid.into(),
        };
        let (peer, answer) = self
            .connect(claim.clone(), &offer)
            .unwrap_or_else(|e| panic!("core refused {e:?}: {offer}"));
        rtc.accept_answer(&answer).expect("answer accepted");
        self.clients.push(Client {
            rtc,
            addr,
            peer,
            claim,
            received: Vec::new(),
            connected: false,
        });
        self.clients.len() - 1
    }

    /// Asks the core for a peer, as signalling would.
    pub fn connect(&mut self, claim: Claim, offer: &str) -> Result<(PeerId, String), ConnectError> {
        let request = Request::Connect {
            claim,
            offer: offer.to_string(),
        };
        match self.sfu.handle_request(self.now, request) {
            Reply::Connect(r) => r,
            other => panic!("connect answered with {other:?}"),
        }
    }

    /// Advances simulated time by `dt`, delivering every datagram in flight
    /// (instantly) and firing every timeout that falls due.
    pub fn step(&mut self, dt: Duration) {
        self.now += dt;
        let now = self.now;
        for i in 0..self.clients.len() {
            self.clients[i].rtc.handle_timeout(now);
            self.drain_client(i);
        }
        self.sfu.handle_timeout(now);
        self.pump();
    }

    /// The earliest moment the core or any client must be handed the time
    /// (quinn's `Pair`: time jumps there instead of ticking).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| c.rtc.next_timeout())
            .chain(self.sfu.poll_timeout())
            .min()
    }

    /// Advances simulated time to the next deadline of the core or a
    /// client (never backwards), fires it and delivers what follows.
    /// Returns false when nothing is scheduled at all.
    pub fn step_to_next_deadline(&mut self) -> bool {
        let Some(at) = self.next_deadline() else {
            return false;
        };
        self.step(at.saturating_duration_since(self.now));
        true
    }

    /// Jumps from deadline to deadline until `done` holds; panics, naming
    /// `what`, if it does not within `within` of simulated time (a harness
    /// that gave up silently would let a test pass on a half-built state).
    pub fn drive_until(&mut self, within: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let limit = self.now + within;
        while !done(self) {
            assert!(
                self.now < limit,
                "{what}: not reached within {within:?} of simulated time"
            );
            if !self.step_to_next_deadline() {
                panic!("{what}: nothing left to happen and not reached");
            }
        }
    }

    /// Delivers datagrams back and forth until nothing is in flight.
    /// Panics if that never happens (a datagram loop is a bug to see).
    pub fn pump(&mut self) {
        const ROUNDS: usize = 1000;
        for _ in 0..ROUNDS {
            let mut moved = false;
            while let Some(t) = self.sfu.poll_transmit() {
                moved = true;
                self.deliver(t.source, t.destination, &t.contents);
            }
            while let Some(e) = self.sfu.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("datagrams still in flight after {ROUNDS} rounds");
    }

    /// Hands one datagram the core sent to the client it is addressed to
    /// (a benchmark that times the core alone delivers the core's ICE
    /// checks this way afterwards, so its clients stay connected).
    pub fn deliver(&mut self, source: SocketAddr, destination: SocketAddr, contents: &[u8]) {
        if let Some(i) = self.clients.iter().position(|c| c.addr == destination) {
            if self.lost(Leg::Down(i), contents) {
                return;
            }
            self.clients[i]
                .rtc
                .handle_datagram(self.now, source, contents);
            self.drain_client(i);
        }
    }

    fn drain_client(&mut self, i: usize) {
        let now = self.now;
        while let Some(out) = self.clients[i].rtc.poll_output() {
            match out {
                ClientOutput::Transmit(t) => {
                    if self.lost(Leg::Up(i), &t.contents) {
                        continue;
                    }
                    let source = self.clients[i].addr;
                    self.sfu.handle_datagram(now, source, &t.contents);
                }
                ClientOutput::Connected => self.clients[i].connected = true,
                ClientOutput::Rtp(mid, p) => self.clients[i].received.push(Received {
                    mid,
                    ssrc: p.header.ssrc,
                    seq: *p.seq_no,
                    timestamp: p.header.timestamp,
                    marker: p.header.marker,
                    pt: *p.header.payload_type,
                    csrc: p.header.csrc[..p.header.csrc_count.min(15)].to_vec(),
                    payload: p.payload.to_vec(),
                }),
            }
        }
    }

    /// Drives time from deadline to deadline until every client and its
    /// peer are connected; panics if that takes over 10 simulated seconds.
    pub fn connect_all(&mut self) {
        self.drive_until(Duration::from_secs(10), "clients connecting", |h| {
            h.clients
                .iter()
                .all(|c| c.connected && h.sfu._is_connected(c.peer))
        });
    }

    /// Joins client `i`'s user to a conversation.
    pub fn join(&mut self, i: usize, conversation: &str) {
        let request = Request::Join {
            userid: self.clients[i].claim.userid.clone(),
            conversation: conversation.to_string(),
        };
        let reply = self.sfu.handle_request(self.now, request);
        assert_eq!(reply, Reply::Join(Ok(())), "join accepted");
        self.pump();
    }

    /// Client `i` sends one 20 ms Opus packet with `payload` and an RFC 6464
    /// level (`-127..=0`, 0 loudest), delivered to the core at once. Returns
    /// false if it has no send m-line.
    pub fn send(&mut self, i: usize, payload: &[u8], level: i8) -> bool {
        if self.clients[i].rtc.send_mid().is_none() {
            return false;
        }
        let source = self.clients[i].addr;
        for d in self.produce(i, payload, level) {
            if !self.lost(Leg::Up(i), &d) {
                self.sfu.handle_datagram(self.now, source, &d);
            }
        }
        true
    }

    /// Client `i` sends one packet of payload type `pt` (a RED payload it
    /// wrapped, or anything a test forges), delivered to the core at once.
    pub fn send_as(&mut self, i: usize, pt: Pt, payload: &[u8], level: i8) -> bool {
        let now = self.now;
        if !self.clients[i].rtc.send_as(pt, payload, level, now) {
            return false;
        }
        let source = self.clients[i].addr;
        while let Some(o) = self.clients[i].rtc.poll_output() {
            if let ClientOutput::Transmit(t) = o {
                if !self.lost(Leg::Up(i), &t.contents) {
                    self.sfu.handle_datagram(now, source, &t.contents);
                }
            }
        }
        self.pump();
        true
    }

    /// Whether the test's loss function drops this datagram.
    fn lost(&mut self, leg: Leg, d: &[u8]) -> bool {
        self.loss.as_mut().is_some_and(|f| f(leg, d))
    }

    /// Client `i` encrypts one packet and returns the datagram(s) it would
    /// send, without delivering them (benchmarks feed them to the core).
    pub fn produce(&mut self, i: usize, payload: &[u8], level: i8) -> Vec<Vec<u8>> {
        let now = self.now;
        let c = &mut self.clients[i].rtc;
        if !c.send(payload, level, now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        while let Some(o) = c.poll_output() {
            if let ClientOutput::Transmit(t) = o {
                out.push(t.contents.to_vec());
            }
        }
        out
    }

    /// The server's simulated address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
