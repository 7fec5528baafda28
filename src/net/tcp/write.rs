//! The writing side of ICE-TCP connections: frames queued per connection
//! within a bound, written as far as the socket takes, the rest on
//! WRITABLE; a client that does not read is dropped.

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;

use log::debug;
use mio::{Interest, Registry, Token};

use super::TcpMedia;
use crate::metrics::Metrics;

impl TcpMedia {
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
}
