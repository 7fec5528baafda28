//! The HTTP side: an acceptor thread and a bounded set of blocking
//! connection threads serving `/connect` (WebSocket signalling), `/join`,
//! `/healthz` and `/metrics`.
//!
//! Each connection gets one request (responses close the connection). The
//! threads block on their own sockets, on permission checks and on replies
//! from the media loop, never the other way round.

pub(crate) mod claims;
mod connect;
mod join;
pub(crate) mod linger;
pub(crate) mod request;
mod response;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::command::LoopHandle;
use crate::metrics::Metrics;
use crate::net::LoopHealth;
use crate::permissions::PermissionClient;
use request::Request;
use response::Response;

/// The demo page served at `/` in `--dev` (embedded: no build step, no CDN).
const DEMO_PAGE: &str = include_str!("demo.html");

/// How long a client may take to send its whole request head.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe may take to send its request head on the admin listener.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Concurrent connections on the admin listener.
const ADMIN_CONNECTIONS: usize = 8;
/// How long after the media loop's last turn `/healthz` says it stalled.
const LOOP_STALE: Duration = Duration::from_secs(2);

/// Bounds on signalling, from the configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    /// Most concurrent connections on the public listener.
    pub max_connections: usize,
    /// Most concurrent connections from one source IP (0: no limit).
    pub max_per_ip: usize,
    /// Origins allowed to open `/connect` (empty: any).
    pub allowed_origins: Vec<String>,
}

/// What every connection thread shares.
pub(crate) struct Context {
    /// Development mode (query claims, no permission checks).
    pub dev: bool,
    /// How long a peer has to connect before its WebSocket is closed.
    pub connect_timeout: Duration,
    /// The way into the media loop.
    pub handle: LoopHandle,
    /// Permission checks; `None` in dev mode (every join allowed).
    pub permissions: Option<PermissionClient>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Connection bounds.
    pub limits: Limits,
    /// When the media loop last turned.
    pub health: Arc<LoopHealth>,
    /// Set when the service is stopping.
    pub shutting_down: AtomicBool,
    active: AtomicUsize,
    admin_active: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Context {
    /// A context with no open connections.
    pub fn new(
        dev: bool,
        connect_timeout: Duration,
        handle: LoopHandle,
        permissions: Option<PermissionClient>,
        metrics: Arc<Metrics>,
        limits: Limits,
        health: Arc<LoopHealth>,
    ) -> Self {
        Context {
            dev,
            connect_timeout,
            handle,
            permissions,
            metrics,
            limits,
            health,
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            admin_active: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot for a connection from `ip` on `which`; false if a limit
    /// is reached (the slot is then not taken).
    fn admit(&self, which: Listener, ip: IpAddr) -> bool {
        let (count, max) = match which {
            Listener::Public => (&self.active, self.limits.max_connections),
            Listener::Admin => (&self.admin_active, ADMIN_CONNECTIONS),
        };
        if count.fetch_add(1, Ordering::SeqCst) >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        if which == Listener::Public && self.limits.max_per_ip > 0 {
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= self.limits.max_per_ip {
                drop(map);
                count.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
            *n += 1;
        }
        true
    }

    /// Gives back what [`Context::admit`] took.
    fn release(&self, which: Listener, ip: IpAddr) {
        match which {
            Listener::Public => {
                self.active.fetch_sub(1, Ordering::SeqCst);
                if self.limits.max_per_ip > 0 {
                    let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = map.get_mut(&ip) {
                        *n -= 1;
                        if *n == 0 {
                            map.remove(&ip);
                        }
                    }
                }
            }
            Listener::Admin => {
                self.admin_active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// Signalling, `/healthz` and `/metrics`.
    Public,
    /// `/healthz` and `/metrics` only, with capacity of its own.
    Admin,
}

/// The running HTTP server.
pub(crate) struct HttpServer {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    ctx: Arc<Context>,
    acceptors: Vec<JoinHandle<()>>,
    /// A handle on each listening socket, to shut it down at stop.
    listeners: Vec<TcpListener>,
}

impl HttpServer {
    /// Starts accepting on already-bound listeners.
    pub fn start(
        listener: TcpListener,
        admin: Option<TcpListener>,
        ctx: Arc<Context>,
    ) -> io::Result<HttpServer> {
        let local_addr = listener.local_addr()?;
        let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let mut acceptors = Vec::new();
        let mut listeners = Vec::new();
        for (l, which, name) in [(Some(listener), Listener::Public, "http-accept")]
            .into_iter()
            .chain([(admin, Listener::Admin, "admin-accept")])
        {
            let Some(l) = l else { continue };
            listeners.push(l.try_clone()?);
            let actx = ctx.clone();
            acceptors.push(
                thread::Builder::new()
                    .name(name.into())
                    .spawn(move || accept_loop(l, actx, which))?,
            );
        }
        info!("HTTP listening on {local_addr}");
        if let Some(a) = admin_addr {
            info!("admin (/healthz, /metrics) listening on {a}");
        }
        Ok(HttpServer {
            local_addr,
            admin_addr,
            ctx,
            acceptors,
            listeners,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stops accepting new connections (open ones finish on their own).
    pub fn stop(&mut self) {
        self.ctx.shutting_down.store(true, Ordering::SeqCst);
        // Unblock accept() with a connection to ourselves.
        for mut wake in [Some(self.local_addr), self.admin_addr]
            .into_iter()
            .flatten()
        {
            if wake.ip().is_unspecified() {
                wake.set_ip(if wake.is_ipv4() {
                    [127, 0, 0, 1].into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        }
        // The connection cannot reach a listener whose address went away
        // (its interface or network namespace removed): shutting the
        // socket down wakes a blocked accept() on Linux all the same, so
        // a stop never waits forever.
        for l in &self.listeners {
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
        }
        for t in self.acceptors.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if !self.acceptors.is_empty() {
            self.stop();
        }
    }
}

/// A failing accept (out of descriptors) is logged at most every 10 s.
static ACCEPT_FAILED: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(Duration::from_secs(10));

fn accept_loop(listener: TcpListener, ctx: Arc<Context>, which: Listener) {
    let linger = linger::Linger::start();
    for stream in listener.incoming() {
        if ctx.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                ACCEPT_FAILED.log(Instant::now(), |more| {
                    warn!("accept failed: {e} ({more} more since the last line)")
                });
                ctx.metrics.outcome("accept_error");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_nodelay(true);
        let ip = stream
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        if !ctx.admit(which, ip) {
            ctx.metrics.outcome("rejected_connection_limit");
            let _ = Response::text(503, "too many signalling connections; retry shortly")
                .header("Retry-After", "1")
                .write_to(&mut stream);
            if !linger.close(stream) {
                ctx.metrics.outcome("refused_connection_reset");
            }
            continue;
        }
        ctx.metrics.signalling_connections.inc();
        let cctx = ctx.clone();
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                serve_connection(stream, &cctx, which);
                cctx.release(which, ip);
                cctx.metrics.signalling_connections.dec();
            });
        if let Err(e) = spawned {
            warn!("could not start a connection thread: {e}");
            ctx.release(which, ip);
            ctx.metrics.signalling_connections.dec();
        }
    }
    debug!("HTTP acceptor stopped");
}

fn serve_connection(mut stream: TcpStream, ctx: &Context, which: Listener) {
    let head_time = match which {
        Listener::Public => REQUEST_TIMEOUT,
        Listener::Admin => ADMIN_REQUEST_TIMEOUT,
    };
    let req = match request::read_request(&mut stream, Instant::now() + head_time) {
        Ok(r) => r,
        Err(e) => {
            debug!("bad request: {}", e.message);
            if let Some(status) = e.status {
                ctx.metrics.outcome("bad_request");
                let _ = Response::text(status, e.message).write_to(&mut stream);
            }
            return;
        }
    };
    if let Some(resp) = route(&mut stream, req, ctx, which) {
        if resp.status >= 400 {
            ctx.metrics.outcome(status_label(resp.status));
        }
        let _ = resp.write_to(&mut stream);
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        401 => "http_401",
        404 => "http_404",
        405 => "http_405",
        503 => "http_503",
        _ => "http_other_error",
    }
}

/// Dispatches a request; `None` when the handler wrote its own response
/// (the WebSocket upgrade).
fn route(stream: &mut TcpStream, req: Request, ctx: &Context, which: Listener) -> Option<Response> {
    let path = req.path.clone();
    let method = req.method.as_str();
    if which == Listener::Admin && !matches!(path.as_str(), "/healthz" | "/metrics") {
        return Some(Response::text(
            404,
            "the admin listener serves /healthz and /metrics only",
        ));
    }
    match (method, path.as_str()) {
        ("GET", "/connect") if !origin_allowed(&req, &ctx.limits.allowed_origins) => {
            Some(Response::text(403, "this Origin may not open /connect"))
        }
        ("GET", "/connect") => connect::serve(stream, req, ctx),
        (_, "/connect") => {
            Some(Response::text(405, "use GET /connect (WebSocket)").header("Allow", "GET"))
        }
        ("GET", "/") if ctx.dev => Some(Response::with_type(
            200,
            "text/html; charset=utf-8",
            DEMO_PAGE,
        )),
        ("GET", "/healthz") => Some(healthz(ctx)),
        ("GET", "/metrics") => Some(Response::with_type(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ctx.metrics.render(),
        )),
        (_, "/healthz" | "/metrics") => Some(Response::text(405, "use GET").header("Allow", "GET")),
        (m, p) if p.starts_with("/join/") || p == "/join" => {
            if m != "POST" {
                return Some(
                    Response::text(405, "use POST /join/:conversationid").header("Allow", "POST"),
                );
            }
            Some(join::serve(&req, ctx, &p["/join".len()..]))
        }
        _ => Some(Response::text(404, "not found")),
    }
}

/// True if the request carries no `Origin` (not a browser) or one on the list.
fn origin_allowed(req: &Request, allowed: &[String]) -> bool {
    match req.header("origin") {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(o) => allowed.iter().any(|a| a == o.trim().trim_end_matches('/')),
    }
}

fn healthz(ctx: &Context) -> Response {
    let stopping = ctx.shutting_down.load(Ordering::SeqCst);
    let loop_age = ctx.health.age();
    let stalled = loop_age > LOOP_STALE;
    let status = match (stopping, stalled) {
        (true, _) => "shutting_down",
        (false, true) => "media_loop_stalled",
        (false, false) => "ok",
    };
    let body = serde_json::json!({
        "status": status,
        "loop_age_ms": loop_age.as_millis() as u64,
        "peers": ctx.metrics.peers.get(),
        "peers_connected": ctx.metrics.peers_connected.get(),
        "conversations": ctx.metrics.conversations.get(),
        // The nodes this one sees, itself included (1 when alone).
        "cluster_nodes": ctx.metrics.cluster_nodes.get() + 1,
        // True when another process uses this node's id: this node then
        // stays out of the cluster (local calls go on) until restarted with
        // an id of its own.
        "cluster_duplicate_node_id": ctx.metrics.cluster_duplicate_node_id.get() == 1,
    });
    Response::with_type(
        if stopping || stalled { 503 } else { 200 },
        "application/json",
        body.to_string(),
    )
}
