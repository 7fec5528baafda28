//! Messages from the side threads to the media loop, and the handle that
//! sends them: a bounded queue plus a `mio::Waker`.
//!
//! Replies travel back on small bounded channels the sender creates, so the
//! loop never waits on a side thread: it uses `try_send` and counts what it
//! could not deliver.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::warn;
use mio::Waker;

use crate::metrics::Metrics;
use crate::sfu::{Claim, CloseReason, ConnectError, JoinError, PeerId};

/// Depth of the command queue into the media loop.
pub const COMMAND_QUEUE: usize = 4096;

/// What a peer's signalling session hears about its peer from the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerNotice {
    /// ICE and DTLS are up.
    Connected,
    /// The peer was removed.
    Closed(CloseReason),
}

/// One request to the media loop.
#[derive(Debug)]
pub enum Command {
    /// Create a peer from an SDP offer.
    Connect {
        /// Who is connecting.
        claim: Claim,
        /// The SDP offer text.
        offer: String,
        /// Where the answer (or the refusal) goes.
        reply: Sender<Result<(PeerId, String), ConnectError>>,
        /// Where later news about the peer goes.
        notices: Sender<PeerNotice>,
    },
    /// A trickled remote ICE candidate.
    Candidate {
        /// For which peer.
        peer: PeerId,
        /// The candidate line.
        candidate: String,
    },
    /// Move a user's clients into a conversation (permission already checked).
    Join {
        /// The user.
        userid: String,
        /// The conversation id.
        conversation: String,
        /// Where the outcome goes.
        reply: Sender<Result<(), JoinError>>,
    },
    /// Close every peer and stop.
    Shutdown,
}

/// Error returned when the loop's queue is full or the loop is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full: the loop is overloaded.
    Full,
    /// The loop has stopped.
    Stopped,
}

/// A cloneable handle side threads use to reach the media loop.
#[derive(Clone)]
pub struct LoopHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    metrics: Arc<Metrics>,
}

impl LoopHandle {
    /// A handle over a queue and the loop's waker.
    pub fn new(tx: Sender<Command>, waker: Arc<Waker>, metrics: Arc<Metrics>) -> Self {
        LoopHandle { tx, waker, metrics }
    }

    /// Queues a command and wakes the loop; never blocks.
    pub fn send(&self, cmd: Command) -> Result<(), SendError> {
        match self.tx.try_send(cmd) {
            Ok(()) => {
                if let Err(e) = self.waker.wake() {
                    warn!("could not wake the media loop: {e}");
                }
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.commands_dropped.inc();
                warn!("media loop command queue is full; request refused");
                Err(SendError::Full)
            }
            Err(TrySendError::Disconnected(_)) => Err(SendError::Stopped),
        }
    }
}

/// The queue's two ends.
pub fn queue() -> (Sender<Command>, Receiver<Command>) {
    crossbeam_channel::bounded(COMMAND_QUEUE)
}
