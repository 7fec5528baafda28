//! beep-sfu: a single-node WebRTC Selective Forwarding Unit for Beep's voice
//! conversations.
//!
//! Clients exchange an SDP offer and answer over a WebSocket (`GET /connect`),
//! then join a conversation (`POST /join/:conversationid`). Everyone in a
//! conversation hears everyone else, never themselves.
//!
//! # Threads
//! - **The media loop** (`net`): one thread, one `mio::Poll`, one UDP socket.
//!   It owns the [`sfu::Sfu`] core and is the only place datagrams are read or
//!   sent. It never blocks: no network call, file write or lock wait.
//! - **Signalling** (`http`): an acceptor and a bounded set of blocking
//!   connection threads for `/connect`, `/join`, `/healthz`, `/metrics`.
//!   Permission checks (`permissions`) run on those threads.
//! - **The bite sink** (`sink`): one thread that publishes finished bites to
//!   NATS (with a connector thread for the blocking first connect) and writes
//!   them as files.
//! - They talk to the loop only through bounded `crossbeam-channel` queues
//!   (`command` into the loop, `sink::BiteQueue` out of it), waking it with a
//!   `mio::Waker`; the loop never waits on them.
//!
//! # Where things happen
//! A datagram enters in `net::media_loop`, is demultiplexed in `sfu::demux`,
//! the forwarding decision is made in `sfu` (`Sfu::on_rtp`, with
//! `sfu::speaker` choosing who is heard and `sfu::slot` rewriting headers),
//! bites are cut in `sfu::bite` and written as Ogg Opus by `ogg_opus`, and
//! NATS is written in `sink::nats`. `harness` wires str0m clients to the core
//! in memory for the tests and benchmarks.

pub mod command;
pub mod config;
pub mod harness;
pub mod http;
pub mod metrics;
pub mod net;
pub mod ogg_opus;
pub mod permissions;
pub mod proto;
pub mod server;
pub mod sfu;
pub mod signalling;
pub mod sink;
