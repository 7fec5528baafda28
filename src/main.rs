//! The `beep-sfu` binary: configuration, logging, signals; everything else
//! lives in the library (see its crate documentation).

use std::process::ExitCode;

use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use beep_sfu::config::Config;
use beep_sfu::server::Server;

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("beep-sfu: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if config.dev {
        warn!("DEV MODE: every join is allowed without a permissions check, claims are taken from the query string, and NATS is not used. Not for production.");
    }
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(&config) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(
        "beep-sfu {} ready: http://{}",
        env!("CARGO_PKG_VERSION"),
        server.http_addr()
    );
    if let Some(sig) = signals.forever().next() {
        info!("signal {sig} received; shutting down");
    }
    // A second signal during shutdown exits at once.
    let handle = signals.handle();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            std::process::exit(130);
        }
    });
    let clean = server.shutdown();
    handle.close();
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
