//! The HTTP side: an acceptor thread and a bounded set of blocking
//! connection threads serving `/connect` (WebSocket signalling), `/join`,
//! `/healthz` and `/metrics`.
//!
//! Each connection gets one request (responses close the connection). The
//! threads block on their own sockets, on permission checks and on replies
//! from the media loop, never the other way round.

pub mod claims;
pub mod connect;
pub mod join;
pub mod request;
pub mod response;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};

use crate::command::LoopHandle;
use crate::metrics::Metrics;
use crate::permissions::PermissionClient;
use request::Request;
use response::Response;

/// The demo page served at `/` in `--dev` (embedded: no build step, no CDN).
pub const DEMO_PAGE: &str = include_str!("demo.html");

/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection thread shares.
pub struct Context {
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
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Set when the service is stopping.
    pub shutting_down: AtomicBool,
    active: AtomicUsize,
}

impl Context {
    /// A context with no open connections.
    pub fn new(
        dev: bool,
        connect_timeout: Duration,
        handle: LoopHandle,
        permissions: Option<PermissionClient>,
        metrics: Arc<Metrics>,
        max_connections: usize,
    ) -> Self {
        Context {
            dev,
            connect_timeout,
            handle,
            permissions,
            metrics,
            max_connections,
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        }
    }
}

/// The running HTTP server.
pub struct HttpServer {
    local_addr: SocketAddr,
    ctx: Arc<Context>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts accepting on an already-bound listener.
    pub fn start(listener: TcpListener, ctx: Arc<Context>) -> io::Result<HttpServer> {
        let local_addr = listener.local_addr()?;
        let actx = ctx.clone();
        let acceptor = thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(listener, actx))?;
        info!("HTTP listening on {local_addr}");
        Ok(HttpServer {
            local_addr,
            ctx,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting new connections (open ones finish on their own).
    pub fn stop(&mut self) {
        self.ctx.shutting_down.store(true, Ordering::SeqCst);
        // Unblock accept() with a connection to ourselves.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop();
        }
    }
}

fn accept_loop(listener: TcpListener, ctx: Arc<Context>) {
    for stream in listener.incoming() {
        if ctx.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_nodelay(true);
        if ctx.active.fetch_add(1, Ordering::SeqCst) >= ctx.max_connections {
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            ctx.metrics.outcome("rejected_connection_limit");
            let _ = Response::text(503, "too many signalling connections; retry shortly")
                .header("Retry-After", "1")
                .write_to(&mut stream);
            continue;
        }
        ctx.metrics.signalling_connections.inc();
        let cctx = ctx.clone();
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                serve_connection(stream, &cctx);
                cctx.active.fetch_sub(1, Ordering::SeqCst);
                cctx.metrics.signalling_connections.dec();
            });
        if let Err(e) = spawned {
            warn!("could not start a connection thread: {e}");
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            ctx.metrics.signalling_connections.dec();
        }
    }
    debug!("HTTP acceptor stopped");
}

fn serve_connection(mut stream: TcpStream, ctx: &Context) {
    let req = match request::read_request(&mut stream) {
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
    if let Some(resp) = route(&mut stream, req, ctx) {
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
fn route(stream: &mut TcpStream, req: Request, ctx: &Context) -> Option<Response> {
    let path = req.path.clone();
    let method = req.method.as_str();
    match (method, path.as_str()) {
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

fn healthz(ctx: &Context) -> Response {
    let stopping = ctx.shutting_down.load(Ordering::SeqCst);
    let body = serde_json::json!({
        "status": if stopping { "shutting_down" } else { "ok" },
        "peers": ctx.metrics.peers.get(),
        "peers_connected": ctx.metrics.peers_connected.get(),
        "conversations": ctx.metrics.conversations.get(),
    });
    Response::with_type(
        if stopping { 503 } else { 200 },
        "application/json",
        body.to_string(),
    )
}
