//! The core driven in memory: real str0m clients, simulated time, no sockets.

use std::collections::HashSet;
use std::time::Duration;

use beep_sfu::harness::Harness;

const LOUD: i8 = -20;

/// Payload that says who sent it and which packet it is.
fn payload(sender: usize, n: u32) -> Vec<u8> {
    let mut p = vec![0xAB; 80];
    p[0] = sender as u8;
    p[1..5].copy_from_slice(&n.to_be_bytes());
    p
}

fn senders_heard(h: &Harness, i: usize) -> HashSet<u8> {
    h.clients[i].received.iter().map(|r| r.payload[0]).collect()
}

fn talk(h: &mut Harness, who: &[usize], packets: u32) {
    for n in 0..packets {
        for &i in who {
            h.send(i, &payload(i, n), LOUD);
        }
        h.step(Duration::from_millis(20));
    }
}

#[test]
fn two_peers_hear_each_other_never_themselves() {
    let mut h = Harness::new();
    let a = h.add_client("alice", "a1", true, 0);
    let b = h.add_client("bob", "b1", true, 0);
    h.connect_all();
    h.join(a, "c1");
    h.join(b, "c1");
    talk(&mut h, &[a], 20);
    talk(&mut h, &[b], 20);
    assert_eq!(senders_heard(&h, a), HashSet::from([b as u8]));
    assert_eq!(senders_heard(&h, b), HashSet::from([a as u8]));
    // The payloads arrive intact and in order.
    let got: Vec<Vec<u8>> = h.clients[b].received.iter().map(|r| r.payload.clone()).collect();
    let want: Vec<Vec<u8>> = (0..20).map(|n| payload(a, n)).collect();
    assert_eq!(got, want);
}
