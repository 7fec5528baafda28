//! The `beep-sfu` binary as an operator runs it: bad flags fail at start with
//! one line naming the flag, and SIGTERM stops it cleanly with exit 0.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_beep-sfu");

#[test]
fn invalid_values_fail_at_start_with_one_line_naming_the_flag() {
    for (args, flag) in [
        (vec!["--listen", "1.2.3.4"], "--listen"),
        (vec!["--udp", "127.0.0.1"], "--udp"),
        (
            vec!["--permissions-host", "ftp://x", "--udp", "127.0.0.1:0"],
            "--permissions-host",
        ),
        (
            vec!["--max-peers", "0", "--udp", "127.0.0.1:0"],
            "--max-peers",
        ),
        (vec!["--silence-dbov", "5", "--dev"], "--silence-dbov"),
        (vec!["--max-peers", "lots", "--dev"], "--max-peers"),
        (vec!["--no-such-flag", "--dev"], "--no-such-flag"),
        (
            vec!["--idle-timeout-secs", "18446744073709551615", "--dev"],
            "--idle-timeout-secs",
        ),
        (
            vec!["--connect-timeout-secs", "0", "--dev"],
            "--connect-timeout-secs",
        ),
        (vec!["--bite-max-ms", "99999999", "--dev"], "--bite-max-ms"),
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("LISTEN")
            .env_remove("UDP_LISTEN")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = std::env::temp_dir().join(format!("beep-sfu-bin-{}", std::process::id()));
    let dir_arg = dir.to_string_lossy().into_owned();
    let (mut child, addr) = common::spawn_binary(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--bites-dir",
        &dir_arg,
    ]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the dev server with a fault injected through an environment
/// variable that only a build with the test kit (this test's build) reads;
/// returns its exit code and stderr.
fn run_with_fault(fault: &str, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["--dev", "--listen", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
        .args(extra)
        .arg("--bites-dir")
        .arg(std::env::temp_dir().join(format!("beep-sfu-fault-{}", std::process::id())))
        .env(fault, "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_panic_on_the_media_loop_ends_the_process_with_a_clear_line_and_a_non_zero_exit() {
    let (code, err) = run_with_fault("BEEP_SFU_TEST_PANIC_LOOP", &[]);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains("media loop panicked"), "{err}");
    assert!(err.contains("exiting so the supervisor restarts"), "{err}");
}

#[test]
fn a_stalled_media_loop_is_noticed_and_ends_the_process() {
    let (code, err) = run_with_fault("BEEP_SFU_TEST_STALL_LOOP", &["--loop-stall-secs", "1"]);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains("has not turned for"), "{err}");
}

#[test]
fn a_bites_or_spool_directory_that_cannot_be_written_stops_the_start_with_a_clear_line() {
    // A path under a regular file: not even root can make it a directory.
    let file = std::env::temp_dir().join(format!("beep-sfu-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let under = file.join("bites");
    for flag in ["--bites-dir", "--spool-dir"] {
        let out = Command::new(BIN)
            .args(["--dev", "--listen", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
            .arg(flag)
            .arg(&under)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag}: it refused to start");
        assert!(
            err.contains(&format!("{flag} {}: cannot write there", under.display())),
            "{flag}: {err}"
        );
    }
    let _ = std::fs::remove_file(&file);
}
