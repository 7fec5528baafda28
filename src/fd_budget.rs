//! The process knows its file descriptors: at start the soft
//! `RLIMIT_NOFILE` is raised to the hard limit (both logged), and the caps
//! that hold descriptors (signalling connections, ICE-TCP connections,
//! lingering refused connections) plus a reserve for everything else (the
//! sockets, NATS, permission calls, spool files, logs) must fit under it,
//! or the server refuses to start with one line naming the flag to lower.
//! Running out anyway (EMFILE) would break accepts, permission calls, NATS
//! reconnects and spool writes at once.

use std::io;

/// Descriptors kept for what no cap counts: the media and listening
/// sockets, epoll, NATS connections, permission calls, spool and bite
/// files, the log, and threads' odds and ends.
pub(crate) const RESERVE: u64 = 128;

/// Raises the soft limit on open files to the hard limit; returns
/// (soft, hard) as they are afterwards.
pub(crate) fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Checks that `caps` (name, descriptors it may hold) plus [`RESERVE`]
/// fit under `limit`; the error names the largest cap that is a flag (a
/// name starting with `--`).
pub(crate) fn check(limit: u64, caps: &[(&str, u64)]) -> Result<u64, String> {
    let need = caps.iter().map(|(_, n)| n).sum::<u64>() + RESERVE;
    if need <= limit {
        return Ok(need);
    }
    let parts: Vec<String> = caps.iter().map(|(f, n)| format!("{f} {n}")).collect();
    let largest = caps
        .iter()
        .filter(|(f, _)| f.starts_with("--"))
        .max_by_key(|(_, n)| *n)
        .map_or("--max-signalling", |(f, _)| f);
    Err(format!(
        "file descriptors: {} plus a reserve of {RESERVE} need {need}, but this process may open {limit} (ulimit -n); lower {largest} or raise the limit",
        parts.join(" + ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caps_must_fit_and_the_error_names_the_flag() {
        assert_eq!(
            check(10_000, &[("--max-signalling", 256)]),
            Ok(256 + RESERVE)
        );
        let e = check(
            1_024,
            &[
                ("--max-signalling", 256),
                ("--max-tcp-connections", 1_024),
                ("lingering", 1_024),
            ],
        )
        .unwrap_err();
        assert!(e.contains("lower --max-tcp-connections"), "{e}");
        assert!(e.contains("1024"), "{e}");
        let (soft, hard) = raise_nofile().unwrap();
        assert_eq!(soft, hard, "the soft limit is raised to the hard one");
    }
}
