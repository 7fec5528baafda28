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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TryRecvError};
use log::{debug, error, info};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

mod ice_tcp;
mod presence;

use super::clock::unix_clock_now;
use super::health::LoopHealth;
use super::memory::HeapTrim;
use super::tcp::{TcpLimits, TcpMedia};
use super::udp::{send_to, unmapped};
use crate::cluster::ClusterPort;
use crate::command::{Command, LoopHandle, LoopInbox, PeerNotice};
use crate::metrics::Metrics;
use crate::sfu::{CoreStats, FinishedBite, PeerId, Reply, Request, Sfu, SfuConfig, SfuEvent};
use crate::sink::BiteQueue;
use str0m::net::Protocol;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const TCP_LISTENER: Token = Token(2);
/// ICE-TCP connections take tokens from here on.
const FIRST_TCP_CONN: usize = 3;
/// Datagrams read per wake before timers and commands get a turn.
const READ_BATCH: usize = 512;
/// Commands handled per wake.
const COMMAND_BATCH: usize = 256;
/// How often the core's counters are copied into the shared metrics.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the core's Unix clock is re-read (and a cluster heartbeat sent).
const CLOCK_REANCHOR: Duration = Duration::from_secs(1);
/// Receive buffer: larger than any WebRTC datagram (MTU-sized).
const RECV_BUF: usize = 4096;

/// Longest sleep: the loop turns at least this often, so its pulse shows
/// it is alive even with nothing to do.
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// What the loop needs besides the core's own settings.
pub(crate) struct MediaLoopConfig {
    /// The core's settings.
    pub sfu: SfuConfig,
    /// The already-bound media socket.
    pub socket: std::net::UdpSocket,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Where finished bites go.
    pub bites: BiteQueue,
    /// The loop's pulse.
    pub health: Arc<LoopHealth>,
    /// The ICE-TCP listener, if TCP is served.
    pub tcp: Option<std::net::TcpListener>,
    /// Bounds on ICE-TCP connections.
    pub tcp_limits: TcpLimits,
    /// The other nodes, when this one is part of a cluster.
    pub cluster: Option<ClusterPort>,
}

struct MediaLoop {
    poll: Poll,
    socket: UdpSocket,
    sfu: Sfu,
    inbox: LoopInbox,
    notices: HashMap<PeerId, Sender<PeerNotice>>,
    metrics: Arc<Metrics>,
    bites: BiteQueue,
    next_publish: Instant,
    published: CoreStats,
    buf: Vec<u8>,
    stopping: bool,
    health: Arc<LoopHealth>,
    /// The socket is IPv6 (dual-stack when bound to `[::]`).
    v6_socket: bool,
    tcp: Option<TcpMedia>,
    /// Frames read off TCP connections, fed to the core after the read.
    tcp_frames: Vec<(SocketAddr, Vec<u8>)>,
    /// Bites finished while stopping: handed to the caller on exit instead
    /// of a queue that might be full, so none is lost.
    last_bites: Vec<FinishedBite>,
    /// Gives the heap back after a peak.
    heap: HeapTrim,
    cluster: Option<ClusterPort>,
    /// When the last heartbeat went out, and whether presence changed since.
    heartbeat_at: Instant,
    presence_dirty: bool,
}

/// Starts the media loop thread; returns the handle side threads use and the
/// thread to join after a shutdown, which yields the bites finished while
/// stopping. A panic on the loop ends the process (see [`super::health::EXIT_LOOP_FAILED`]).
pub(crate) fn spawn(
    config: MediaLoopConfig,
) -> io::Result<(LoopHandle, JoinHandle<Vec<FinishedBite>>)> {
    config.socket.set_nonblocking(true)?;
    let v6_socket = config.socket.local_addr()?.is_ipv6();
    let mut socket = UdpSocket::from_std(config.socket);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (handle, inbox) = LoopHandle::new(waker, config.metrics.clone());
    let tcp = match config.tcp {
        Some(l) => Some(TcpMedia::new(
            l,
            poll.registry(),
            TCP_LISTENER,
            FIRST_TCP_CONN,
            config.tcp_limits,
        )?),
        None => None,
    };
    let media = MediaLoop {
        poll,
        socket,
        sfu: Sfu::new(config.sfu, unix_clock_now()),
        inbox,
        notices: HashMap::new(),
        metrics: config.metrics,
        bites: config.bites,
        next_publish: Instant::now(),
        published: CoreStats::default(),
        buf: vec![0; RECV_BUF],
        stopping: false,
        health: config.health,
        v6_socket,
        tcp,
        tcp_frames: Vec::new(),
        last_bites: Vec::new(),
        heap: HeapTrim::default(),
        cluster: config.cluster,
        heartbeat_at: Instant::now(),
        presence_dirty: true,
    };
    let thread = thread::Builder::new()
        .name("media-loop".into())
        .spawn(move || supervised(media))?;
    Ok((handle, thread))
}

/// Runs the loop; a panic is logged and ends the process, so the
/// orchestrator restarts a server whose media is gone instead of leaving it
/// up and saying it is healthy.
fn supervised(media: MediaLoop) -> Vec<FinishedBite> {
    let health = media.health.clone();
    match catch_unwind(AssertUnwindSafe(move || media.run())) {
        Ok(bites) => bites,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            error!(
                "the media loop panicked ({why}); exiting so the supervisor restarts the service"
            );
            health.fail();
        }
    }
}

impl MediaLoop {
    fn run(mut self) -> Vec<FinishedBite> {
        #[cfg(feature = "test-kit")]
        if std::env::var_os("BEEP_SFU_TEST_PANIC_LOOP").is_some() {
            panic!("BEEP_SFU_TEST_PANIC_LOOP is set (fault injection for tests)");
        }
        #[cfg(feature = "test-kit")]
        let panic_file = std::env::var_os("BEEP_SFU_TEST_PANIC_FILE");
        #[cfg(feature = "test-kit")]
        if std::env::var_os("BEEP_SFU_TEST_STALL_LOOP").is_some() {
            // Fault injection for tests: a loop that never turns again.
            std::thread::sleep(Duration::from_secs(3600));
        }
        let mut events = Events::with_capacity(64);
        let mut more_to_read = false;
        let mut more_commands = false;
        let mut more_tcp = false;
        let mut clock_anchored = Instant::now();
        let mut wakes = 0u64;
        loop {
            let timeout = if more_to_read || more_commands || more_tcp {
                Some(Duration::ZERO)
            } else {
                let next = self.sfu.poll_timeout();
                Some(next.map_or(MAX_SLEEP, |t| {
                    t.saturating_duration_since(Instant::now()).min(MAX_SLEEP)
                }))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                error!("media loop poll failed: {e}; stopping");
                break;
            }
            wakes += 1;
            let turn = Instant::now();
            self.health.beat();
            if !self.stopping && self.inbox.stop.load(Ordering::SeqCst) {
                self.stop(Instant::now());
            }
            let readable = more_to_read || events.iter().any(|e| e.token() == SOCKET);
            more_to_read = readable && self.read_socket();
            more_tcp = self.tcp.is_some() && self.handle_tcp_events(&events);
            more_commands = self.handle_commands() | self.handle_cluster();
            if clock_anchored.elapsed() >= CLOCK_REANCHOR {
                self.metrics.loop_wakes.inc_by(wakes);
                wakes = 0;
                self.every_second();
                clock_anchored = Instant::now();
                // Fault injection for tests: panic once this file exists.
                #[cfg(feature = "test-kit")]
                if panic_file
                    .as_ref()
                    .is_some_and(|f| std::path::Path::new(f).exists())
                {
                    panic!("BEEP_SFU_TEST_PANIC_FILE exists (fault injection for tests)");
                }
            }
            self.sfu.handle_timeout(Instant::now());
            self.flush();
            self.heartbeat();
            self.metrics
                .loop_turn_seconds
                .observe(turn.elapsed().as_secs_f64());
            if self.stopping && self.sfu.is_drained() {
                break;
            }
        }
        if let Some(c) = &self.cluster {
            c.goodbye();
        }
        self.next_publish = Instant::now();
        self.flush();
        self.health.set_stopping();
        info!(
            "media loop stopped; {} bite(s) finished while stopping",
            self.last_bites.len()
        );
        std::mem::take(&mut self.last_bites)
    }

    /// Housekeeping once a second: the core's Unix clock, stale ICE-TCP
    /// connections, the heap, and a heartbeat due.
    fn every_second(&mut self) {
        self.sfu.set_unix_clock(unix_clock_now());
        if let Some(tcp) = &mut self.tcp {
            tcp.sweep(Instant::now(), self.poll.registry(), &self.metrics);
        }
        self.trim_heap();
        self.presence_dirty = true;
    }

    /// Returns freed heap to the kernel once the load has halved since its
    /// peak (see `net/memory.rs`), and times it.
    fn trim_heap(&mut self) {
        let s = self.sfu.snapshot();
        if let Some(took) = self.heap.check(Instant::now(), s.peers + s.conversations) {
            self.metrics.heap_trim_seconds.observe(took.as_secs_f64());
            debug!("heap trimmed in {took:?} ({} peers left)", s.peers);
        }
    }

    /// Reads up to a batch of datagrams; true if the socket may hold more.
    fn read_socket(&mut self) -> bool {
        for _ in 0..READ_BATCH {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, source)) => {
                    let now = Instant::now();
                    let source = unmapped(source);
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

    /// Handles up to a batch of commands and of candidates (each queue its
    /// own batch, so neither starves the other); true if more are waiting.
    fn handle_commands(&mut self) -> bool {
        let mut more = false;
        for from_candidates in [false, true] {
            for _ in 0..COMMAND_BATCH {
                let queue = if from_candidates {
                    &self.inbox.candidates
                } else {
                    &self.inbox.commands
                };
                match queue.try_recv() {
                    Ok(cmd) => self.handle_command(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if !self.stopping {
                            info!("command queue closed; shutting down the media loop");
                            self.stop(Instant::now());
                        }
                        break;
                    }
                }
            }
            more |= !(if from_candidates {
                &self.inbox.candidates
            } else {
                &self.inbox.commands
            })
            .is_empty();
        }
        more
    }

    fn handle_command(&mut self, cmd: Command) {
        let Command {
            request,
            reply,
            notices,
        } = cmd;
        if request == Request::Shutdown {
            self.stop(Instant::now());
            return;
        }
        let answer = self.sfu.handle_request(Instant::now(), request);
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

    /// Closes every peer (their bites are finished and kept for the caller)
    /// and stops taking requests.
    fn stop(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        info!(
            "media loop shutting down: closing {} peer(s)",
            self.sfu.snapshot().peers
        );
        self.stopping = true;
        self.sfu.handle_request(now, Request::Shutdown);
    }

    /// Sends, dispatches and publishes everything the core produced.
    fn flush(&mut self) {
        self.send_transmits();
        let mut had_events = false;
        while let Some(e) = self.sfu.poll_event() {
            had_events = true;
            match e {
                SfuEvent::PeerConnected(peer) => self.notify(peer, PeerNotice::Connected, false),
                SfuEvent::PeerClosed { peer, reason, tcp } => {
                    if let Some(conns) = &mut self.tcp {
                        conns.close_remotes(&tcp, self.poll.registry(), &self.metrics);
                    }
                    self.notify(peer, PeerNotice::Closed(reason), true)
                }
                SfuEvent::Bite(b) if self.stopping => {
                    self.metrics.bites.inc();
                    self.last_bites.push(b);
                }
                SfuEvent::Bite(b) => self.bites.offer(b),
                SfuEvent::Joined(m) => {
                    if let Some(c) = &self.cluster {
                        c.joined(m);
                    }
                }
                SfuEvent::Relay { to, packet } => {
                    if let Some(c) = &self.cluster {
                        c.relay(to, packet);
                    }
                }
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

    /// Accepts ICE-TCP connections, reads their frames into the core, and
    /// writes what waits for writable connections.
    /// Returns true if a connection has more to read next turn.
    fn send_transmits(&mut self) {
        let (mut n, mut bytes) = (0u64, 0u64);
        while let Some(t) = self.sfu.poll_transmit() {
            if t.proto == Protocol::Tcp {
                if let Some(tcp) = &mut self.tcp {
                    tcp.send(
                        t.destination,
                        &t.contents,
                        self.poll.registry(),
                        &self.metrics,
                    );
                }
                continue;
            }
            match send_to(&self.socket, self.v6_socket, &t.contents, t.destination) {
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
