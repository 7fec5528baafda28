//! ICE over TCP (RFC 6544, passive side) for clients whose networks block
//! UDP: a listener and its connections on the media loop's own `mio::Poll`,
//! each framed per RFC 4571 (a 2-byte big-endian length before every
//! packet). Frames go to the core as `Protocol::Tcp` datagrams from the
//! connection's remote address; the core's TCP transmits come back here by
//! that address.
//!
//! Every connection is bounded: its read buffer holds at most one frame, its
//! write buffer at most [`TcpLimits::write_buffer`] bytes (a client that does
//! not read is dropped, never allowed to grow memory), the number of
//! connections is capped, and a connection none of whose frames a peer took
//! within [`TcpLimits::stun_deadline`] is closed.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::metrics::Metrics;

/// Largest RFC 4571 frame (the length is 16 bits).
const MAX_FRAME: usize = 65_535;
/// Bytes read off one connection per turn of the loop, so one client
/// flooding its connection cannot keep the loop from everyone else; the
/// rest is read on the next turn.
const READ_BUDGET: usize = 64 * 1024;
/// Connections accepted per turn of the loop, for the same reason.
const ACCEPT_BUDGET: usize = 64;

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
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            max_connections: 4_096,
            write_buffer: 64 * 1024,
            stun_deadline: Duration::from_secs(10),
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
    /// WRITABLE interest is registered (the write buffer is not empty).
    want_write: bool,
}

/// The listener and its connections.
pub(crate) struct TcpMedia {
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    by_remote: HashMap<SocketAddr, Token>,
    next_token: usize,
    limits: TcpLimits,
    /// Connections whose read stopped on the budget, not on `WouldBlock`
    /// (the poll is edge-triggered: nobody would wake us for them).
    unfinished: Vec<Token>,
    /// The accept stopped on its budget.
    accept_unfinished: bool,
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
            next_token: first_conn_token,
            limits,
            unfinished: Vec::new(),
            accept_unfinished: false,
        })
    }

    /// True if a read or an accept stopped on its budget and must go on
    /// next turn (the loop then polls without sleeping).
    pub fn has_more(&self) -> bool {
        self.accept_unfinished || !self.unfinished.is_empty()
    }

    /// Connections to read again this turn, and whether to accept again.
    pub fn take_unfinished(&mut self) -> (Vec<Token>, bool) {
        let accept = std::mem::take(&mut self.accept_unfinished);
        (std::mem::take(&mut self.unfinished), accept)
    }

    /// Accepts pending connections, up to a budget (closing those over the
    /// cap).
    pub fn accept(&mut self, registry: &Registry, now: Instant, metrics: &Metrics) {
        for _ in 0..ACCEPT_BUDGET {
            let (mut stream, remote) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
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
            self.conns.insert(
                token,
                Conn {
                    stream,
                    remote,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    opened: now,
                    known: false,
                    want_write: false,
                },
            );
            metrics.tcp_connections.set(self.conns.len() as i64);
        }
        self.accept_unfinished = true;
    }

    /// True if `token` is one of our connections.
    pub fn owns(&self, token: Token) -> bool {
        self.conns.contains_key(&token)
    }

    /// Reads what a connection has; appends each complete frame, with the
    /// connection's remote address, to `frames`. Closes the connection on
    /// EOF or error.
    pub fn read(
        &mut self,
        token: Token,
        registry: &Registry,
        frames: &mut Vec<(SocketAddr, Vec<u8>)>,
        metrics: &Metrics,
    ) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        let mut closed = false;
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                if !self.unfinished.contains(&token) {
                    self.unfinished.push(token);
                }
                break;
            }
            let want = chunk.len().min(budget);
            match c.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    c.rbuf.extend_from_slice(&chunk[..n]);
                    let mut at = 0;
                    while c.rbuf.len() - at >= 2 {
                        let len = usize::from(u16::from_be_bytes([c.rbuf[at], c.rbuf[at + 1]]));
                        if c.rbuf.len() - at - 2 < len {
                            break;
                        }
                        frames.push((c.remote, c.rbuf[at + 2..at + 2 + len].to_vec()));
                        metrics.tcp_frames_in.inc();
                        at += 2 + len;
                    }
                    c.rbuf.drain(..at);
                    debug_assert!(c.rbuf.len() < 2 + MAX_FRAME);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            self.close(token, registry);
            metrics.tcp_connections.set(self.conns.len() as i64);
        }
    }

    /// Marks the connection a peer took a frame from as known (it survives
    /// the STUN deadline).
    pub fn mark_known(&mut self, remote: SocketAddr) {
        if let Some(c) = self
            .by_remote
            .get(&remote)
            .and_then(|t| self.conns.get_mut(t))
        {
            c.known = true;
        }
    }

    /// Frames `data` onto the connection to `remote` and writes what the
    /// socket takes now; the rest waits for WRITABLE. A connection whose
    /// buffer would pass its bound is closed (a slow reader).
    pub fn send(
        &mut self,
        remote: SocketAddr,
        data: &[u8],
        registry: &Registry,
        metrics: &Metrics,
    ) {
        let Some(&token) = self.by_remote.get(&remote) else {
            metrics.tcp_dropped("no_connection");
            return;
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let Ok(len) = u16::try_from(data.len()) else {
            metrics.tcp_dropped("frame_too_large");
            return;
        };
        if c.wbuf.len() + 2 + data.len() > self.limits.write_buffer {
            debug!("ICE-TCP {remote}: not reading; connection dropped");
            metrics.tcp_dropped("slow_reader");
            self.close(token, registry);
            metrics.tcp_connections.set(self.conns.len() as i64);
            return;
        }
        c.wbuf.extend_from_slice(&len.to_be_bytes());
        c.wbuf.extend_from_slice(data);
        metrics.tcp_frames_out.inc();
        self.flush(token, registry, metrics);
    }

    /// Writes what a connection's buffer holds, as far as the socket takes.
    pub fn flush(&mut self, token: Token, registry: &Registry, metrics: &Metrics) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut written = 0;
        let mut failed = false;
        while written < c.wbuf.len() {
            match c.stream.write(&c.wbuf[written..]) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        c.wbuf.drain(..written);
        if failed {
            self.close(token, registry);
            metrics.tcp_connections.set(self.conns.len() as i64);
            return;
        }
        let want = !c.wbuf.is_empty();
        if want != c.want_write {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if registry.reregister(&mut c.stream, token, interest).is_ok() {
                c.want_write = want;
            }
        }
    }

    /// Closes connections no peer took a frame from within the deadline.
    pub fn sweep(&mut self, now: Instant, registry: &Registry, metrics: &Metrics) {
        let deadline = self.limits.stun_deadline;
        let stale: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.known && now.saturating_duration_since(c.opened) >= deadline)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            metrics.tcp_dropped("no_stun");
            self.close(t, registry);
        }
        metrics.tcp_connections.set(self.conns.len() as i64);
    }

    fn close(&mut self, token: Token, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = registry.deregister(&mut c.stream);
            if self.by_remote.get(&c.remote) == Some(&token) {
                self.by_remote.remove(&c.remote);
            }
        }
    }
}
