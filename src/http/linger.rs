//! Closes refused connections gracefully. A socket closed with bytes of the
//! client's request still unread makes the kernel send a reset instead of a
//! FIN, and a client that has not read our 503 yet then sees "connection
//! reset" instead of "retry shortly". So a refused connection gets its
//! answer, a half-close, and a short wait on this thread (reading and
//! discarding) until the client closes too. Bounded in count, bytes and
//! time: past the bounds the connection is simply dropped.

use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, warn};

/// Refused connections waiting to close at once; more are dropped (reset).
/// They hold descriptors: twice this (queued and lingering) is counted in
/// the fd budget.
pub(crate) const MAX_LINGERING: usize = 512;
/// How long a refused client has to close its side.
const LINGER_FOR: Duration = Duration::from_secs(2);
/// Most bytes read (and discarded) from one refused client.
const MAX_DISCARD: usize = 64 * 1024;
/// How often the lingering sockets are read.
const SWEEP: Duration = Duration::from_millis(10);

/// The acceptor's end: hands refused connections to the linger thread.
pub(crate) struct Linger {
    tx: Option<Sender<TcpStream>>,
}

struct Lingering {
    stream: TcpStream,
    until: Instant,
    discarded: usize,
}

impl Linger {
    /// Starts the linger thread (if it cannot start, refused connections
    /// are closed at once, as before).
    pub fn start() -> Linger {
        let (tx, rx) = crossbeam_channel::bounded(MAX_LINGERING);
        match thread::Builder::new()
            .name("http-linger".into())
            .spawn(move || run(rx))
        {
            Ok(_) => Linger { tx: Some(tx) },
            Err(e) => {
                warn!("cannot start the linger thread ({e}); refused connections will be reset");
                Linger { tx: None }
            }
        }
    }

    /// Half-closes a connection whose answer is written and lets it drain;
    /// false if it had to be dropped at once (too many lingering).
    pub fn close(&self, stream: TcpStream) -> bool {
        let _ = stream.shutdown(Shutdown::Write);
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        match &self.tx {
            Some(tx) => match tx.try_send(stream) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            },
            None => false,
        }
    }
}

fn run(rx: Receiver<TcpStream>) {
    let mut open: Vec<Lingering> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if open.is_empty() {
            // Nothing to sweep: sleep until a refusal arrives.
            match rx.recv() {
                Ok(s) => open.push(lingering(s)),
                Err(_) => return,
            }
        }
        while open.len() < MAX_LINGERING {
            match rx.try_recv() {
                Ok(s) => open.push(lingering(s)),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        open.retain_mut(|l| keep_open(l, now, &mut buf));
        thread::sleep(SWEEP);
    }
}

fn lingering(stream: TcpStream) -> Lingering {
    Lingering {
        stream,
        until: Instant::now() + LINGER_FOR,
        discarded: 0,
    }
}

/// Reads what the client sent; false once it closed, sent too much or took
/// too long (the socket is then closed by dropping it).
fn keep_open(l: &mut Lingering, now: Instant, buf: &mut [u8]) -> bool {
    loop {
        match l.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                l.discarded += n;
                if l.discarded > MAX_DISCARD {
                    debug!("refused client kept sending; closing");
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return now < l.until,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}
