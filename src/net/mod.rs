//! The media loop: the only code that touches the media socket.

pub mod media_loop;

pub use media_loop::{spawn, MediaLoopConfig};
