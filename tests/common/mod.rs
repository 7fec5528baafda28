//! Shared pieces of the loopback integration tests: the server started
//! in-process on free ports, str0m clients that speak the real WebSocket
//! protocol and real UDP, a real HTTP server standing in for the permissions
//! service, and raw HTTP helpers.

#![allow(dead_code)]

pub mod cluster;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use str0m::rtp::Ssrc;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

use beep_sfu::config::{Config, NatsAuth};
use beep_sfu::server::Server;
use beep_sfu::testkit::{ClientOutput, OpusClient};

/// A config on loopback with ephemeral ports.
pub fn test_config(dev: bool, permissions_host: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp: "127.0.0.1:0".parse().unwrap(),
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        public_ips: vec!["127.0.0.1".parse().unwrap()],
        nats: None,
        bite_subject: "bite".into(),
        store_subject: "store".into(),
        nats_backlog_bytes: 64 << 20,
        bite_silence: Duration::from_millis(600),
        bite_max: Duration::from_secs(10),
        voiced_loudness: 67.0,
        red_distance: 2,
        opus_dtx: true,
        permissions_host: permissions_host.into(),
        dev,
        max_peers: 100,
        max_peers_per_user: 16,
        max_signalling: 64,
        max_tcp_connections: 1024,
        max_tcp_per_ip: 16,
        connect_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        membership_grace: Duration::from_secs(60),
        permissions_timeout: Duration::from_secs(2),
        bites_dir: None,
        admin_listen: None,
        max_signalling_per_ip: 0,
        allowed_origins: Vec::new(),
        spool_dir: None,
        loop_stall: Duration::from_secs(10),
        nats_jetstream: false,
        nats_ping: Duration::from_secs(2),
        node_id: "test-node".into(),
        cluster_subject: None,
        cluster_keys: Vec::new(),
        nats_auth: NatsAuth::default(),
    }
}

/// Starts logging once (RUST_LOG=debug to see the server).
pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// How the test client writes its offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferStyle {
    Raw,
    Prefixed,
    Json,
}

/// One RTP packet a client received.
#[derive(Debug, Clone)]
pub struct Got {
    pub ssrc: Ssrc,
    pub csrc: Vec<u32>,
    pub seq: u64,
    pub timestamp: u32,
    pub pt: u8,
    pub payload: Vec<u8>,
}

/// A str0m client on a real UDP socket.
pub struct TestPeer {
    pub name: String,
    pub claim: String,
    pub rtc: OpusClient,
    pub socket: UdpSocket,
    pub addr: SocketAddr,
    pub ws: Option<WebSocket<TcpStream>>,
    pub ws_close: Option<(u16, String)>,
    pub connected: bool,
    pub received: Vec<Got>,
    /// Loses this percentage of the SRTP media it receives, at random
    /// (seeded), and notes each lost sequence number: a lossy downlink.
    pub loss: Option<RandomLoss>,
    buf: Vec<u8>,
    /// Over TCP: the connection to the server's passive candidate (opened
    /// on the first transmit) and what was read of it.
    tcp: Option<TcpLink>,
}

/// Random loss of incoming SRTP media (seeded), and what it took.
pub struct RandomLoss {
    percent: u64,
    next: Box<dyn FnMut() -> u64>,
    pub lost: Vec<u16>,
}

impl RandomLoss {
    /// Loses `percent` % of media, the same packets for the same `seed`.
    pub fn new(percent: u64, seed: u64) -> Self {
        RandomLoss {
            percent,
            next: Box::new(beep_sfu::testkit::xorshift(seed)),
            lost: Vec::new(),
        }
    }

    /// Whether to lose this datagram (media only; ICE, DTLS and RTCP pass).
    fn lose(&mut self, d: &[u8]) -> bool {
        if !beep_sfu::testkit::is_rtp(d) {
            return false;
        }
        let lose = (self.next)() % 100 < self.percent;
        if lose {
            self.lost.push(u16::from_be_bytes([d[2], d[3]]));
        }
        lose
    }
}

/// An ICE-TCP client's connection: RFC 4571 frames both ways.
pub struct TcpLink {
    pub stream: Option<TcpStream>,
    pub server: Option<SocketAddr>,
    rbuf: Vec<u8>,
    /// Stop reading (a client that stalls its reads).
    pub stalled: bool,
}

/// The claim header value for a user and client.
pub fn claim(userid: &str, clientid: &str) -> String {
    serde_json::json!({"userid": userid, "clientid": clientid}).to_string()
}

impl TestPeer {
    /// A client with one send-receive audio m-line.
    pub fn new(userid: &str, clientid: &str) -> Self {
        Self::new_on("127.0.0.1", userid, clientid)
    }

    /// A client whose socket (and only candidate) is on `ip`.
    pub fn new_on(ip: &str, userid: &str, clientid: &str) -> Self {
        Self::with_red(ip, userid, clientid, false)
    }

    /// A client on `ip` that offers RED (`red/48000/2`) if `red`.
    pub fn with_red(ip: &str, userid: &str, clientid: &str, red: bool) -> Self {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let rtc = if red {
            OpusClient::new_red(addr, Instant::now())
        } else {
            OpusClient::new(addr, Instant::now())
        }
        .unwrap();
        TestPeer {
            name: format!("{userid}/{clientid}"),
            claim: claim(userid, clientid),
            rtc,
            socket,
            addr,
            ws: None,
            ws_close: None,
            connected: false,
            received: Vec::new(),
            loss: None,
            buf: vec![0; 2000],
            tcp: None,
        }
    }

    /// A client that reaches the server over TCP only.
    pub fn new_tcp(userid: &str, clientid: &str) -> Self {
        let mut p = Self::new(userid, clientid);
        // The active candidate's port is a placeholder (RFC 6544 uses 9).
        p.addr = "127.0.0.1:9".parse().unwrap();
        p.rtc = OpusClient::new_tcp(p.addr, Instant::now()).unwrap();
        p.tcp = Some(TcpLink {
            stream: None,
            server: None,
            rbuf: Vec::new(),
            stalled: false,
        });
        p
    }

    /// The TCP link, for a client made with [`TestPeer::new_tcp`].
    pub fn tcp_mut(&mut self) -> Option<&mut TcpLink> {
        self.tcp.as_mut()
    }

    /// Opens /connect, sends the offer in `style`, reads the answer.
    /// A clone of this client's ICE-TCP connection, if it has one.
    pub fn tcp_stream(&self) -> Option<TcpStream> {
        self.tcp.as_ref()?.stream.as_ref()?.try_clone().ok()
    }

    pub fn signal(&mut self, http: SocketAddr, style: OfferStyle) -> Result<(), String> {
        let sdp = self.rtc.offer(true, 0)?;
        let text = match style {
            OfferStyle::Raw => sdp,
            OfferStyle::Prefixed => format!("offer::{sdp}"),
            OfferStyle::Json => serde_json::json!({"type": "offer", "sdp": sdp}).to_string(),
        };
        let mut ws = ws_connect(http, &self.claim).map_err(|e| format!("ws connect: {e}"))?;
        ws.send(Message::text(text)).map_err(|e| e.to_string())?;
        let answer = match ws.read().map_err(|e| format!("reading answer: {e}"))? {
            Message::Text(t) => t.as_str().to_string(),
            Message::Close(f) => return Err(format!("closed instead of answer: {f:?}")),
            other => return Err(format!("unexpected {other:?}")),
        };
        let sdp = match style {
            OfferStyle::Raw => {
                assert!(answer.starts_with("v=0"), "raw answer for raw offer");
                answer
            }
            OfferStyle::Prefixed => answer
                .strip_prefix("answer::")
                .expect("answer:: prefix")
                .to_string(),
            OfferStyle::Json => {
                let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON answer");
                assert_eq!(v["type"], "answer");
                v["sdp"].as_str().expect("sdp").to_string()
            }
        };
        self.rtc.accept_answer(&sdp)?;
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        self.ws = Some(ws);
        Ok(())
    }

    /// Handles everything pending: socket, timers, WebSocket.
    pub fn pump(&mut self) {
        self.pump_tcp();
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) => {
                    if let Some(l) = &mut self.loss {
                        if l.lose(&self.buf[..n]) {
                            continue;
                        }
                    }
                    self.rtc
                        .handle_datagram(Instant::now(), source, &self.buf[..n]);
                    self.drain();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        self.rtc.handle_timeout(Instant::now());
        self.drain();
        if let Some(ws) = &mut self.ws {
            match ws.read() {
                Ok(Message::Close(f)) => {
                    self.ws_close = Some(
                        f.map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    if self.ws_close.is_none() {
                        self.ws_close = Some((1006, "abnormal".into()));
                    }
                    self.ws = None;
                }
            }
        }
    }

    /// Reads whole frames off the TCP link into the client.
    fn pump_tcp(&mut self) {
        let Some(link) = &mut self.tcp else { return };
        let (Some(stream), Some(server)) = (&mut link.stream, link.server) else {
            return;
        };
        if link.stalled {
            return;
        }
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => link.rbuf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let mut at = 0;
        let mut frames = Vec::new();
        while link.rbuf.len() - at >= 2 {
            let len = usize::from(u16::from_be_bytes([link.rbuf[at], link.rbuf[at + 1]]));
            if link.rbuf.len() - at - 2 < len {
                break;
            }
            frames.push(link.rbuf[at + 2..at + 2 + len].to_vec());
            at += 2 + len;
        }
        link.rbuf.drain(..at);
        for f in frames {
            self.rtc
                .handle_receive(Instant::now(), str0m::net::Protocol::Tcp, server, &f);
            self.drain();
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.rtc.poll_output() {
            match out {
                ClientOutput::Transmit(t) if t.proto == str0m::net::Protocol::Tcp => {
                    let Some(link) = &mut self.tcp else { continue };
                    if link.stream.is_none() {
                        let sock = socket2::Socket::new(
                            socket2::Domain::for_address(t.destination),
                            socket2::Type::STREAM,
                            None,
                        )
                        .unwrap();
                        // A small window, so a client that stops reading
                        // pushes back on the server quickly.
                        sock.set_recv_buffer_size(4096).unwrap();
                        let connected = sock
                            .connect(&t.destination.into())
                            .map(|_| TcpStream::from(sock));
                        if let Ok(s) = connected {
                            s.set_nonblocking(true).unwrap();
                            s.set_nodelay(true).unwrap();
                            link.stream = Some(s);
                            link.server = Some(t.destination);
                        }
                    }
                    if let Some(s) = &mut link.stream {
                        let mut frame = (t.contents.len() as u16).to_be_bytes().to_vec();
                        frame.extend_from_slice(&t.contents);
                        // Blocking briefly is fine for a test client.
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(&frame);
                        let _ = s.set_nonblocking(true);
                    }
                }
                ClientOutput::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                ClientOutput::Connected => self.connected = true,
                ClientOutput::Rtp(_, p) => self.received.push(Got {
                    ssrc: p.header.ssrc,
                    csrc: p.header.csrc[..p.header.csrc_count.min(15)].to_vec(),
                    seq: *p.seq_no,
                    timestamp: p.header.timestamp,
                    pt: *p.header.payload_type,
                    payload: p.payload.to_vec(),
                }),
            }
        }
    }

    /// Sends one 20 ms packet.
    pub fn send(&mut self, payload: &[u8], level: i8) {
        self.rtc.send(payload, level, Instant::now());
        self.drain();
    }
}

/// Pumps every peer until `done` holds or `timeout` passes; returns whether it held.
pub fn pump_until(
    peers: &mut [&mut TestPeer],
    timeout: Duration,
    mut done: impl FnMut(&[&mut TestPeer]) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        for p in peers.iter_mut() {
            p.pump();
        }
        if done(peers) {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Pumps every peer for `d`.
pub fn pump_for(peers: &mut [&mut TestPeer], d: Duration) {
    pump_until(peers, d, |_| false);
}

/// Connects peers: signalling (in the given styles), then ICE/DTLS until
/// both sides report connected and the server closed each WebSocket.
pub fn connect_all(http: SocketAddr, peers: &mut [&mut TestPeer], styles: &[OfferStyle]) {
    for (i, p) in peers.iter_mut().enumerate() {
        p.signal(http, styles[i % styles.len()])
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    let ok = pump_until(peers, Duration::from_secs(20), |ps| {
        ps.iter().all(|p| p.connected && p.ws_close.is_some())
    });
    for p in peers.iter() {
        assert!(p.connected, "{} did not connect", p.name);
        assert_eq!(
            p.ws_close.as_ref().map(|c| c.0),
            Some(1000),
            "{}: server closes the WebSocket with 1000 once connected",
            p.name
        );
    }
    assert!(ok);
}

/// Opens a WebSocket to /connect with a claim header (empty = none).
pub fn ws_connect(
    http: SocketAddr,
    claim: &str,
) -> Result<WebSocket<TcpStream>, tungstenite::Error> {
    let mut req = format!("ws://{http}/connect").into_client_request()?;
    if !claim.is_empty() {
        req.headers_mut()
            .insert("X-User-Claim", claim.parse().unwrap());
    }
    let stream = TcpStream::connect(http)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (ws, _) = tungstenite::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
    })?;
    Ok(ws)
}

/// Reads frames until the server's close frame; returns its code and reason.
pub fn expect_close(ws: &mut WebSocket<TcpStream>) -> (u16, String) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (u16::from(CloseCode::Status), String::new()),
            Ok(_) => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
    panic!("no close frame within 10 s");
}

/// Sends raw bytes as an HTTP request; returns (status, body). Status 0 means
/// the server closed without answering.
pub fn http_raw(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `POST /join/{conversation}` with a claim header.
pub fn join(addr: SocketAddr, claim: &str, conversation: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("POST /join/{conversation} HTTP/1.1\r\nHost: x\r\nX-User-Claim: {claim}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

/// Alice and Bob connected (raw SDP offers) and joined to "room".
pub fn two_in_room(http: SocketAddr) -> (TestPeer, TestPeer) {
    let mut a = TestPeer::new("alice", "a");
    let mut b = TestPeer::new("bob", "b");
    connect_all(http, &mut [&mut a, &mut b], &[OfferStyle::Raw]);
    assert_eq!(join(http, &a.claim, "room").0, 200);
    assert_eq!(join(http, &b.claim, "room").0, 200);
    (a, b)
}

/// The sum of a metric family's samples whose labels contain `label`
/// (for example `reason="idle"`), from the /metrics text.
pub fn metric_sum(addr: SocketAddr, family: &str, label: &str) -> f64 {
    let (_, body) = get(addr, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A value from the /metrics text (first sample line starting with `prefix`).
pub fn metric(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, body) = get(addr, "/metrics");
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A real HTTP server standing in for Beep's permissions service. Users named
/// `ok*` are allowed (200), `no*` get 401, `hang*` get no answer for 10 s,
/// anyone else 403.
pub struct FakePermissions {
    pub addr: SocketAddr,
    pub paths: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl FakePermissions {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p2, s2) = (paths.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let p3 = p2.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    p3.lock().unwrap().push(path.clone());
                    let user = path
                        .strip_prefix("/user/")
                        .and_then(|r| r.split('/').next())
                        .unwrap_or("");
                    let status = if user.starts_with("ok") {
                        "200 OK"
                    } else if user.starts_with("no") {
                        "401 Unauthorized"
                    } else if user.starts_with("hang") {
                        thread::sleep(Duration::from_secs(10));
                        "200 OK"
                    } else {
                        "403 Forbidden"
                    };
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        FakePermissions { addr, paths, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakePermissions {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Starts a server; returns it.
pub fn start(dev: bool, permissions: &str) -> Server {
    init_log();
    Server::start(&test_config(dev, permissions)).expect("server starts")
}

#[allow(unused_imports)] // not every test binary uses it
pub use beep_sfu::testkit::load::payload;

/// What each peer heard, by sender byte, as packet numbers.
pub fn heard(p: &TestPeer) -> HashMap<u8, Vec<u32>> {
    let mut m: HashMap<u8, Vec<u32>> = HashMap::new();
    for g in &p.received {
        if g.payload.len() >= 5 {
            m.entry(g.payload[0]).or_default().push(u32::from_be_bytes([
                g.payload[1],
                g.payload[2],
                g.payload[3],
                g.payload[4],
            ]));
        }
    }
    m
}

/// A real `nats-server` (Debian package) on a free loopback port, with
/// JetStream storing under a temporary directory so a restart keeps streams.
pub struct NatsServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    config: Option<std::path::PathBuf>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts with extra server configuration (nats-server's config syntax).
    pub fn start_with_config(extra: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "beep-sfu-nats-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = extra.map(|text| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut s = NatsServer {
            port: 0,
            child: None,
            dir,
            config,
        };
        s.spawn(None);
        s
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let mut cmd = std::process::Command::new("nats-server");
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        let child = cmd
            .args(["-a", "127.0.0.1", "-p", &port_arg, "--ports_file_dir"])
            .arg(&ports_dir)
            .args(["-js", "-sd"])
            .arg(self.dir.join("js"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server must be installed for these tests (apt-get install nats-server)");
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(
                Instant::now() < end,
                "nats-server did not write its ports file"
            );
            let file = std::fs::read_dir(&ports_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok());
            if let Some(f) = file {
                if let Ok(text) = std::fs::read_to_string(f.path()) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        let url = v["nats"][0].as_str().unwrap_or("").to_string();
                        if let Some(p) = url.rsplit(':').next().and_then(|p| p.parse().ok()) {
                            self.port = p;
                            break;
                        }
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < end, "nats-server is not accepting");
            thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): its sockets stay open and silent, as
    /// a hung server or a network black hole looks to a client.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = std::process::Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} nats-server");
        }
    }

    /// Kills the server the hard way (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(Some(port));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// Starts the server binary with `args` (stderr read for its "ready" line,
/// then logged through at `RUST_LOG=info`); returns it and its HTTP address.
pub fn spawn_binary(args: &[&str]) -> (std::process::Child, SocketAddr) {
    let (child, addr, _) = spawn_binary_with(args, &[]);
    (child, addr)
}

/// [`spawn_binary`] with environment variables; also returns every stderr
/// line the server writes, as it writes them.
pub fn spawn_binary_with(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, SocketAddr, Arc<Mutex<Vec<String>>>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_beep-sfu"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let kept = lines.clone();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.split("ready: http://").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
            if let Ok(mut k) = kept.lock() {
                k.push(line);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server ready")
        .parse()
        .unwrap();
    (child, addr, lines)
}

/// Waits until `f` holds, up to `timeout`.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}
