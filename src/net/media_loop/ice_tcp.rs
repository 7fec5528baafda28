//! The media loop's ICE-TCP turn: accepts, then connections with data
//! read round-robin within a per-turn budget, each quantum's frames handed
//! to the core at once (`net/tcp/` owns the connections).

use std::time::Instant;

use mio::Events;
use str0m::net::Protocol;

use super::{MediaLoop, TCP_LISTENER};
use crate::net::tcp::TcpMedia;

/// Bytes read off all ICE-TCP connections together per turn (about 256 KB
/// a turn: the UDP socket's 512 datagrams get their turn in between).
const TCP_TURN_BUDGET: usize = 256 * 1024;
/// Frames taken off ICE-TCP connections per turn (each may cost a trip
/// into the core): about 40 clients' worth of a second of audio.
const TCP_TURN_FRAMES: usize = 2_048;

impl MediaLoop {
    /// Accepts and reads ICE-TCP connections for one turn: connections
    /// with data are served round-robin, a quantum each, up to
    /// [`TCP_TURN_BUDGET`] bytes in all; each quantum's frames go to the
    /// core before the next connection is read. True if more wait.
    pub(super) fn handle_tcp_events(&mut self, events: &Events) -> bool {
        let Some(tcp) = &mut self.tcp else {
            return false;
        };
        let registry = self.poll.registry();
        for e in events.iter() {
            let token = e.token();
            if token == TCP_LISTENER {
                tcp.listener_ready();
            } else if tcp.owns(token) {
                let readable = e.is_readable() || e.is_read_closed() || e.is_error();
                tcp.on_event(token, readable, e.is_writable(), registry, &self.metrics);
            }
        }
        tcp.accept(registry, Instant::now(), &self.metrics);
        let (mut bytes, mut taken) = (0, 0);
        let mut frames = std::mem::take(&mut self.tcp_frames);
        while bytes < TCP_TURN_BUDGET && taken < TCP_TURN_FRAMES {
            let Some(tcp) = &mut self.tcp else { break };
            let Some(token) = tcp.next_ready() else { break };
            let (b, f) = tcp.read(token, self.poll.registry(), &mut frames, &self.metrics);
            bytes += b.max(1);
            taken += f;
            for (remote, frame) in frames.drain(..) {
                let now = Instant::now();
                let taken = self.sfu.handle_receive(now, Protocol::Tcp, remote, &frame);
                if let Some(tcp) = &mut self.tcp {
                    tcp.frame_outcome(remote, taken, self.poll.registry(), &self.metrics);
                }
                self.send_transmits();
            }
        }
        self.tcp_frames = frames;
        self.tcp.as_ref().is_some_and(TcpMedia::has_more)
    }
}
