//! In-memory wiring of real str0m client `Rtc`s to the [`Sfu`] core, with
//! simulated time and no sockets: the harness the core tests and the
//! benchmarks drive (the shape of quinn-proto's paired test endpoints).
//!
//! Every client is a full WebRTC peer (ICE, DTLS, SRTP) in RTP mode, so what
//! a test sees is exactly what a subscriber would decrypt off the wire.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo, Ssrc};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use crate::sfu::{Claim, PeerId, Sfu, SfuConfig, SfuEvent};

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
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// A simulated client: a str0m `Rtc` and what it received.
pub struct Client {
    /// The client's WebRTC state.
    pub rtc: Rtc,
    /// Its (simulated) address.
    pub addr: SocketAddr,
    /// Its peer id at the server.
    pub peer: PeerId,
    /// Who it claims to be.
    pub claim: Claim,
    /// The m-line it sends on, if any.
    pub send_mid: Option<Mid>,
    /// Everything it received, in order.
    pub received: Vec<Received>,
    /// True once the client's `Rtc` reported Connected.
    pub connected: bool,
    pt: Option<Pt>,
    seq: u64,
    timestamp: u32,
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
        let server_addr = config.candidate_addr;
        Harness {
            sfu: Sfu::new(config),
            clients: Vec::new(),
            now: Instant::now(),
            events: Vec::new(),
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
        let n = self.clients.len() as u32;
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, (n / 250) as u8, (n % 250 + 2) as u8)),
            40000 + (n % 20000) as u16,
        );
        let mut rtc = client_rtc(addr, self.now).expect("valid simulated address");
        let mut api = rtc.sdp_api();
        let send_mid = if send {
            Some(api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None))
        } else {
            None
        };
        for _ in 0..extra_recv {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        let (offer, pending) = api.apply().expect("offer with media");
        let claim = Claim {
            userid: userid.into(),
            clientid: clientid.into(),
        };
        let (peer, answer) = self
            .sfu
            .connect(self.now, claim.clone(), &offer.to_sdp_string())
            .unwrap_or_else(|e| panic!("core refused {e:?}: {}", offer.to_sdp_string()));
        let answer = SdpAnswer::from_sdp_string(&answer).expect("answer parses");
        rtc.sdp_api()
            .accept_answer(pending, answer)
            .expect("answer accepted");
        self.clients.push(Client {
            rtc,
            addr,
            peer,
            claim,
            send_mid,
            received: Vec::new(),
            connected: false,
            pt: None,
            seq: 0,
            timestamp: 0,
        });
        self.clients.len() - 1
    }

    /// Advances simulated time by `dt`, delivering every datagram in flight
    /// (instantly) and firing every timeout that falls due.
    pub fn step(&mut self, dt: Duration) {
        self.now += dt;
        let now = self.now;
        for i in 0..self.clients.len() {
            let _ = self.clients[i].rtc.handle_input(Input::Timeout(now));
            self.drain_client(i);
        }
        self.sfu.handle_timeout(now);
        self.pump();
    }

    /// Delivers datagrams back and forth until nothing is in flight.
    pub fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(t) = self.sfu.poll_transmit() {
                moved = true;
                if let Some(i) = self.clients.iter().position(|c| c.addr == t.destination) {
                    let Ok(r) = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents)
                    else {
                        continue;
                    };
                    let _ = self.clients[i]
                        .rtc
                        .handle_input(Input::Receive(self.now, r));
                    self.drain_client(i);
                }
            }
            while let Some(e) = self.sfu.poll_event() {
                self.events.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    fn drain_client(&mut self, i: usize) {
        let now = self.now;
        loop {
            let out = match self.clients[i].rtc.poll_output() {
                Ok(o) => o,
                Err(_) => break,
            };
            match out {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    let source = self.clients[i].addr;
                    self.sfu.handle_datagram(now, source, &t.contents);
                }
                Output::Event(Event::Connected) => self.clients[i].connected = true,
                Output::Event(Event::RtpPacket(p)) => {
                    let mid = self.clients[i]
                        .rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .map(|s| s.mid())
                        .unwrap_or_else(|| Mid::from("?"));
                    self.clients[i].received.push(Received {
                        mid,
                        ssrc: p.header.ssrc,
                        seq: *p.seq_no,
                        timestamp: p.header.timestamp,
                        marker: p.header.marker,
                        payload: p.payload.to_vec(),
                    });
                }
                Output::Event(_) => {}
            }
        }
    }

    /// Steps in 5 ms increments until every client and its peer are connected.
    pub fn connect_all(&mut self) {
        for _ in 0..2000 {
            if self
                .clients
                .iter()
                .all(|c| c.connected && self.sfu.is_connected(c.peer))
            {
                return;
            }
            self.step(Duration::from_millis(5));
        }
        panic!("clients did not connect within 10 simulated seconds");
    }

    /// Joins client `i`'s user to a conversation.
    pub fn join(&mut self, i: usize, conversation: &str) {
        let userid = self.clients[i].claim.userid.clone();
        self.sfu
            .join(self.now, &userid, conversation)
            .expect("join accepted");
        self.pump();
    }

    /// Client `i` sends one 20 ms Opus packet with `payload` and an RFC 6464
    /// level (`-127..=0`, 0 loudest), delivered to the core at once. Returns
    /// false if it has no send m-line.
    pub fn send(&mut self, i: usize, payload: &[u8], level: i8) -> bool {
        if self.clients[i].send_mid.is_none() {
            return false;
        }
        let source = self.clients[i].addr;
        for d in self.produce(i, payload, level) {
            self.sfu.handle_datagram(self.now, source, &d);
        }
        true
    }

    /// Client `i` encrypts one packet and returns the datagram(s) it would
    /// send, without delivering them (benchmarks feed them to the core).
    pub fn produce(&mut self, i: usize, payload: &[u8], level: i8) -> Vec<Vec<u8>> {
        let now = self.now;
        let c = &mut self.clients[i];
        let Some(mid) = c.send_mid else {
            return Vec::new();
        };
        if c.pt.is_none() {
            c.pt = opus_pt(&c.rtc);
        }
        let Some(pt) = c.pt else { return Vec::new() };
        let ext = ExtensionValues {
            audio_level: Some(level),
            voice_activity: Some(level > -127),
            ..Default::default()
        };
        let (seq, ts) = (c.seq, c.timestamp);
        c.seq += 1;
        c.timestamp = c.timestamp.wrapping_add(960);
        if let Some(tx) = c.rtc.direct_api().stream_tx_by_mid(mid, None) {
            tx.write_rtp(
                RtpWrite::new(pt, SeqNo::from(seq), ts, now, payload.to_vec()).ext_vals(ext),
            );
        }
        let _ = c.rtc.handle_input(Input::Timeout(now));
        let mut out = Vec::new();
        while let Ok(o) = c.rtc.poll_output() {
            match o {
                Output::Timeout(_) => break,
                Output::Transmit(t) => out.push(t.contents.to_vec()),
                Output::Event(_) => {}
            }
        }
        out
    }

    /// The server's simulated address.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }
}

/// A WebRTC client as the tests, benchmarks and load generator use it: Opus
/// only, RTP mode, one host candidate at `addr`.
pub fn client_rtc(addr: SocketAddr, now: Instant) -> Result<Rtc, String> {
    let mut rtc = RtcConfig::new()
        .clear_codecs()
        .enable_opus(true, false)
        .set_rtp_mode(true)
        .set_stats_interval(None)
        .build(now);
    rtc.add_local_candidate(Candidate::host(addr, "udp").map_err(|e| e.to_string())?);
    Ok(rtc)
}

/// The payload type the client's Opus was negotiated with.
pub fn opus_pt(rtc: &Rtc) -> Option<Pt> {
    rtc.codec_config()
        .params()
        .iter()
        .find(|p| p.spec().codec == Codec::Opus)
        .map(|p| p.pt())
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
