//! Cluster helpers shared by the cluster tests: NATS, nodes in-process or
//! as the binary, and peers talking across them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use beep_sfu::config::{ClusterKey, Config};
use beep_sfu::server::Server;

use super::*;

/// A subject prefix of its own per test, so tests sharing nothing but the
/// machine never hear each other.
pub fn prefix(test: &str) -> String {
    format!("t{}.{test}", std::process::id())
}

/// The test cluster's key (32 bytes; a real one is random and secret).
pub const KEY: &[u8; 32] = b"beep-sfu test cluster key 32 byt";

pub fn node_config(nats: &NatsServer, prefix: &str, node: &str) -> Config {
    let mut c = test_config(true, "");
    c.nats = Some(nats.url());
    c.node_id = node.into();
    c.cluster_subject = Some(prefix.into());
    c.cluster_keys = vec![ClusterKey::new(KEY).expect("a 32-byte key")];
    c
}

pub fn start_node(nats: &NatsServer, prefix: &str, node: &str) -> Server {
    init_log();
    Server::start(&node_config(nats, prefix, node)).expect("node starts")
}

/// How many nodes `/healthz` says this one sees, itself included.
pub fn cluster_nodes(http: SocketAddr) -> i64 {
    let (_, body) = get(http, "/healthz");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["cluster_nodes"].as_i64())
        .unwrap_or(-1)
}

pub fn see_each_other(a: SocketAddr, b: SocketAddr) {
    assert!(
        wait_for(Duration::from_secs(10), || cluster_nodes(a) == 2
            && cluster_nodes(b) == 2),
        "the nodes did not see each other: {} and {}",
        cluster_nodes(a),
        cluster_nodes(b)
    );
}

/// NATS and two nodes `a` and `b` that see each other.
pub struct Pair {
    pub nats: NatsServer,
    pub prefix: String,
    pub _a: Server,
    pub _b: Server,
    pub ha: SocketAddr,
    pub hb: SocketAddr,
}

pub fn two_nodes(test: &str) -> Pair {
    let nats = NatsServer::start();
    let prefix = prefix(test);
    let a = start_node(&nats, &prefix, "a");
    let b = start_node(&nats, &prefix, "b");
    let (ha, hb) = (a.http_addr(), b.http_addr());
    see_each_other(ha, hb);
    Pair {
        nats,
        prefix,
        _a: a,
        _b: b,
        ha,
        hb,
    }
}

/// Signals each peer to its own node and waits until all are connected.
pub fn connect_to(pairs: &mut [(&mut TestPeer, SocketAddr)]) {
    for (p, http) in pairs.iter_mut() {
        p.signal(*http, OfferStyle::Raw)
            .unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    let mut peers: Vec<&mut TestPeer> = pairs.iter_mut().map(|(p, _)| &mut **p).collect();
    assert!(
        pump_until(&mut peers, Duration::from_secs(20), |ps| ps
            .iter()
            .all(|p| p.connected)),
        "peers did not connect"
    );
}

/// Sends loud packets from every talker (numbered from `from`) until each
/// listener has heard each expected speaker, or 10 s pass.
pub fn talk_until_heard(
    peers: &mut [&mut TestPeer],
    talkers: &[(usize, u8)],
    expect: &[(usize, u8)],
    from: u32,
) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    let mut n = from;
    while Instant::now() < end {
        for &(i, sender) in talkers {
            peers[i].send(&payload(sender, n), -20);
        }
        n += 1;
        pump_for(peers, Duration::from_millis(20));
        if expect
            .iter()
            .all(|&(i, sender)| heard(peers[i]).contains_key(&sender))
        {
            return true;
        }
    }
    false
}

/// A node run as the binary; killed when dropped, so a failing test leaves
/// no process behind.
pub struct BinaryNode(pub std::process::Child);

impl Drop for BinaryNode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test key in a file, for nodes run as the binary.
pub fn key_file() -> String {
    let path = std::env::temp_dir().join(format!("beep-sfu-test-key-{}", std::process::id()));
    std::fs::write(&path, KEY).expect("key file written");
    path.to_string_lossy().into_owned()
}

/// Starts the server binary as a cluster node; returns it and its HTTP address.
pub fn spawn_node(nats: &NatsServer, prefix: &str, node: &str) -> (BinaryNode, SocketAddr) {
    let url = nats.url();
    let key = key_file();
    let (child, addr) = spawn_binary(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--udp",
        "127.0.0.1:0",
        "--tcp",
        "none",
        "--bites-dir",
        "none",
        "--nats",
        &url,
        "--node-id",
        node,
        "--cluster-subject",
        prefix,
        "--cluster-key-file",
        &key,
    ]);
    (BinaryNode(child), addr)
}

/// Sends `count` numbered packets from each talker at the real pace and
/// returns, per listener, the packets (by number) heard from `sender`.
pub fn talk(peers: &mut [&mut TestPeer], talkers: &[(usize, u8)], from: u32, count: u32) {
    for n in from..from + count {
        for &(i, sender) in talkers {
            peers[i].send(&payload(sender, n), -20);
        }
        pump_for(peers, Duration::from_millis(20));
    }
    pump_for(peers, Duration::from_millis(500));
}
