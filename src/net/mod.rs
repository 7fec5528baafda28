//! The driver: the media loop that owns the socket and the core, and its
//! health pulse, and the heap trim it runs after a peak.

pub(crate) mod clock;
mod health;
mod media_loop;
mod memory;
mod tcp;
mod udp;

pub(crate) use health::{watch, LoopHealth};
pub(crate) use media_loop::{spawn, MediaLoopConfig};
pub(crate) use tcp::TcpLimits;
