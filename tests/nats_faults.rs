//! Bites under a NATS server that hangs rather than dies: frozen with
//! SIGSTOP mid-spurt (as a hung server or a network black hole looks to a
//! client) and thawed again. A bite counts as published only once the
//! server has it, and none is lost; a backlog that overflows meanwhile
//! drops only bites not yet in flight, and the counts add up.

#![allow(deprecated)] // the synchronous `nats` crate, used here as a subscriber

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prost::Message as _;

use beep_sfu::proto::Bite;

/// The distinct bites (user, start) seen, and the messages in all.
type Seen = Arc<Mutex<(HashSet<(String, u64)>, usize)>>;

/// Every distinct bite (user, start) that arrived on `bite`, and how many
/// messages arrived in all (duplicates are allowed, losses are not).
fn collect_bites(url: &str) -> (nats::Connection, Seen) {
    let nc = nats::connect(url).expect("nats connects");
    let seen = Arc::new(Mutex::new((HashSet::new(), 0)));
    let s = seen.clone();
    nc.subscribe("bite").unwrap().with_handler(move |m| {
        if let (Ok(b), Ok(mut s)) = (Bite::decode(m.data.as_slice()), s.lock()) {
            let user = b.client.map(|c| c.key).unwrap_or_default();
            s.0.insert((user, b.start));
            s.1 += 1;
        }
        Ok(())
    });
    nc.flush().unwrap();
    (nc, seen)
}

fn distinct(seen: &Seen) -> usize {
    seen.lock().map(|s| s.0.len()).unwrap_or(0)
}

fn talk(peers: &mut [&mut TestPeer], sender: u8, range: std::ops::Range<u32>) {
    for n in range {
        peers[0].send(&payload(sender, n), -20);
        pump_for(peers, Duration::from_millis(20));
    }
    // The silence that ends the bite.
    pump_for(peers, Duration::from_millis(900));
}

fn server(url: &str, backlog_bytes: usize, jetstream: bool) -> beep_sfu::server::Server {
    init_log();
    let mut cfg = test_config(true, "");
    cfg.nats = Some(url.to_string());
    cfg.nats_backlog_bytes = backlog_bytes;
    cfg.nats_jetstream = jetstream;
    beep_sfu::server::Server::start(&cfg).expect("server starts")
}

fn published(http: std::net::SocketAddr) -> f64 {
    metric(http, "beep_sfu_bites_published_total").unwrap_or(-1.0)
}

#[test]
fn nats_frozen_mid_spurt_loses_no_bite_and_counts_none_before_the_server_has_it() {
    let nats = NatsServer::start();
    let (_sub, seen) = collect_bites(&nats.url());
    let server = server(&nats.url(), 64 << 20, false);
    let http = server.http_addr();
    let (mut a, mut b) = two_in_room(http);
    talk(&mut [&mut a, &mut b], 1, 0..25);
    assert!(wait_for(Duration::from_secs(10), || published(http) == 1.0
        && distinct(&seen) == 1));
    // Freeze NATS in the middle of the second spurt, and finish it and a
    // third while it is frozen.
    for n in 100..110 {
        a.send(&payload(1, n), -20);
        pump_for(&mut [&mut a, &mut b], Duration::from_millis(20));
    }
    nats.pause();
    talk(&mut [&mut a, &mut b], 1, 110..125);
    talk(&mut [&mut a, &mut b], 1, 200..225);
    pump_for(&mut [&mut a, &mut b], Duration::from_secs(4));
    assert_eq!(
        published(http),
        1.0,
        "a bite counted as published while the server was frozen"
    );
    assert!(metric(http, "beep_sfu_bite_backlog ").unwrap_or(0.0) >= 2.0);
    nats.resume();
    assert!(
        wait_for(Duration::from_secs(30), || published(http) == 3.0
            && distinct(&seen) == 3),
        "published {}, arrived {} distinct",
        published(http),
        distinct(&seen)
    );
    assert_eq!(metric(http, "beep_sfu_bite_backlog "), Some(0.0));
}

#[test]
fn a_backlog_overflow_drops_only_bites_not_in_flight_and_the_counts_add_up() {
    let nats = NatsServer::start();
    // JetStream: a publish stays in flight until the server acknowledges
    // it, so the overflow below happens while one is in flight.
    let js = nats::jetstream::new(nats::connect(nats.url()).expect("nats connects"));
    js.add_stream(nats::jetstream::StreamConfig {
        name: "BITES".into(),
        subjects: vec!["bite".into(), "store".into()],
        ..Default::default()
    })
    .expect("stream created");
    let (_sub, seen) = collect_bites(&nats.url());
    // Room for about two short bites.
    let server = server(&nats.url(), 8 * 1024, true);
    let http = server.http_addr();
    let (mut a, mut b) = two_in_room(http);
    talk(&mut [&mut a, &mut b], 1, 0..20);
    assert!(wait_for(Duration::from_secs(10), || distinct(&seen) == 1));
    nats.pause();
    // Eight bites while the server hangs: the first goes in flight, the
    // backlog overflows behind it.
    for k in 1..9u32 {
        talk(&mut [&mut a, &mut b], 1, k * 100..k * 100 + 20);
    }
    let dropped = || metric_sum(http, "beep_sfu_bites_dropped_total", "nats_backlog_full");
    assert!(dropped() >= 1.0, "the backlog overflowed");
    nats.resume();
    let finished = || metric(http, "beep_sfu_bites_total").unwrap_or(-1.0);
    assert!(
        wait_for(Duration::from_secs(30), || metric(
            http,
            "beep_sfu_bite_backlog "
        ) == Some(0.0)),
        "the backlog drained"
    );
    assert_eq!(finished(), 9.0, "nine bites were spoken");
    assert_eq!(
        published(http) + dropped(),
        finished(),
        "every bite is published or counted as dropped"
    );
    assert!(
        wait_for(Duration::from_secs(5), || distinct(&seen) as f64
            == published(http)),
        "what arrived ({}) is what was counted as published ({})",
        distinct(&seen),
        published(http)
    );
    // The bite in flight when the server froze (the second) was never the
    // one dropped: at least the first two arrived.
    assert!(distinct(&seen) >= 2);
}

#[test]
fn a_panic_exit_spools_and_the_next_start_publishes_the_spooled_bites() {
    let dir = std::env::temp_dir().join(format!("beep-sfu-panic-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spool = dir.join("spool");
    let trigger = dir.join("panic-now");
    std::fs::create_dir_all(&dir).unwrap();
    let spool_arg = spool.to_string_lossy().into_owned();
    let args = |nats: &str| {
        vec![
            "--dev".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--udp".into(),
            "127.0.0.1:0".into(),
            "--tcp".into(),
            "none".into(),
            "--bites-dir".into(),
            "none".into(),
            "--spool-dir".into(),
            spool_arg.clone(),
            "--nats".into(),
            nats.to_string(),
        ]
    };
    // NATS unreachable: the bites wait in the backlog.
    let first = args("nats://127.0.0.1:1");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let trigger_arg = trigger.to_string_lossy().into_owned();
    let (mut child, http, log) =
        spawn_binary_with(&first, &[("BEEP_SFU_TEST_PANIC_FILE", &trigger_arg)]);
    let (mut a, mut b) = two_in_room(http);
    talk(&mut [&mut a, &mut b], 1, 0..20);
    talk(&mut [&mut a, &mut b], 1, 100..120);
    assert!(wait_for(Duration::from_secs(10), || metric(
        http,
        "beep_sfu_bite_backlog "
    ) == Some(2.0)));
    std::fs::write(&trigger, b"").unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            std::time::Instant::now() < end,
            "the panic did not end the process"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(70));
    std::thread::sleep(Duration::from_millis(200)); // the last stderr lines
    let lines = log.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert!(lines.contains("media loop panicked"), "{lines}");
    assert!(
        lines.contains("spooled 2 bite(s) before exiting"),
        "{lines}"
    );
    let files = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files, 2, "one spool file per bite");
    // The next start, with NATS there, publishes them and empties the spool.
    let nats = NatsServer::start();
    let (_sub, seen) = collect_bites(&nats.url());
    let second = args(&nats.url());
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let (mut again, _, _) = spawn_binary_with(&second, &[]);
    assert!(
        wait_for(Duration::from_secs(15), || distinct(&seen) == 2),
        "the spooled bites arrived: {}",
        distinct(&seen)
    );
    assert!(wait_for(Duration::from_secs(5), || std::fs::read_dir(
        &spool
    )
    .map(|d| d.count())
    .unwrap_or(0)
        == 0));
    let _ = again.kill();
    let _ = again.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
