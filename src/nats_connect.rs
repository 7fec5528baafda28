//! Connecting to NATS without blocking anyone. The synchronous `nats`
//! client's `connect` blocks until a server answers (even with
//! `retry_on_failed_connect`), so it runs on a thread of its own; the
//! connection arrives on a channel, and a flag follows the client's
//! disconnect and reconnect callbacks. The bite sink and the cluster each
//! hold one such connection.

// The owner named the synchronous `nats` crate (see sink/nats.rs).
#![allow(deprecated)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::Receiver;
use log::warn;

/// A connection on its way, and whether it is up.
pub(crate) struct Connecting {
    /// Yields the connection once a server answered.
    pub conn: Receiver<nats::Connection>,
    /// True while the client is connected (set by its callbacks; the taker
    /// sets it when the first connection arrives).
    pub connected: Arc<AtomicBool>,
}

/// How a client proves who it is to NATS, besides what the URL carries
/// (user and password, or a token): a credentials file, and a CA for TLS.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A `.creds` file (JWT and nkey seed).
    pub creds: Option<PathBuf>,
    /// A PEM CA certificate to verify the server with.
    pub ca: Option<PathBuf>,
}

/// How to connect and what to do when the connection drops or returns.
pub(crate) struct Dial<D, U> {
    /// The connecting thread's name.
    pub thread: &'static str,
    /// The client name the server sees.
    pub client: &'static str,
    /// The server's URL.
    pub url: String,
    /// Credentials and TLS trust.
    pub auth: NatsAuth,
    /// Bytes the client may buffer while reconnecting (`None`: its default).
    pub reconnect_buffer: Option<usize>,
    /// Called when the connection drops (after the flag is cleared).
    pub on_down: D,
    /// Called when it is back (after the flag is set).
    pub on_up: U,
}

/// Starts connecting in the background and returns at once; retries
/// forever, with a back-off of 100 ms per attempt up to 1 s.
pub(crate) fn start<D, U>(dial: Dial<D, U>) -> Connecting
where
    D: Fn() + Send + Sync + 'static,
    U: Fn() + Send + Sync + 'static,
{
    let connected = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (down, up) = (connected.clone(), connected.clone());
    let Dial {
        thread,
        client,
        url,
        auth,
        reconnect_buffer,
        on_down,
        on_up,
    } = dial;
    let spawned = thread::Builder::new().name(thread.into()).spawn(move || {
        let mut opts = match &auth.creds {
            Some(path) => nats::Options::with_credentials(path),
            None => nats::Options::new(),
        };
        if let Some(ca) = &auth.ca {
            opts = opts.add_root_certificate(ca);
        }
        let mut opts = opts
            .with_name(client)
            .retry_on_failed_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|n| Duration::from_millis((100 * n as u64).min(1000)))
            .disconnect_callback(move || {
                down.store(false, Ordering::SeqCst);
                on_down();
            })
            .reconnect_callback(move || {
                up.store(true, Ordering::SeqCst);
                on_up();
            });
        if let Some(b) = reconnect_buffer {
            opts = opts.reconnect_buffer_size(b);
        }
        match opts.connect(url.as_str()) {
            Ok(c) => {
                let _ = tx.send(c);
            }
            Err(e) => warn!("NATS {url}: {e}"),
        }
    });
    if let Err(e) = spawned {
        warn!("cannot start the NATS connector thread {thread}: {e}");
    }
    Connecting {
        conn: rx,
        connected,
    }
}
