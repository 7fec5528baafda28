//! The test kit, compiled only with the `test-kit` feature (str0m's
//! `_internal_test_exports` is the model): one Opus WebRTC client for every
//! test, bench and the load generator ([`OpusClient`]), the in-memory
//! [`Harness`] that wires such clients to the core, and the bench hooks
//! into the core's internals ([`internals`]), and what the benches and the
//! allocation test build alike ([`load`]), and headless Chromium for the
//! browser test and the loss bench ([`chromium`]). The server binary never
//! contains it.

pub mod chromium;
mod client;
pub mod forge;
pub mod fuzz;
mod harness;
pub mod load;

pub use crate::sfu::internals;
pub use crate::sfu::test_rng::xorshift;
pub use client::{ClientOutput, OpusClient};
pub use harness::{is_rtp, Client, Harness, Leg, Loss, Received};
