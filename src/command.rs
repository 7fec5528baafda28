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
use crate::sfu::{CloseReason, Reply, Request};

/// Depth of the command queue into the media loop.
pub(crate) const COMMAND_QUEUE: usize = 4096;

/// What a peer's signalling session hears about its peer from the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerNotice {
    /// ICE and DTLS are up.
    Connected,
    /// The peer was removed.
    Closed(CloseReason),
}

/// One request to the media loop: the core's plain [`Request`], paired
/// with where its [`Reply`] goes and, for a connect, where later news about
/// the peer goes.
#[derive(Debug)]
pub(crate) struct Command {
    /// What the core is asked.
    pub request: Request,
    /// Where the reply goes (`None`: nobody waits for it).
    pub reply: Option<Sender<Reply>>,
    /// For a connect: where notices about the new peer go.
    pub notices: Option<Sender<PeerNotice>>,
}

impl Command {
    /// A request whose reply nobody waits for.
    pub fn fire(request: Request) -> Self {
        Command {
            request,
            reply: None,
            notices: None,
        }
    }
}

/// Error returned when the loop's queue is full or the loop is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The queue is full: the loop is overloaded.
    Full,
    /// The loop has stopped.
    Stopped,
}

/// A cloneable handle side threads use to reach the media loop.
#[derive(Clone)]
pub(crate) struct LoopHandle {
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
pub(crate) fn queue() -> (Sender<Command>, Receiver<Command>) {
    crossbeam_channel::bounded(COMMAND_QUEUE)
}
