//! The bare UDP fan-out relay: the floor beep-sfu is compared with. It reads
//! a datagram, looks up the sender's group (first 4 bytes) and sends the
//! datagram to every other member: no crypto, no WebRTC, one blocking socket.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};

/// The sequence number of a registration datagram (not forwarded).
pub const REGISTER: u32 = u32::MAX;
/// The sequence number of a leave datagram: the sender is removed from its
/// group. Without it a second run against the same relay would also be sent
/// to the first run's closed sockets, and the floor would look dearer.
pub const LEAVE: u32 = u32::MAX - 1;

/// Serves forever.
pub fn serve(listen: SocketAddr) -> io::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    eprintln!("bare UDP relay on {}", socket.local_addr()?);
    let mut groups: HashMap<u32, Vec<SocketAddr>> = HashMap::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        if n < 8 {
            continue;
        }
        let group = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let seq = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let members = groups.entry(group).or_default();
        if seq == LEAVE {
            members.retain(|m| *m != from);
            continue;
        }
        if !members.contains(&from) {
            members.push(from);
        }
        if seq == REGISTER {
            continue;
        }
        for to in members.iter().filter(|m| **m != from) {
            let _ = socket.send_to(&buf[..n], to);
        }
    }
}
