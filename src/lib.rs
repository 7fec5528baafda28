//! beep-sfu: a WebRTC Selective Forwarding Unit for Beep's voice
//! conversations.
//!
//! Clients exchange an SDP offer and answer over a WebSocket (`GET /connect`),
//! then join a conversation (`POST /join/:conversationid`). Everyone in a
//! conversation hears everyone else, never themselves, on as many streams
//! ("slots") as they offered receiving audio m-lines.
//!
//! # Shape
//! The core, [`sfu::Sfu`], is sans-IO like str0m's `Rtc`: it owns every
//! peer's `Rtc`, the conversations and the bites, and never touches a
//! socket, a thread or a clock. One loop drives it:
//!
//! ```ignore
//! loop {
//!     let timeout = sfu.poll_timeout();            // when to wake at the latest
//!     poll.poll(&mut events, timeout)?;             // the one place we wait
//!     while let Ok((n, src)) = socket.recv_from(&mut buf) {
//!         sfu.handle_datagram(Instant::now(), src, &buf[..n]);
//!     }
//!     for cmd in commands.try_iter() {              // from signalling threads
//!         let reply = sfu.handle_request(Instant::now(), cmd.request);
//!         cmd.reply.map(|r| r.try_send(reply));
//!     }
//!     sfu.handle_timeout(Instant::now());
//!     while let Some(t) = sfu.poll_transmit() { socket.send_to(&t.contents, t.destination)?; }
//!     while let Some(e) = sfu.poll_event() { /* notify sessions, hand bites to the sink */ }
//! }
//! ```
//!
//! # Threads
//! - **The media loop** (`net`): one thread, one `mio::Poll`, one UDP socket,
//!   the loop above. It never blocks: no network call, file write or lock wait.
//! - **Signalling** (`http`): an acceptor and a bounded set of blocking
//!   connection threads for `/connect`, `/join`, `/healthz`, `/metrics`.
//!   Each WebSocket session is a sans-IO state machine (`signalling`) driven
//!   by its thread; permission checks (`permissions`) run there too.
//! - **The bite sink** (`sink`): one thread that publishes finished bites to
//!   NATS (with a connector thread for the blocking first connect) and writes
//!   them as files.
//! - They talk to the loop only through bounded `crossbeam-channel` queues
//!   (`command` into the loop, `sink::BiteQueue` out of it), waking it with a
//!   `mio::Waker`; the loop never waits on them.
//!
//! # Where things happen
//! A datagram enters in `net::media_loop`, is routed in `sfu::peer::table`
//! (by `sfu::peer::demux`), the forwarding decision is made in
//! `sfu::conversation` (`conversation::speaker` chooses who is heard) and
//! carried out by `sfu::peer` (`peer::slot` rewrites headers), bites are cut
//! in `sfu::bite` and written as Ogg Opus by `sink::bite_file`, and NATS is
//! written in `sink::nats`. With the `test-kit` feature, `testkit` wires
//! str0m clients to the core in memory for tests, benchmarks and the load
//! generator.

#![warn(missing_docs)]

mod cluster;
mod command;
pub mod config;
mod fd_budget;
mod http;
mod log_limit;
pub mod metrics;
mod nats_connect;
mod net;
mod permissions;
pub mod proto;
pub mod server;
pub mod sfu;
mod signalling;
mod sink;
#[cfg(feature = "test-kit")]
pub mod testkit;
