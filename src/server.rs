//! Wiring: binds the sockets, starts the media loop and the HTTP server, and
//! stops them in order. `main` and the integration tests both start the
//! service through [`Server::start`].

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::command::{Command, LoopHandle};
use crate::config::Config;
use crate::http::{Context, HttpServer};
use crate::metrics::Metrics;
use crate::net::{self, MediaLoopConfig};
use crate::permissions::PermissionClient;
use crate::sfu::{BiteConfig, Request, SfuConfig};
use crate::sink::nats::NatsConfig;
use crate::sink::{BiteQueue, Sink, SinkConfig};

/// How long shutdown waits for the media loop to close its peers.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Socket buffer size asked for the media socket: bursts (a reconnect
/// storm, a flood of junk) must not overflow the kernel's queue while the
/// loop is busy. The kernel may cap it (net.core.rmem_max / wmem_max).
pub const MEDIA_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

fn size_socket_buffers(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(MEDIA_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(MEDIA_SOCKET_BUFFER);
    match (s.recv_buffer_size(), s.send_buffer_size()) {
        (Ok(r), Ok(w)) if r < MEDIA_SOCKET_BUFFER => info!(
            "media socket buffers are {r} B receive / {w} B send (asked {MEDIA_SOCKET_BUFFER}); raise net.core.rmem_max and wmem_max for bursts"
        ),
        (Ok(r), Ok(w)) => info!("media socket buffers: {r} B receive, {w} B send"),
        _ => {}
    }
}

/// A running service.
pub struct Server {
    http: HttpServer,
    handle: LoopHandle,
    media_thread: Option<JoinHandle<()>>,
    udp_addr: SocketAddr,
    metrics: Arc<Metrics>,
    sink: Option<Sink>,
}

impl Server {
    /// Binds `config.listen` and `config.udp` and starts every thread.
    pub fn start(config: &Config) -> io::Result<Server> {
        let socket = UdpSocket::bind(config.udp)
            .map_err(|e| io::Error::new(e.kind(), format!("--udp {}: {e}", config.udp)))?;
        let udp_addr = socket.local_addr()?;
        size_socket_buffers(&socket);
        let listener = TcpListener::bind(config.listen)
            .map_err(|e| io::Error::new(e.kind(), format!("--listen {}: {e}", config.listen)))?;
        let metrics = Arc::new(Metrics::new());
        let sink_config = SinkConfig {
            nats: config.nats.as_ref().map(|url| NatsConfig {
                url: url.clone(),
                bite_subject: config.bite_subject.clone(),
                store_subject: config.store_subject.clone(),
                backlog_bytes: config.nats_backlog_bytes,
            }),
            dir: config.bites_dir.clone(),
        };
        let (sink, bites) = if sink_config.nats.is_some() || sink_config.dir.is_some() {
            let (s, q) = Sink::start(sink_config, metrics.clone())?;
            (Some(s), q)
        } else {
            warn!("bites are neither published (no NATS) nor written (no --bites-dir)");
            (None, BiteQueue::disconnected(metrics.clone()))
        };
        // The candidate must carry the real port when --udp asked for port 0.
        let candidate_addr = SocketAddr::new(config.public_ip, udp_addr.port());
        let mut sfu = SfuConfig::new(candidate_addr);
        sfu.max_peers = config.max_peers;
        sfu.max_peers_per_user = config.max_peers_per_user;
        sfu.connect_timeout = config.connect_timeout;
        sfu.idle_timeout = config.idle_timeout;
        sfu.membership_grace = config.membership_grace;
        sfu.speaker.voiced_loudness = config.voiced_loudness;
        sfu.bites = BiteConfig {
            silence: config.bite_silence,
            max_len: config.bite_max,
        };
        let (handle, media_thread) = net::spawn(MediaLoopConfig {
            sfu,
            socket,
            metrics: metrics.clone(),
            bites,
        })?;
        let permissions = if config.dev {
            None
        } else {
            Some(PermissionClient::new(
                &config.permissions_host,
                config.permissions_timeout,
            ))
        };
        let ctx = Arc::new(Context::new(
            config.dev,
            config.connect_timeout,
            handle.clone(),
            permissions,
            metrics.clone(),
            config.max_signalling,
        ));
        let http = HttpServer::start(listener, ctx)?;
        info!("media on udp {udp_addr}, ICE candidate {candidate_addr}");
        Ok(Server {
            http,
            handle,
            media_thread: Some(media_thread),
            udp_addr,
            metrics,
            sink,
        })
    }

    /// Where HTTP listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Where the media socket is bound.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, closes every peer, and waits (bounded) for the media
    /// loop to finish. Returns false if something did not stop in time.
    pub fn shutdown(mut self) -> bool {
        self.http.stop();
        let start = Instant::now();
        if self.handle.send(Command::fire(Request::Shutdown)).is_err() {
            warn!("media loop did not take the shutdown command");
        }
        let mut clean = true;
        if let Some(t) = self.media_thread.take() {
            while !t.is_finished() && start.elapsed() < SHUTDOWN_GRACE {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!("media loop did not stop within {SHUTDOWN_GRACE:?}");
                clean = false;
            }
        }
        // The loop flushed every open bite into the sink's queue on its way
        // out; give NATS the rest of the grace period to take them.
        if let Some(sink) = self.sink.take() {
            sink.finish(start + SHUTDOWN_GRACE);
        }
        info!("stopped in {:?}", start.elapsed());
        clean
    }
}
