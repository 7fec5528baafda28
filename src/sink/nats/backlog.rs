//! The backlog's intake: a finished bite becomes its two messages (split
//! first if the server's `max_payload` could not take it), and an
//! overflowing backlog drops the oldest bite not yet started, never the one
//! in flight.

use std::time::{Duration, Instant};

use log::{debug, warn};
use prost::Message;

use super::{to_proto, Encoded, InFlight, NatsPublisher, Stage};
use crate::log_limit::LogLimit;
use crate::sfu::FinishedBite;

/// An overflowing backlog is logged at most once a second.
static BACKLOG_FULL: LogLimit = LogLimit::new(Duration::from_secs(1));

impl NatsPublisher {
    /// Queues a bite, dropping the oldest ones if the backlog is over its bound.
    /// A bite whose message would exceed the server's `max_payload` is
    /// split in two (recursively) rather than refused by the server.
    pub fn enqueue(&mut self, b: &FinishedBite, ogg: &[u8]) {
        let bite = to_proto(b, ogg);
        // The Store message carries the whole Bite, so it is the larger.
        let size = bite.encoded_len() + 16;
        if size > self.max_payload {
            match crate::sink::bite_file::split(b) {
                Some((x, y)) => {
                    debug!(
                        "bite of {} bytes is over NATS max_payload {}: split",
                        size, self.max_payload
                    );
                    self.metrics.bites_split.inc();
                    self.enqueue(&x, &crate::sink::bite_file::to_ogg(&x.audio));
                    self.enqueue(&y, &crate::sink::bite_file::to_ogg(&y.audio));
                }
                None => {
                    self.metrics.bite_dropped("too_large_for_nats");
                    warn!(
                        "a one-packet bite of {size} bytes is over NATS max_payload {}; dropped",
                        self.max_payload
                    );
                }
            }
            return;
        }
        self.push(Encoded::new(&bite, false, None));
    }

    pub(super) fn push(&mut self, e: Encoded) {
        self.backlog_bytes += e.size();
        self.backlog.push_back(e);
        while self.backlog_bytes > self.config.backlog_bytes {
            let front_started = matches!(self.in_flight, Some(InFlight::Front(_)))
                || self.backlog.front().is_some_and(|f| f.stage != Stage::Bite);
            let Some(old) = overflow_victim(self.backlog.len(), front_started)
                .and_then(|i| self.backlog.remove(i))
            else {
                break;
            };
            self.backlog_bytes -= old.size();
            self.metrics.bite_dropped("nats_backlog_full");
            let (bound, size) = (self.config.backlog_bytes, old.size());
            BACKLOG_FULL.log(Instant::now(), |more| {
                warn!(
                    "NATS backlog over {bound} bytes: dropped the oldest bite not yet sent ({size} bytes; {more} more dropped since the last line)"
                )
            });
        }
        self.publish_gauges();
    }
}

/// Which bite an over-full backlog of `len` drops: the oldest not started
/// (the front only if nothing of it went out yet); `None` when one bite is
/// left (a bite larger than the whole backlog is still kept).
pub(super) fn overflow_victim(len: usize, front_started: bool) -> Option<usize> {
    (len > 1).then_some(usize::from(front_started))
}
