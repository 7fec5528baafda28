//! ICE over TCP (RFC 6544, passive side) for clients whose networks block
//! UDP: a listener and its connections on the media loop's own `mio::Poll`,
//! each framed per RFC 4571 (a 2-byte big-endian length before every
//! packet). Frames go to the core as `Protocol::Tcp` datagrams from the
//! connection's remote address; the core's TCP transmits come back here by
//! that address.
//!
//! ICE-TCP needs no login, so every connection is bounded and none can
//! starve the others or the UDP socket:
//! - reading is fair: connections with data wait in one round-robin queue,
//!   each gets a quantum ([`QUANTUM`] bytes or [`QUANTUM_FRAMES`] frames)
//!   before the next, and the media loop stops reading TCP for the turn
//!   after its own budget across all connections; frames go to the core
//!   as each quantum is read, never collected without bound;
//! - its read buffer holds at most a quantum and one frame, and shrinks
//!   after a peak; its write buffer holds at most
//!   [`TcpLimits::write_buffer`] bytes (a client that does not read is
//!   dropped, never allowed to grow memory);
//! - connections are capped in all and per remote IP;
//! - a connection is closed at its first frame no peer takes unless a
//!   peer took one before (a client's first frame is a STUN check), at an
//!   empty frame, when none of its frames was taken within
//!   [`TcpLimits::stun_deadline`], when it carried no valid frame for
//!   [`TcpLimits::idle`], and when its peer is gone;
//! - running out of file descriptors at accept is counted and backs off
//!   instead of spinning.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

mod write;

use crate::log_limit::LogLimit;
use crate::metrics::Metrics;

/// Largest RFC 4571 frame (the length is 16 bits).
const MAX_FRAME: usize = 65_535;
/// Bytes read off one connection before the next connection with data gets
/// its turn.
const QUANTUM: usize = 8 * 1024;
/// Frames taken off one connection before the next gets its turn (a client
/// sends about 50 a second).
const QUANTUM_FRAMES: usize = 32;
/// Connections accepted per turn of the loop.
const ACCEPT_BUDGET: usize = 64;
/// How long accepting pauses after the process ran out of descriptors.
const FD_BACKOFF: Duration = Duration::from_millis(250);
/// A read buffer keeps at most this much spare capacity after a peak.
const SPARE: usize = 4 * 1024;

static FD_EXHAUSTED: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Bounds on ICE-TCP connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpLimits {
    /// Most connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Most bytes waiting to be written to one connection, in our buffer
    /// and (the same again) in the kernel's send buffer.
    pub write_buffer: usize,
    /// Time a connection has for a peer to take one of its frames (a STUN
    /// check with a valid ufrag and password).
    pub stun_deadline: Duration,
    /// Most connections from one remote IP.
    pub max_per_ip: usize,
    /// A connection that carried no frame a peer took for this long is
    /// closed, even after it once did.
    pub idle: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: 1_024,
            write_buffer: 64 * 1024,
            stun_deadline: Duration::from_secs(10),
            max_per_ip: 16,
            idle: Duration::from_secs(30),
        }
    }
}

struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    opened: Instant,
    /// A peer took one of its frames.
    known: bool,
    /// When a peer last took one of its frames.
    last_valid: Instant,
    /// WRITABLE interest is registered (the write buffer is not empty).
    want_write: bool,
    /// The connection waits in the read queue.
    queued: bool,
}

/// The listener and its connections.
pub(crate) struct TcpMedia {
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    by_remote: HashMap<SocketAddr, Token>,
    per_ip: HashMap<IpAddr, usize>,
    next_token: usize,
    limits: TcpLimits,
    /// Connections with data to read, in turn. The poll is edge-triggered:
    /// a connection whose quantum ran out goes to the back, and nobody
    /// would wake us for it.
    ready: VecDeque<Token>,
    /// Connections may be waiting at the listener.
    accept_pending: bool,
    /// Accepting is paused until then (the process ran out of descriptors).
    accept_paused_until: Option<Instant>,
}

impl TcpMedia {
    /// Takes a bound listener, registered under `listener_token`; connection
    /// tokens start at `first_conn_token`.
    pub fn new(
        listener: std::net::TcpListener,
        registry: &Registry,
        listener_token: Token,
        first_conn_token: usize,
        limits: TcpLimits,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        registry.register(&mut listener, listener_token, Interest::READABLE)?;
        Ok(TcpMedia {
            listener,
            conns: HashMap::new(),
            by_remote: HashMap::new(),
            per_ip: HashMap::new(),
            next_token: first_conn_token,
            limits,
            ready: VecDeque::new(),
            accept_pending: false,
            accept_paused_until: None,
        })
    }

    /// True if connections wait to be read or accepted now (the loop then
    /// polls without sleeping). A paused accept does not count: the loop
    /// wakes at least every half second and tries again then.
    pub fn has_more(&self) -> bool {
        !self.ready.is_empty() || (self.accept_pending && self.accept_paused_until.is_none())
    }

    /// The listener is readable: connections wait.
    pub fn listener_ready(&mut self) {
        self.accept_pending = true;
    }

    /// A connection's poll event: writes what waits, queues it for reading.
    pub fn on_event(
        &mut self,
        token: Token,
        readable: bool,
        writable: bool,
        registry: &Registry,
        metrics: &Metrics,
    ) {
        if writable {
            self.flush(token, registry, metrics);
        }
        if readable {
            self.queue(token);
        }
    }

    fn queue(&mut self, token: Token) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.queued {
                c.queued = true;
                self.ready.push_back(token);
            }
        }
    }

    /// The next connection whose turn it is to be read.
    pub fn next_ready(&mut self) -> Option<Token> {
        while let Some(t) = self.ready.pop_front() {
            if let Some(c) = self.conns.get_mut(&t) {
                c.queued = false;
                return Some(t);
            }
        }
        None
    }

    /// Accepts waiting connections, up to a budget, closing those over a
    /// cap; backs off when the process is out of file descriptors.
    pub fn accept(&mut self, registry: &Registry, now: Instant, metrics: &Metrics) {
        if !self.accept_pending || self.accept_paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.accept_paused_until = None;
        for _ in 0..ACCEPT_BUDGET {
            let (mut stream, remote) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    metrics.tcp_dropped("fd_exhausted");
                    self.accept_paused_until = Some(now + FD_BACKOFF);
                    FD_EXHAUSTED.log(now, |more| {
                        warn!("ICE-TCP accept: out of file descriptors ({e}); pausing accepts for {FD_BACKOFF:?} ({more} more since the last warning). See the README's fd budget")
                    });
                    return;
                }
                Err(e) => {
                    debug!("ICE-TCP accept failed: {e}");
                    metrics.tcp_dropped("accept_error");
                    return;
                }
            };
            if self.conns.len() >= self.limits.max_connections {
                metrics.tcp_dropped("connection_limit");
                continue; // dropped: closed
            }
            let from_ip = self.per_ip.get(&remote.ip()).copied().unwrap_or(0);
            if from_ip >= self.limits.max_per_ip {
                metrics.tcp_dropped("per_ip_limit");
                continue;
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            let _ = stream.set_nodelay(true);
            // The kernel's buffer is bounded too (no autotuning to megabytes
            // for a client that does not read).
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(self.limits.write_buffer);
            if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                debug!("ICE-TCP register failed: {e}");
                continue;
            }
            self.by_remote.insert(remote, token);
            *self.per_ip.entry(remote.ip()).or_default() += 1;
            self.conns.insert(
                token,
                Conn {
                    stream,
                    remote,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    opened: now,
                    known: false,
                    last_valid: now,
                    want_write: false,
                    queued: false,
                },
            );
            // Data may have arrived before the registration.
            self.queue(token);
            metrics.tcp_connections.set(self.conns.len() as i64);
        }
        // The budget ran out: more may wait.
    }

    /// True if `token` is one of our connections.
    pub fn owns(&self, token: Token) -> bool {
        self.conns.contains_key(&token)
    }

    /// Reads one quantum off a connection: appends its complete frames,
    /// with the connection's remote address, to `frames`, and puts the
    /// connection at the back of the queue if it may hold more. Closes it on
    /// EOF, error or an empty frame. Returns what the quantum cost: bytes
    /// read or framed (whichever is more) and frames taken.
    pub fn read(
        &mut self,
        token: Token,
        registry: &Registry,
        frames: &mut Vec<(SocketAddr, Vec<u8>)>,
        metrics: &Metrics,
    ) -> (usize, usize) {
        let Some(c) = self.conns.get_mut(&token) else {
            return (0, 0);
        };
        let mut framed = 0;
        let mut chunk = [0u8; QUANTUM];
        let (mut read, mut taken, mut at) = (0, 0, 0);
        let mut closed = false;
        let more = loop {
            // Complete frames first, then more bytes.
            while taken < QUANTUM_FRAMES && c.rbuf.len() - at >= 2 {
                let len = usize::from(u16::from_be_bytes([c.rbuf[at], c.rbuf[at + 1]]));
                if c.rbuf.len() - at - 2 < len {
                    break;
                }
                if len == 0 {
                    // No ICE peer sends an empty frame: the connection is
                    // junk, and reading on would only feed the flood.
                    metrics.tcp_dropped("empty_frame");
                    closed = true;
                    break;
                }
                frames.push((c.remote, c.rbuf[at + 2..at + 2 + len].to_vec()));
                taken += 1;
                at += 2 + len;
                framed += 2 + len;
            }
            if closed {
                break false;
            }
            if taken >= QUANTUM_FRAMES || read >= QUANTUM {
                break true;
            }
            c.rbuf.drain(..at);
            at = 0;
            match c.stream.read(&mut chunk[..QUANTUM - read]) {
                Ok(0) => {
                    closed = true;
                    break false;
                }
                Ok(n) => {
                    read += n;
                    c.rbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break false;
                }
            }
        };
        c.rbuf.drain(..at);
        debug_assert!(c.rbuf.len() <= QUANTUM + 2 + MAX_FRAME);
        if c.rbuf.capacity() > c.rbuf.len() + SPARE {
            c.rbuf.shrink_to(c.rbuf.len() + SPARE / 4);
        }
        metrics.tcp_frames_in.inc_by(taken as u64);
        if closed {
            self.close(token, registry);
            metrics.tcp_connections.set(self.conns.len() as i64);
        } else if more {
            self.queue(token);
        }
        (read.max(framed), taken)
    }

    /// What became of a frame from `remote`: a peer took it (the connection
    /// is known and alive), or none did. A connection that never had a
    /// frame taken is closed at its first frame no peer takes: an ICE-TCP
    /// client's first frame is a STUN check for the ufrag of the answer it
    /// just got, so anything else is junk, and a flood of it costs the loop
    /// one frame per connection (and an accept), not a stream of them.
    pub fn frame_outcome(
        &mut self,
        remote: SocketAddr,
        taken: bool,
        registry: &Registry,
        metrics: &Metrics,
    ) {
        let Some(&token) = self.by_remote.get(&remote) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if taken {
            c.known = true;
            c.last_valid = Instant::now();
        } else if !c.known {
            metrics.tcp_dropped("no_stun");
            self.close(token, registry);
            metrics.tcp_connections.set(self.conns.len() as i64);
        }
    }

    /// Closes the connections from these remotes (their peer is gone).
    pub fn close_remotes(
        &mut self,
        remotes: &[SocketAddr],
        registry: &Registry,
        metrics: &Metrics,
    ) {
        for r in remotes {
            if let Some(&t) = self.by_remote.get(r) {
                metrics.tcp_dropped("peer_gone");
                self.close(t, registry);
            }
        }
        metrics.tcp_connections.set(self.conns.len() as i64);
    }

    /// Closes connections no peer took a frame from within the STUN
    /// deadline, and those that carried no valid frame for the idle time.
    pub fn sweep(&mut self, now: Instant, registry: &Registry, metrics: &Metrics) {
        let (deadline, idle) = (self.limits.stun_deadline, self.limits.idle);
        let stale: Vec<(Token, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(t, c)| {
                if !c.known && now.saturating_duration_since(c.opened) >= deadline {
                    Some((*t, "no_stun"))
                } else if c.known && now.saturating_duration_since(c.last_valid) >= idle {
                    Some((*t, "idle"))
                } else {
                    None
                }
            })
            .collect();
        for (t, why) in stale {
            metrics.tcp_dropped(why);
            self.close(t, registry);
        }
        if self.by_remote.capacity() > 64 && self.by_remote.len() * 4 < self.by_remote.capacity() {
            self.by_remote.shrink_to(self.by_remote.len() * 2);
            self.conns.shrink_to(self.conns.len() * 2);
            self.per_ip.shrink_to(self.per_ip.len() * 2);
        }
        if self.ready.capacity() > 1024 && self.ready.len() * 4 < self.ready.capacity() {
            self.ready.shrink_to(self.ready.len() * 2);
        }
        metrics.tcp_connections.set(self.conns.len() as i64);
    }

    fn close(&mut self, token: Token, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = registry.deregister(&mut c.stream);
            if self.by_remote.get(&c.remote) == Some(&token) {
                self.by_remote.remove(&c.remote);
            }
            let ip = c.remote.ip();
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
    }
}
