//! Messages from the side threads to the media loop, and the handle that
//! sends them: a bounded queue plus a `mio::Waker`.
//!
//! Replies travel back on small bounded channels the sender creates, so the
//! loop never waits on a side thread: it uses `try_send` and counts what it
//! could not deliver.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::warn;
use mio::Waker;

use crate::metrics::Metrics;
use crate::sfu::{CloseReason, Reply, Request};

/// Depth of the command queue into the media loop (connects, joins).
pub(crate) const COMMAND_QUEUE: usize = 4096;
/// Depth of the separate queue for trickled candidates, so a candidate
/// flood can never crowd out anyone's connect or join.
pub(crate) const CANDIDATE_QUEUE: usize = 1024;

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
    candidates: Sender<Command>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// The loop's ends of the queues, and its stop flag.
pub(crate) struct LoopInbox {
    /// Connects, joins.
    pub commands: Receiver<Command>,
    /// Trickled candidates.
    pub candidates: Receiver<Command>,
    /// Set to stop the loop: a flag and a wake, never a queued command that
    /// a full queue could refuse.
    pub stop: Arc<AtomicBool>,
}

impl LoopHandle {
    /// The queues between side threads and the loop, around its waker.
    pub fn new(waker: Arc<Waker>, metrics: Arc<Metrics>) -> (Self, LoopInbox) {
        let (tx, commands) = crossbeam_channel::bounded(COMMAND_QUEUE);
        let (ctx, candidates) = crossbeam_channel::bounded(CANDIDATE_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = LoopHandle {
            tx,
            candidates: ctx,
            waker,
            stop: stop.clone(),
            metrics,
        };
        let inbox = LoopInbox {
            commands,
            candidates,
            stop,
        };
        (handle, inbox)
    }

    /// Asks the loop to close every peer, flush every bite and stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the media loop to stop it: {e}");
        }
    }

    /// Wakes the loop (input of its own is waiting, e.g. from the cluster).
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the media loop: {e}");
        }
    }

    /// Queues a command and wakes the loop; never blocks.
    pub fn send(&self, cmd: Command) -> Result<(), SendError> {
        let queue = match cmd.request {
            Request::Candidate { .. } => &self.candidates,
            _ => &self.tx,
        };
        match queue.try_send(cmd) {
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
