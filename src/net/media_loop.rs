//! One thread, one `mio::Poll`, one UDP socket, one `Waker`: the driver of
//! the [`Sfu`] core.
//!
//! Each wake it reads datagrams until the socket would block (feeding each to
//! the core and sending what the core yields), drains the command queue, fires
//! due timers, tells signalling sessions about their peers, publishes metrics,
//! and sleeps until the core's next deadline. It never blocks on anything but
//! `poll`.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use log::{debug, error, info};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::command::{self, Command, LoopHandle, PeerNotice};
use crate::metrics::Metrics;
use crate::sfu::{CoreStats, PeerId, Reply, Request, Sfu, SfuConfig, SfuEvent};
use crate::sink::BiteQueue;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Datagrams read per wake before timers and commands get a turn.
const READ_BATCH: usize = 512;
/// Commands handled per wake.
const COMMAND_BATCH: usize = 256;
/// How often the core's counters are copied into the shared metrics.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the core's Unix clock is re-read.
const CLOCK_REANCHOR: Duration = Duration::from_secs(1);
/// Receive buffer: larger than any WebRTC datagram (MTU-sized).
const RECV_BUF: usize = 4096;

/// What the loop needs besides the core's own settings.
pub struct MediaLoopConfig {
    /// The core's settings.
    pub sfu: SfuConfig,
    /// The already-bound media socket.
    pub socket: std::net::UdpSocket,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Where finished bites go.
    pub bites: BiteQueue,
}

struct MediaLoop {
    poll: Poll,
    socket: UdpSocket,
    sfu: Sfu,
    commands: Receiver<Command>,
    notices: HashMap<PeerId, Sender<PeerNotice>>,
    metrics: Arc<Metrics>,
    bites: BiteQueue,
    next_publish: Instant,
    published: CoreStats,
    buf: Vec<u8>,
    stopping: bool,
}

/// Starts the media loop thread; returns the handle side threads use and the
/// thread to join after a shutdown.
pub fn spawn(config: MediaLoopConfig) -> io::Result<(LoopHandle, JoinHandle<()>)> {
    config.socket.set_nonblocking(true)?;
    let mut socket = UdpSocket::from_std(config.socket);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = command::queue();
    let handle = LoopHandle::new(tx, waker, config.metrics.clone());
    let media = MediaLoop {
        poll,
        socket,
        sfu: Sfu::new(config.sfu),
        commands: rx,
        notices: HashMap::new(),
        metrics: config.metrics,
        bites: config.bites,
        next_publish: Instant::now(),
        published: CoreStats::default(),
        buf: vec![0; RECV_BUF],
        stopping: false,
    };
    let thread = thread::Builder::new()
        .name("media-loop".into())
        .spawn(move || media.run())?;
    Ok((handle, thread))
}

impl MediaLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut more_to_read = false;
        let mut more_commands = false;
        let mut clock_anchored = Instant::now();
        let mut wakes = 0u64;
        loop {
            let timeout = if more_to_read || more_commands {
                Some(Duration::ZERO)
            } else {
                self.sfu
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                error!("media loop poll failed: {e}; stopping");
                break;
            }
            wakes += 1;
            let readable = more_to_read || events.iter().any(|e| e.token() == SOCKET);
            more_to_read = readable && self.read_socket();
            more_commands = self.handle_commands();
            if clock_anchored.elapsed() >= CLOCK_REANCHOR {
                self.metrics.loop_wakes.inc_by(wakes);
                wakes = 0;
                self.sfu.set_unix_clock(crate::sfu::unix_clock_now());
                clock_anchored = Instant::now();
            }
            self.sfu.handle_timeout(Instant::now());
            self.flush();
            if self.stopping && self.sfu.is_drained() {
                break;
            }
        }
        self.next_publish = Instant::now();
        self.flush();
        info!("media loop stopped");
    }

    /// Reads up to a batch of datagrams; true if the socket may hold more.
    fn read_socket(&mut self) -> bool {
        for _ in 0..READ_BATCH {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    self.sfu.handle_datagram(now, source, &self.buf[..n]);
                    self.send_transmits();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors (port unreachable from a gone client) show
                    // up here on Linux; they concern one peer, not the loop.
                    debug!("media socket receive error: {e}");
                    self.metrics.drop_one("receive_error");
                }
            }
        }
        true
    }

    /// Handles up to a batch of commands; true if more are waiting.
    fn handle_commands(&mut self) -> bool {
        for _ in 0..COMMAND_BATCH {
            let cmd = match self.commands.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => {
                    if !self.stopping {
                        info!("command queue closed; shutting down the media loop");
                        self.stopping = true;
                        self.sfu.handle_request(Instant::now(), Request::Shutdown);
                    }
                    return false;
                }
            };
            let now = Instant::now();
            let Command {
                request,
                reply,
                notices,
            } = cmd;
            if request == Request::Shutdown {
                if self.stopping {
                    continue;
                }
                info!(
                    "media loop shutting down: closing {} peer(s)",
                    self.sfu.snapshot().peers
                );
                self.stopping = true;
            }
            let answer = self.sfu.handle_request(now, request);
            match (&answer, notices) {
                (Reply::Connect(Ok((peer, _))), Some(n)) => {
                    self.notices.insert(*peer, n);
                }
                (Reply::Candidate(Err(e)), _) => debug!("candidate refused: {e}"),
                _ => {}
            }
            if let Some(reply) = reply {
                // The session may have given up waiting; a peer it asked for
                // then times out on its own.
                let _ = reply.try_send(answer);
            }
            self.send_transmits();
        }
        !self.commands.is_empty()
    }

    /// Sends, dispatches and publishes everything the core produced.
    fn flush(&mut self) {
        self.send_transmits();
        let mut had_events = false;
        while let Some(e) = self.sfu.poll_event() {
            had_events = true;
            match e {
                SfuEvent::PeerConnected(peer) => self.notify(peer, PeerNotice::Connected, false),
                SfuEvent::PeerClosed { peer, reason } => {
                    self.notify(peer, PeerNotice::Closed(reason), true)
                }
                SfuEvent::Bite(b) => self.bites.offer(b),
            }
        }
        // Publish at once when peers came or went (so /metrics and /healthz
        // agree with what clients just saw), else at most every 100 ms.
        let now = Instant::now();
        if !had_events && now < self.next_publish {
            return;
        }
        self.next_publish = now + PUBLISH_EVERY;
        self.metrics
            .publish_core(&mut self.published, &self.sfu.snapshot());
    }

    fn notify(&mut self, peer: PeerId, notice: PeerNotice, last: bool) {
        let sender = if last {
            self.notices.remove(&peer)
        } else {
            self.notices.get(&peer).cloned()
        };
        if let Some(tx) = sender {
            // The session may be gone already (it closes after Connected).
            let _ = tx.try_send(notice);
        }
    }

    fn send_transmits(&mut self) {
        let (mut n, mut bytes) = (0u64, 0u64);
        while let Some(t) = self.sfu.poll_transmit() {
            match send_to(&self.socket, &t.contents, t.destination) {
                Ok(()) => {
                    n += 1;
                    bytes += t.contents.len() as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.metrics.drop_one("send_would_block")
                }
                Err(e) => {
                    debug!("send to {} failed: {e}", t.destination);
                    self.metrics.drop_one("send_error");
                }
            }
        }
        if n > 0 {
            self.metrics.sent(n, bytes);
        }
    }
}

fn send_to(socket: &UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<()> {
    loop {
        match socket.send_to(buf, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
