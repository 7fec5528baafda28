//! A plain-UDP participant of the bare relay baseline: the same traffic as
//! a WebRTC participant, with no crypto and no WebRTC, so the relay's cost
//! is the machine's floor.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::UdpSocket;

use crate::participant::{parse, payload, record, Tally, Window};
use crate::voice::{self, Voice};

/// A plain-UDP participant of the bare relay baseline.
pub struct UdpParticipant {
    /// Index, also the sender id.
    pub id: u32,
    /// Group (room) id.
    pub room: u32,
    /// Its socket.
    pub socket: UdpSocket,
    relay: SocketAddr,
    seq: u32,
    /// What it measured.
    pub tally: Tally,
    buf: Vec<u8>,
    /// When it last sent a DTX frame.
    last_dtx: Option<Instant>,
}

impl UdpParticipant {
    /// Binds a socket and registers with the relay.
    pub fn new(
        id: u32,
        room: u32,
        relay: SocketAddr,
        bind_ip: std::net::IpAddr,
    ) -> std::io::Result<Self> {
        let s = std::net::UdpSocket::bind((bind_ip, 0))?;
        s.set_nonblocking(true)?;
        let p = UdpParticipant {
            id,
            room,
            socket: UdpSocket::from_std(s),
            relay,
            seq: 0,
            tally: Tally::default(),
            buf: vec![0; 2048],
            last_dtx: None,
        };
        // A registration datagram (the relay does not forward `REGISTER`).
        p.socket.send_to(
            &p.datagram(crate::relay::REGISTER, &payload(id, 0, 0)),
            relay,
        )?;
        Ok(p)
    }

    /// Tells the relay this participant is gone, so a later run's packets
    /// are not also sent to this run's closed sockets.
    pub fn leave(&self) {
        let d = self.datagram(crate::relay::LEAVE, &payload(self.id, 0, 0));
        let _ = self.socket.send_to(&d, self.relay);
    }

    /// The relay's header (room, sequence number), padding like an RTP
    /// header with the audio level extension, then `body`.
    fn datagram(&self, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(8 + 12 + body.len());
        d.extend_from_slice(&self.room.to_be_bytes());
        d.extend_from_slice(&seq.to_be_bytes());
        d.extend_from_slice(&[0u8; 12]);
        d.extend_from_slice(body);
        d
    }

    /// Sends `body` as the next packet.
    fn send(&mut self, body: &[u8]) {
        let d = self.datagram(self.seq, body);
        self.seq = self.seq.wrapping_add(1) % crate::relay::LEAVE;
        let _ = self.socket.send_to(&d, self.relay);
    }

    /// Reads everything waiting on the socket.
    pub fn on_readable(&mut self, epoch: Instant, window: Option<Window>) {
        loop {
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, _)) => {
                    let now = Instant::now();
                    if n >= 20 {
                        if let Some((_, sent)) = parse(&self.buf[20..n]) {
                            record(&mut self.tally, window, epoch, now, sent, false);
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Sends one packet of speech, or a DTX frame when one is due, as
    /// `voice` says.
    pub fn on_tick(&mut self, epoch: Instant, window: Option<Window>, voice: Voice) {
        if voice == Voice::Dtx && voice::dtx_due(&mut self.last_dtx, Instant::now()) {
            self.send(&voice::DTX_FRAME);
        }
        if voice != Voice::Talk {
            return;
        }
        let sent_ns = Instant::now().duration_since(epoch).as_nanos() as u64;
        if window.is_some_and(|w| w.contains(sent_ns)) {
            self.tally.sent_in_window += 1;
        }
        self.send(&payload(self.id, self.seq, sent_ns));
    }
}
