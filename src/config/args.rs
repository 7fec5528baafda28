//! The flags and their environment twins, as clap reads them; `Config`
//! (`mod.rs`) resolves and checks them.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// beep-sfu: WebRTC audio Selective Forwarding Unit for Beep conversations.
///
/// Clients open GET /connect (WebSocket) to exchange an SDP offer/answer, then
/// POST /join/:conversationid. Identity comes from the X-User-Claim header set
/// by the auth proxy. Every flag can also be given as the environment variable
/// shown, or in a .env file in the working directory.
#[derive(Debug, Clone, Parser)]
#[command(name = "beep-sfu", version, about, long_about = None)]
pub struct Args {
    /// HTTP listen address for signalling, /healthz and /metrics. Go-style
    /// ":PORT" means all interfaces. [default: :80, or 127.0.0.1:8080 with --dev]
    #[arg(long, env = "LISTEN")]
    pub listen: Option<String>,

    /// The one UDP socket all media flows through.
    /// [default: 0.0.0.0:50000, or 127.0.0.1:50000 with --dev]
    #[arg(long = "udp", env = "UDP_LISTEN")]
    pub udp: Option<String>,

    /// TCP listener for ICE over TCP (RFC 6544, passive), for clients whose
    /// networks block UDP; "none" disables it. [default: the --udp address]
    #[arg(long = "tcp", env = "TCP_LISTEN")]
    pub tcp: Option<String>,

    /// IP addresses put in answers as the server's ICE candidates,
    /// comma-separated (IPv4 and IPv6; each gets a candidate). [default: the
    /// --udp IP when it is not unspecified, else the first non-loopback
    /// interface address of each family the socket serves]
    #[arg(long, env = "PUBLIC_IP", value_delimiter = ',')]
    pub public_ip: Vec<IpAddr>,

    /// NATS server bites are published to; "none" disables publishing.
    /// [default: nats://localhost:4222, or none with --dev]
    #[arg(long, env = "NATS")]
    pub nats: Option<String>,

    /// NATS subject for `Bite` messages.
    #[arg(long, env = "BITE_SUBJECT", default_value = "bite")]
    pub bite_subject: String,

    /// NATS subject for `Store{type:"bite"}` messages.
    #[arg(long, env = "STORE_SUBJECT", default_value = "store")]
    pub store_subject: String,

    /// Most bytes of bites kept while NATS is unreachable; beyond it the
    /// oldest are dropped (and counted).
    #[arg(long, env = "NATS_BACKLOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub nats_backlog_bytes: usize,

    /// Also write every bite as DIR/<conversation>/<start>-<userid>-<clientid>.ogg;
    /// "none" writes no files. [default: none, or ./bites with --dev]
    #[arg(long, env = "BITES_DIR")]
    pub bites_dir: Option<PathBuf>,

    /// Milliseconds of silence that end a bite.
    #[arg(long, env = "BITE_SILENCE_MS", default_value_t = 600)]
    pub bite_silence_ms: u64,

    /// Longest bite in milliseconds; longer talk continues in a new bite.
    #[arg(long, env = "BITE_MAX_MS", default_value_t = 10_000)]
    pub bite_max_ms: u64,

    /// Previous packets carried as RED (RFC 2198) redundancy on each packet
    /// to a listener that offers RED (0 to 3; 0 does not negotiate RED).
    #[arg(long, env = "RED_DISTANCE", default_value_t = 2)]
    pub red_distance: usize,

    /// Ask senders for Opus DTX (`usedtx=1`): one packet per 400 ms in
    /// silence instead of fifty a second. `false` answers without it.
    #[arg(long, env = "OPUS_DTX", default_value_t = true, action = clap::ArgAction::Set)]
    pub opus_dtx: bool,

    /// Audio level (dBov, RFC 6464) below which a packet counts as silence.
    #[arg(long, env = "SILENCE_DBOV", default_value_t = -60, allow_negative_numbers = true)]
    pub silence_dbov: i32,

    /// Base URL of Beep's permissions service (http only).
    #[arg(long, env = "PERMISSIONS_HOST", default_value = "http://permissions")]
    pub permissions_host: String,

    /// Development mode: HTTP on 127.0.0.1:8080 and UDP on 127.0.0.1:50000
    /// unless given, every join allowed without a permissions service, claims
    /// accepted from ?userid=&clientid= in the query, no NATS. Not for production.
    #[arg(long, env = "DEV", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub dev: bool,

    /// Most peers (client connections) at once; further /connect gets close code 1013.
    #[arg(long, env = "MAX_PEERS", default_value_t = 10_000)]
    pub max_peers: usize,

    /// Most clients (peers) one user may have connected at once; more get close code 1008.
    #[arg(long, env = "MAX_PEERS_PER_USER", default_value_t = 16)]
    pub max_peers_per_user: usize,

    /// Most concurrent HTTP/WebSocket signalling connections; more get 503.
    #[arg(long, env = "MAX_SIGNALLING", default_value_t = 256)]
    pub max_signalling: usize,

    /// Most ICE-TCP media connections at once; more are closed at accept.
    #[arg(long, env = "MAX_TCP_CONNECTIONS", default_value_t = 1024)]
    pub max_tcp_connections: usize,

    /// Most ICE-TCP media connections from one remote IP.
    #[arg(long, env = "MAX_TCP_PER_IP", default_value_t = 16)]
    pub max_tcp_per_ip: usize,

    /// Seconds a peer has to complete ICE and DTLS after its offer.
    #[arg(long, env = "CONNECT_TIMEOUT_SECS", default_value_t = 30)]
    pub connect_timeout_secs: u64,

    /// Seconds without any datagram after which a peer is removed.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub idle_timeout_secs: u64,

    /// Seconds a user with no clients left keeps their conversation membership.
    #[arg(long, env = "MEMBERSHIP_GRACE_SECS", default_value_t = 60)]
    pub membership_grace_secs: u64,

    /// Milliseconds the permissions service has to answer before a join fails with 503.
    #[arg(long, env = "PERMISSIONS_TIMEOUT_MS", default_value_t = 2000)]
    pub permissions_timeout_ms: u64,

    /// A second HTTP listener serving only /healthz and /metrics, with its
    /// own capacity, so probes are answered however busy signalling is;
    /// "none" serves them on --listen only. [default: none]
    #[arg(long, env = "ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Most concurrent signalling connections from one source IP; 0 means no
    /// per-IP limit (behind a proxy every connection comes from its IP).
    #[arg(long, env = "MAX_SIGNALLING_PER_IP", default_value_t = 0)]
    pub max_signalling_per_ip: usize,

    /// Comma-separated Origin values allowed to open /connect (e.g.
    /// https://app.beep.example); requests without an Origin header (not a
    /// browser) are always allowed. [default: any origin]
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Directory bites are written to when NATS cannot take them before
    /// exit (a clean stop, or the panic and stall exits); they are
    /// published on the next start. "none" disables it. [default: ./spool,
    /// or ./bites/spool with --dev]
    #[arg(long, env = "SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Publish bites through JetStream and wait for each acknowledgement
    /// (at-least-once delivery); needs a stream on both subjects. A bite
    /// stays in the backlog until the server acknowledged it.
    #[arg(long, env = "NATS_JETSTREAM", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
    pub nats_jetstream: bool,

    /// Seconds a round trip to NATS may take before a bite is sent again,
    /// and how often an idle connection is probed (two misses drop the
    /// connection and dial again). The `nats` client's own keep-alive is
    /// two minutes.
    #[arg(long, env = "NATS_PING_SECS", default_value_t = 5)]
    pub nats_ping_secs: u64,

    /// Seconds the media loop may go without a turn before the process
    /// exits (non-zero) so its supervisor restarts it.
    #[arg(long, env = "LOOP_STALL_SECS", default_value_t = 10)]
    pub loop_stall_secs: u64,

    /// This node's id in the cluster (letters, digits, '-', '_'); unique
    /// per process. [default: <hostname>-<pid>]
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,

    /// Subject prefix the nodes of one cluster share over --nats; "none"
    /// keeps this node alone. Nodes with the same prefix on the same NATS
    /// act as one SFU.
    #[arg(long, env = "CLUSTER_SUBJECT", default_value = "beep.sfu")]
    pub cluster_subject: String,

    /// File holding the cluster key: at least 32 random bytes (for example
    /// `head -c 32 /dev/urandom`). A node joins a cluster only with a key;
    /// without one it publishes bites and stays alone. Give two files,
    /// comma-separated, while rolling a new key: the first seals, both are
    /// accepted. Keep it secret: it is the cluster's only credential.
    #[arg(long, env = "CLUSTER_KEY_FILE", value_delimiter = ',')]
    pub cluster_key_file: Vec<PathBuf>,

    /// NATS credentials file (a `.creds` file with a JWT and nkey seed),
    /// for the bite sink and the cluster. A user and password or a token
    /// can instead be put in the --nats URL (nats://user:pass@host:4222).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// CA certificate (PEM) to verify a NATS server reached over TLS
    /// (--nats tls://host:4222).
    #[arg(long, env = "NATS_CA")]
    pub nats_ca: Option<PathBuf>,
}
