//! Wiring: binds the sockets, starts the media loop and the HTTP server, and
//! stops them in order. `main` and the integration tests both start the
//! service through [`Server::start`].

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::cluster::{self, ClusterConfig};
use crate::command::LoopHandle;
use crate::config::Config;
use crate::fd_budget;
use crate::http::linger::MAX_LINGERING;
use crate::http::{Context, HttpServer, Limits};
use crate::metrics::Metrics;
use crate::net::{self, LoopHealth, MediaLoopConfig, TcpLimits};
use crate::permissions::PermissionClient;
use crate::sfu::{BiteConfig, FinishedBite, SfuConfig};
use crate::sink::nats::NatsConfig;
use crate::sink::{BiteQueue, Sink, SinkConfig};

/// How long shutdown waits for the media loop to close its peers.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Socket buffer size asked for the media socket: bursts (a reconnect
/// storm, a flood of junk) must not overflow the kernel's queue while the
/// loop is busy. The kernel may cap it (net.core.rmem_max / wmem_max).
pub const MEDIA_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a TCP listener; an error names the flag it came from.
fn bind_tcp(addr: SocketAddr, flag: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("{flag} {addr}: {e}")))
}

/// The cluster this node is part of: needs NATS, a subject prefix and a
/// cluster key. Without a key a node with NATS publishes bites and stays
/// alone, and says so.
fn cluster_config(config: &Config) -> Option<ClusterConfig> {
    let url = config.nats.clone()?;
    let prefix = config.cluster_subject.clone()?;
    if config.cluster_keys.is_empty() {
        info!("cluster: no --cluster-key-file, so this node stays alone (it still publishes bites to NATS)");
        return None;
    }
    Some(ClusterConfig {
        url,
        auth: config.nats_auth.clone(),
        node: config.node_id.clone(),
        prefix,
        keys: config.cluster_keys.clone(),
    })
}

/// The loop's and the NATS threads' ends of the cluster, if this node is
/// part of one.
fn cluster_ends(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> (Option<cluster::ClusterPort>, Option<cluster::ClusterSide>) {
    match cluster_config(config) {
        Some(c) => {
            info!("cluster: node {} on {} under {}.*", c.node, c.url, c.prefix);
            let (port, side) = cluster::channels(c, metrics.clone());
            (Some(port), Some(side))
        }
        None => (None, None),
    }
}

/// Makes sure every directory the server will write to exists and takes a
/// file, so a bite is never lost to a directory found unwritable later.
fn check_writable(config: &Config) -> io::Result<()> {
    let dirs = [
        ("--bites-dir", &config.bites_dir),
        ("--spool-dir", &config.spool_dir),
    ];
    for (flag, dir) in dirs {
        let Some(dir) = dir else { continue };
        let probe = dir.join(format!(".beep-sfu-write-test-{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&probe, b""))
            .and_then(|()| std::fs::remove_file(&probe));
        if let Err(e) = written {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{flag} {}: cannot write there ({e}); give a writable directory, or none",
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Raises the open-files limit and checks that the caps fit under it.
fn check_fd_budget(config: &Config) -> io::Result<()> {
    let (soft, hard) = fd_budget::raise_nofile()?;
    let tcp = if config.tcp.is_some() {
        config.max_tcp_connections as u64
    } else {
        0
    };
    let caps = [
        ("--max-signalling", config.max_signalling as u64),
        ("--max-tcp-connections", tcp),
        ("lingering refused connections", 2 * MAX_LINGERING as u64),
    ];
    let need = fd_budget::check(soft, &caps)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    info!("file descriptors: limit {soft} (hard {hard}), the caps need at most {need}");
    Ok(())
}

/// Starts the bite sink (NATS and/or files), or a queue that counts bites
/// as dropped when neither is configured.
fn start_sink(config: &Config, metrics: &Arc<Metrics>) -> io::Result<(Option<Sink>, BiteQueue)> {
    let sink_config = SinkConfig {
        nats: config.nats.as_ref().map(|url| NatsConfig {
            url: url.clone(),
            bite_subject: config.bite_subject.clone(),
            store_subject: config.store_subject.clone(),
            backlog_bytes: config.nats_backlog_bytes,
            spool_dir: config.spool_dir.clone(),
            jetstream: config.nats_jetstream,
            auth: config.nats_auth.clone(),
            ping: config.nats_ping,
        }),
        dir: config.bites_dir.clone(),
    };
    if sink_config.nats.is_none() && sink_config.dir.is_none() {
        warn!("bites are neither published (no NATS) nor written (no --bites-dir)");
        return Ok((None, BiteQueue::disconnected(metrics.clone())));
    }
    let (s, q) = Sink::start(sink_config, metrics.clone())?;
    Ok((Some(s), q))
}

/// The core's settings from the service's: candidates carry the real
/// ports (the sockets may have been bound to port 0).
fn sfu_config(config: &Config, udp_port: u16, tcp_port: Option<u16>) -> SfuConfig {
    let at = |port: u16| -> Vec<SocketAddr> {
        config
            .public_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect()
    };
    let candidates = at(udp_port);
    let mut sfu = SfuConfig::new(SocketAddr::from(([0, 0, 0, 0], udp_port)));
    sfu.candidates = candidates;
    sfu.tcp_candidates = tcp_port.map(at).unwrap_or_default();
    sfu.node_id = config.node_id.clone();
    sfu.max_peers = config.max_peers;
    sfu.max_peers_per_user = config.max_peers_per_user;
    sfu.connect_timeout = config.connect_timeout;
    sfu.idle_timeout = config.idle_timeout;
    sfu.membership_grace = config.membership_grace;
    sfu.speaker.voiced_loudness = config.voiced_loudness;
    sfu.red_distance = config.red_distance;
    sfu.opus_dtx = config.opus_dtx;
    sfu.bites = BiteConfig {
        silence: config.bite_silence,
        max_len: config.bite_max,
        ..BiteConfig::default()
    };
    sfu
}

/// Binds the media socket; `[::]:PORT` is dual-stack (IPv4 clients arrive as
/// IPv4-mapped addresses, which the media loop turns back into IPv4).
fn bind_media(addr: SocketAddr) -> io::Result<UdpSocket> {
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_only_v6(false)?;
        s.bind(&addr.into())?;
        return Ok(s.into());
    }
    UdpSocket::bind(addr)
}

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
    media_thread: Option<JoinHandle<Vec<FinishedBite>>>,
    health: Arc<LoopHealth>,
    udp_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    sink: Option<Sink>,
    /// Ends once the goodbye to the other nodes is sent.
    cluster_thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `config.listen` and `config.udp` and starts every thread.
    pub fn start(config: &Config) -> io::Result<Server> {
        check_fd_budget(config)?;
        check_writable(config)?;
        let socket = bind_media(config.udp)
            .map_err(|e| io::Error::new(e.kind(), format!("--udp {}: {e}", config.udp)))?;
        let udp_addr = socket.local_addr()?;
        size_socket_buffers(&socket);
        let listener = bind_tcp(config.listen, "--listen")?;
        let tcp = config.tcp.map(|a| bind_tcp(a, "--tcp")).transpose()?;
        let tcp_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
        let tcp_port = tcp_addr.map(|a| a.port());
        let admin = config
            .admin_listen
            .map(|a| bind_tcp(a, "--admin-listen"))
            .transpose()?;
        let metrics = Arc::new(Metrics::new());
        let (sink, bites) = start_sink(config, &metrics)?;
        let sfu = sfu_config(config, udp_addr.port(), tcp_port);
        let candidates = sfu.candidates.clone();
        let health = Arc::new(LoopHealth::new());
        let spool = bites.clone();
        health.set_last_rites(Box::new(move |wait| spool.spool_now(wait)));
        let (cluster_port, cluster_side) = cluster_ends(config, &metrics);
        let (handle, media_thread) = net::spawn(MediaLoopConfig {
            sfu,
            socket,
            metrics: metrics.clone(),
            bites,
            health: health.clone(),
            tcp,
            tcp_limits: TcpLimits {
                max_connections: config.max_tcp_connections,
                max_per_ip: config.max_tcp_per_ip,
                ..TcpLimits::default()
            },
            cluster: cluster_port,
        })?;
        let cluster_thread = cluster_side.map(|s| s.start(handle.clone())).transpose()?;
        net::watch(health.clone(), config.loop_stall)?;
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
            Limits {
                max_connections: config.max_signalling,
                max_per_ip: config.max_signalling_per_ip,
                allowed_origins: config.allowed_origins.clone(),
            },
            health.clone(),
        ));
        let http = HttpServer::start(listener, admin, ctx)?;
        info!("media on udp {udp_addr}, ICE candidates {candidates:?}");
        if let Some(port) = tcp_port {
            info!("ICE-TCP (passive) on port {port}");
        }
        Ok(Server {
            http,
            handle,
            media_thread: Some(media_thread),
            health,
            udp_addr,
            tcp_addr,
            metrics,
            sink,
            cluster_thread,
        })
    }

    /// Where HTTP listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Where the admin listener (/healthz, /metrics) is, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.http.admin_addr()
    }

    /// Where the ICE-TCP listener is bound, if TCP is served.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
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
        // A flag and a wake: nothing a full queue could refuse.
        self.handle.stop();
        let mut clean = true;
        let mut last = Vec::new();
        if let Some(t) = self.media_thread.take() {
            while !t.is_finished() && start.elapsed() < SHUTDOWN_GRACE {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                last = t.join().unwrap_or_default();
            } else {
                self.health.set_stopping();
                warn!("media loop did not stop within {SHUTDOWN_GRACE:?}");
                clean = false;
            }
        }
        // The loop said goodbye to the other nodes as it stopped; let it go out.
        if let Some(t) = self.cluster_thread.take() {
            while !t.is_finished() && start.elapsed() < SHUTDOWN_GRACE {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The loop handed back every bite it finished while stopping; give
        // NATS the rest of the grace period to take them (the rest is spooled).
        if let Some(sink) = self.sink.take() {
            sink.finish(last, start + SHUTDOWN_GRACE);
        } else if !last.is_empty() {
            warn!(
                "{} bite(s) finished at shutdown have nowhere to go (no NATS, no --bites-dir)",
                last.len()
            );
        }
        info!("stopped in {:?}", start.elapsed());
        clean
    }
}
