//! The media socket's address rules: IPv4 clients on a dual-stack socket
//! are seen unmapped by the core and sent to mapped again.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;

use mio::net::UdpSocket;

/// An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; the
/// core (and str0m's ICE) sees it as the IPv4 address it is.
pub(super) fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Sends one datagram, retrying on EINTR.
pub(super) fn send_to(
    socket: &UdpSocket,
    v6_socket: bool,
    buf: &[u8],
    to: SocketAddr,
) -> io::Result<()> {
    // On a dual-stack (IPv6) socket an IPv4 destination is sent mapped.
    let to = match to {
        SocketAddr::V4(v4) if v6_socket => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    };
    loop {
        match socket.send_to(buf, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
