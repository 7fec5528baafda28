//! The spool: what the backlog still holds at exit (a clean stop, or the
//! panic and stall exits) is written to `--spool-dir`, one file per bite,
//! and read back and published at the next start. A file is removed only
//! once its bite is published.

use std::path::PathBuf;

use log::{info, warn};
use prost::Message;

use super::{Encoded, NatsPublisher};
use crate::proto::Bite;

impl NatsPublisher {
    /// Writes what is still in the backlog to the spool directory (one file
    /// per bite, the `Bite` message; `.store` if only the `Store` message is
    /// left to send). Returns how many bites were spooled; the rest are lost
    /// and counted.
    pub fn spool(&mut self) -> usize {
        let Some(dir) = self.config.spool_dir.clone() else {
            return 0;
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!("cannot create the spool directory {}: {e}", dir.display());
            return 0;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut written = 0;
        while let Some(e) = self.backlog.pop_front() {
            self.backlog_bytes -= e.size();
            if e.spooled.is_some() {
                written += 1; // still on disk from the last run
                continue;
            }
            let ext = if e.bite_acked { "store" } else { "bite" };
            let path = dir.join(format!("{stamp}-{written:06}.{ext}"));
            let tmp = path.with_extension("part");
            match std::fs::write(&tmp, &e.bite).and_then(|_| std::fs::rename(&tmp, &path)) {
                Ok(()) => written += 1,
                Err(err) => {
                    self.metrics.bite_dropped("spool_write_error");
                    warn!("cannot spool a bite to {}: {err}", path.display());
                }
            }
        }
        self.publish_gauges();
        written
    }

    /// Puts the bites spooled by an earlier run at the front of the backlog.
    pub(super) fn load_spool(&mut self) {
        let Some(dir) = self.config.spool_dir.clone() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("bite" | "store")
                )
            })
            .collect();
        files.sort();
        for path in files {
            let bite_acked = path.extension().is_some_and(|x| x == "store");
            let decoded = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| Bite::decode(b.as_slice()).map_err(|e| e.to_string()));
            match decoded {
                Ok(bite) => self.push(Encoded::new(&bite, bite_acked, Some(path))),
                Err(e) => warn!("skipping unreadable spool file {}: {e}", path.display()),
            }
        }
        if !self.backlog.is_empty() {
            info!(
                "{} spooled bite(s) from an earlier run will be published",
                self.backlog.len()
            );
        }
    }
}
