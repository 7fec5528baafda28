//! The backlog's rules in memory: what an overflow drops, and which bite a
//! finished call is credited to.

use super::backlog::overflow_victim;
use super::*;

fn bite(n: u64) -> Bite {
    Bite {
        key: "c".into(),
        start: n,
        data: vec![0; 1_000],
        client: None,
    }
}

/// A publisher whose server never answers (nothing listens on port 1).
fn unconnected(backlog_bytes: usize) -> NatsPublisher {
    let config = NatsConfig {
        url: "nats://127.0.0.1:1".into(),
        bite_subject: "bite".into(),
        store_subject: "store".into(),
        backlog_bytes,
        spool_dir: None,
        jetstream: true,
        auth: NatsAuth::default(),
        ping: Duration::from_secs(1),
    };
    NatsPublisher::start(config, Arc::new(Metrics::new()))
}

fn starts(p: &NatsPublisher) -> Vec<u64> {
    p.backlog
        .iter()
        .map(|e| Bite::decode(e.bite.as_slice()).map_or(0, |b| b.start))
        .collect()
}

#[test]
fn an_overflow_while_a_bite_is_in_flight_keeps_it_and_credits_it() {
    let mut p = unconnected(5_000);
    p.push(Encoded::new(&bite(1), false, None));
    // Bite 1's first message is with the worker.
    p.in_flight = Some(InFlight::Front(Stage::Bite));
    p.push(Encoded::new(&bite(2), false, None));
    p.push(Encoded::new(&bite(3), false, None));
    assert_eq!(
        starts(&p),
        vec![1, 3],
        "bite 2, not the one in flight, was dropped"
    );
    // The worker's acknowledgement belongs to bite 1.
    p.in_flight = None;
    p.advance(Stage::Bite);
    assert!(p.backlog[0].bite_acked && p.backlog[0].stage == Stage::Store);
    assert!(!p.backlog[1].bite_acked && p.backlog[1].stage == Stage::Bite);
    p.advance(Stage::Store);
    assert_eq!(starts(&p), vec![3]);
    assert_eq!(p.metrics.bites_published.get(), 1);
}

#[test]
fn the_bite_in_flight_is_never_the_one_dropped() {
    assert_eq!(overflow_victim(5, true), Some(1));
    assert_eq!(overflow_victim(5, false), Some(0));
    assert_eq!(overflow_victim(2, true), Some(1));
    assert_eq!(overflow_victim(1, true), None, "only the one in flight");
    assert_eq!(overflow_victim(1, false), None, "the last bite is kept");
    assert_eq!(overflow_victim(0, false), None);
}
