//! Command-line flags and environment variables (clap), with `.env` loaded
//! first, resolved into one validated [`Config`].
//!
//! Every flag has an env twin so the service runs the same from a shell, a
//! `.env` file or a container. Invalid values fail at start with a one-line
//! error naming the flag.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;

pub use crate::cluster::seal::ClusterKey;
pub use crate::nats_connect::NatsAuth;
use clap::Parser;

mod addrs;
mod args;

pub use addrs::parse_addr;
use addrs::public_ips;
pub use args::Args;

/// The resolved, validated configuration the service runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Media UDP socket address.
    pub udp: SocketAddr,
    /// ICE-TCP listener address, if TCP is served.
    pub tcp: Option<SocketAddr>,
    /// ICE candidate IPs announced to clients (one candidate each).
    pub public_ips: Vec<IpAddr>,
    /// NATS URL; `None` publishes nothing.
    pub nats: Option<String>,
    /// Subject for `Bite`.
    pub bite_subject: String,
    /// Subject for `Store`.
    pub store_subject: String,
    /// NATS backlog bound in bytes.
    pub nats_backlog_bytes: usize,
    /// Silence that ends a bite.
    pub bite_silence: Duration,
    /// Longest bite.
    pub bite_max: Duration,
    /// Loudness (127 + dBov) at or above which a packet is voiced.
    pub voiced_loudness: f32,
    /// Previous packets sent as RED redundancy (0: RED not negotiated).
    pub red_distance: usize,
    /// Whether answers ask for Opus DTX.
    pub opus_dtx: bool,
    /// Permissions service base URL without a trailing slash.
    pub permissions_host: String,
    /// Development mode.
    pub dev: bool,
    /// Peer limit.
    pub max_peers: usize,
    /// Peer limit per user.
    pub max_peers_per_user: usize,
    /// Signalling connection limit.
    pub max_signalling: usize,
    /// Most ICE-TCP connections at once.
    pub max_tcp_connections: usize,
    /// Most ICE-TCP connections from one IP.
    pub max_tcp_per_ip: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Membership grace.
    pub membership_grace: Duration,
    /// Permission check timeout.
    pub permissions_timeout: Duration,
    /// Where bites are written as files, if anywhere.
    pub bites_dir: Option<PathBuf>,
    /// Listener for /healthz and /metrics only, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Signalling connections per source IP (0: no limit).
    pub max_signalling_per_ip: usize,
    /// Origins allowed to open /connect (empty: any).
    pub allowed_origins: Vec<String>,
    /// Where undelivered bites are spooled at exit, if anywhere.
    pub spool_dir: Option<PathBuf>,
    /// How long the media loop may go without a turn.
    pub loop_stall: Duration,
    /// Publish through JetStream with acknowledgements.
    pub nats_jetstream: bool,
    /// Round-trip deadline and idle probe interval for NATS.
    pub nats_ping: Duration,
    /// This node's id in the cluster.
    pub node_id: String,
    /// The cluster's subject prefix; `None` (or no NATS) keeps the node alone.
    pub cluster_subject: Option<String>,
    /// The cluster keys (the first seals); none keeps the node alone.
    pub cluster_keys: Vec<ClusterKey>,
    /// How to authenticate to NATS besides the URL.
    pub nats_auth: NatsAuth,
}

impl Config {
    /// Loads `.env` (if present), parses flags and env, and validates.
    pub fn load() -> Result<Config, String> {
        // A missing .env is normal; a malformed one is worth saying.
        if let Err(e) = dotenvy::dotenv() {
            if !e.not_found() {
                return Err(format!(".env: {e}"));
            }
        }
        let args = match Args::try_parse() {
            Ok(a) => a,
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
                e.exit()
            }
            // clap's own message, first line only: "invalid value 'x' for '--flag …'".
            Err(e) => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                return Err(first.trim_start_matches("error: ").to_string());
            }
        };
        Config::from_args(args)
    }

    /// Validates parsed arguments.
    pub fn from_args(a: Args) -> Result<Config, String> {
        let Addresses {
            listen,
            udp,
            tcp,
            public_ips,
            admin_listen,
        } = addresses(&a)?;
        let permissions_host = permissions_host(&a)?;
        let nats = nats_url(&a)?;
        let (node_id, cluster_subject) = cluster_settings(&a)?;
        let cluster_keys = cluster_keys(&a.cluster_key_file)?;
        let nats_auth = NatsAuth {
            creds: readable_file(a.nats_creds.clone(), "--nats-creds")?,
            ca: readable_file(a.nats_ca.clone(), "--nats-ca")?,
        };
        check_limits(&a)?;
        let allowed_origins: Vec<String> = a
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        let (bites_dir, spool_dir) = storage_dirs(&a);
        Ok(Config {
            listen,
            udp,
            tcp,
            public_ips,
            nats,
            bite_subject: a.bite_subject,
            store_subject: a.store_subject,
            nats_backlog_bytes: a.nats_backlog_bytes,
            bite_silence: Duration::from_millis(a.bite_silence_ms),
            bite_max: Duration::from_millis(a.bite_max_ms),
            voiced_loudness: (127 + a.silence_dbov) as f32,
            red_distance: a.red_distance,
            opus_dtx: a.opus_dtx,
            permissions_host,
            dev: a.dev,
            max_peers: a.max_peers,
            max_peers_per_user: a.max_peers_per_user,
            max_signalling: a.max_signalling,
            max_tcp_connections: a.max_tcp_connections,
            max_tcp_per_ip: a.max_tcp_per_ip,
            connect_timeout: Duration::from_secs(a.connect_timeout_secs),
            idle_timeout: Duration::from_secs(a.idle_timeout_secs),
            membership_grace: Duration::from_secs(a.membership_grace_secs),
            permissions_timeout: Duration::from_millis(a.permissions_timeout_ms),
            bites_dir,
            admin_listen,
            max_signalling_per_ip: a.max_signalling_per_ip,
            allowed_origins,
            spool_dir,
            loop_stall: Duration::from_secs(a.loop_stall_secs),
            nats_jetstream: a.nats_jetstream,
            nats_ping: Duration::from_secs(a.nats_ping_secs),
            node_id,
            cluster_subject,
            cluster_keys,
            nats_auth,
        })
    }

    /// The addresses clients send media to: each public IP with the UDP port.
    pub fn candidate_addrs(&self) -> Vec<SocketAddr> {
        self.public_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.udp.port()))
            .collect()
    }
}

/// The addresses the server listens on and announces.
struct Addresses {
    listen: SocketAddr,
    udp: SocketAddr,
    tcp: Option<SocketAddr>,
    public_ips: Vec<IpAddr>,
    admin_listen: Option<SocketAddr>,
}

/// The listening and announced addresses, with `--dev`'s defaults; an
/// error names the flag.
fn addresses(a: &Args) -> Result<Addresses, String> {
    let listen_default = if a.dev { "127.0.0.1:8080" } else { ":80" };
    let udp_default = if a.dev {
        "127.0.0.1:50000"
    } else {
        "0.0.0.0:50000"
    };
    let listen = parse_addr(a.listen.as_deref().unwrap_or(listen_default))
        .map_err(|e| format!("--listen: {e}"))?;
    let udp =
        parse_addr(a.udp.as_deref().unwrap_or(udp_default)).map_err(|e| format!("--udp: {e}"))?;
    let public_ips = public_ips(&a.public_ip, udp)?;
    let tcp = match a.tcp.as_deref().map(str::trim) {
        Some("none") => None,
        Some(s) => Some(parse_addr(s).map_err(|e| format!("--tcp: {e}"))?),
        None => Some(udp),
    };
    let admin_listen = match a.admin_listen.as_deref().map(str::trim) {
        None | Some("" | "none") => None,
        Some(s) => Some(parse_addr(s).map_err(|e| format!("--admin-listen: {e}"))?),
    };
    Ok(Addresses {
        listen,
        udp,
        tcp,
        public_ips,
        admin_listen,
    })
}

/// The permissions service's base URL without a trailing slash: http://
/// outside `--dev` (it is reached inside the cluster).
fn permissions_host(a: &Args) -> Result<String, String> {
    let host = a.permissions_host.trim_end_matches('/').to_string();
    if !a.dev && !host.starts_with("http://") {
        return Err(format!(
            "--permissions-host: {host:?} must be an http:// URL (the service is reached inside the cluster)"
        ));
    }
    Ok(host)
}

/// The NATS URL (`None`: no NATS), checked to look like one.
fn nats_url(a: &Args) -> Result<Option<String>, String> {
    let nats = match a.nats.as_deref().map(str::trim) {
        Some("" | "none") => None,
        Some(url) => Some(url.to_string()),
        None if a.dev => None,
        None => Some("nats://localhost:4222".to_string()),
    };
    if let Some(url) = &nats {
        if !(url.starts_with("nats://") || url.starts_with("tls://") || url.contains(':')) {
            return Err(format!(
                "--nats: {url:?} is not a NATS URL like nats://host:4222"
            ));
        }
    }
    Ok(nats)
}

/// The subjects, limits and durations that need no parsing, each checked
/// against its bounds; the error names the flag.
fn check_limits(a: &Args) -> Result<(), String> {
    for (flag, subject) in [
        ("--bite-subject", &a.bite_subject),
        ("--store-subject", &a.store_subject),
    ] {
        if subject.is_empty() || subject.contains(char::is_whitespace) {
            return Err(format!("{flag}: {subject:?} is not a NATS subject"));
        }
    }
    if !(-127..=0).contains(&a.silence_dbov) {
        return Err("--silence-dbov: must be between -127 and 0".into());
    }
    if a.bite_max_ms < 100 || a.bite_silence_ms == 0 {
        return Err("--bite-max-ms must be at least 100 and --bite-silence-ms above 0".into());
    }
    if a.red_distance > crate::sfu::MAX_RED_DISTANCE {
        return Err(format!(
            "--red-distance: must be between 0 and {}",
            crate::sfu::MAX_RED_DISTANCE
        ));
    }
    if a.max_peers_per_user == 0 {
        return Err("--max-peers-per-user: must be at least 1".into());
    }
    if a.max_peers == 0 {
        return Err("--max-peers: must be at least 1".into());
    }
    if a.max_signalling == 0 {
        return Err("--max-signalling: must be at least 1".into());
    }
    if a.max_tcp_connections == 0 || a.max_tcp_per_ip == 0 {
        return Err("--max-tcp-connections and --max-tcp-per-ip: must be at least 1 (use --tcp none to serve no ICE-TCP)".into());
    }
    // Durations are bounded both ways: zero makes no sense, and a huge
    // value would overflow `Instant + Duration` on the media loop.
    for (flag, v, max) in [
        ("--connect-timeout-secs", a.connect_timeout_secs, 600),
        ("--idle-timeout-secs", a.idle_timeout_secs, 3_600),
        ("--membership-grace-secs", a.membership_grace_secs, 86_400),
        ("--permissions-timeout-ms", a.permissions_timeout_ms, 60_000),
        ("--bite-silence-ms", a.bite_silence_ms, 10_000),
        ("--bite-max-ms", a.bite_max_ms, 600_000),
        ("--loop-stall-secs", a.loop_stall_secs, 3_600),
        ("--nats-ping-secs", a.nats_ping_secs, 600),
    ] {
        if v == 0 || v > max {
            return Err(format!("{flag}: must be between 1 and {max}"));
        }
    }
    Ok(())
}

/// Where bites are written and spooled (`none` turns either off; `--dev`
/// writes under `bites/`).
fn storage_dirs(a: &Args) -> (Option<PathBuf>, Option<PathBuf>) {
    let bites_dir = match a.bites_dir.clone() {
        Some(d) if d.as_os_str() == "none" => None,
        Some(d) => Some(d),
        None => a.dev.then(|| PathBuf::from("bites")),
    };
    let spool_dir = match a.spool_dir.clone() {
        Some(d) if d.as_os_str() == "none" => None,
        Some(d) => Some(d),
        None if a.dev => bites_dir.as_ref().map(|b| b.join("spool")),
        None => Some(PathBuf::from("spool")),
    };
    (bites_dir, spool_dir)
}

/// The cluster keys read from their files; an error names the flag and file.
fn cluster_keys(files: &[PathBuf]) -> Result<Vec<ClusterKey>, String> {
    files
        .iter()
        .map(|f| {
            let bytes =
                std::fs::read(f).map_err(|e| format!("--cluster-key-file {}: {e}", f.display()))?;
            ClusterKey::new(bytes.trim_ascii())
                .map_err(|e| format!("--cluster-key-file {}: {e}", f.display()))
        })
        .collect()
}

/// A file flag whose file must be readable at start.
fn readable_file(path: Option<PathBuf>, flag: &str) -> Result<Option<PathBuf>, String> {
    if let Some(p) = &path {
        std::fs::metadata(p).map_err(|e| format!("{flag} {}: {e}", p.display()))?;
    }
    Ok(path)
}

/// This node's id and the cluster's subject prefix (`None`: alone),
/// validated as NATS subject tokens.
fn cluster_settings(a: &Args) -> Result<(String, Option<String>), String> {
    let node_id = a
        .node_id
        .clone()
        .unwrap_or_else(crate::cluster::default_node_id);
    if !crate::cluster::valid_node_id(&node_id) {
        return Err(format!(
        "--node-id: {node_id:?} must be letters, digits, '-' or '_' (it is a NATS subject token)"
        ));
    }
    let cluster_subject = match a.cluster_subject.trim() {
        "" | "none" => None,
        p if p.split('.').all(crate::cluster::valid_node_id) => Some(p.to_string()),
        p => {
            return Err(format!(
            "--cluster-subject: {p:?} must be dot-separated tokens of letters, digits, '-' or '_'"
        ))
        }
    };
    Ok((node_id, cluster_subject))
}

#[cfg(test)]
mod tests {
    use super::addrs::first_interface_ip;
    use super::*;

    fn args(v: &[&str]) -> Result<Config, String> {
        let mut all = vec!["beep-sfu"];
        all.extend_from_slice(v);
        Config::from_args(Args::try_parse_from(all).map_err(|e| e.to_string())?)
    }

    #[test]
    fn go_style_listen_means_all_interfaces() {
        assert_eq!(parse_addr(":80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(
            parse_addr("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(parse_addr(":x").is_err());
        assert!(parse_addr("nope").is_err());
    }

    #[test]
    fn dev_defaults_to_loopback() {
        let c = args(&["--dev"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.udp, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(c.public_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(c.dev);
        assert_eq!(c.nats, None, "no NATS in dev unless asked");
        assert_eq!(c.bites_dir, Some(PathBuf::from("bites")));
        let c = args(&["--dev", "--nats", "nats://127.0.0.1:4222"]).unwrap();
        assert_eq!(c.nats.as_deref(), Some("nats://127.0.0.1:4222"));
        let c = args(&["--udp", "127.0.0.1:1"]).unwrap();
        assert_eq!(c.nats.as_deref(), Some("nats://localhost:4222"));
        assert_eq!(c.bites_dir, None);
        let c = args(&["--dev", "--bites-dir", "none"]).unwrap();
        assert_eq!(c.bites_dir, None, "none writes no files, even in --dev");
        assert_eq!(c.voiced_loudness, 67.0);
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(args(&["--node-id", "a.b"])
            .unwrap_err()
            .starts_with("--node-id"));
        assert!(args(&["--cluster-subject", "beep.*"])
            .unwrap_err()
            .starts_with("--cluster-subject"));
        assert!(args(&["--listen", "what"])
            .unwrap_err()
            .starts_with("--listen"));
        assert!(args(&["--udp", "1.2.3.4"])
            .unwrap_err()
            .starts_with("--udp"));
        assert!(args(&["--udp", "0.0.0.0:1", "--public-ip", "0.0.0.0"])
            .unwrap_err()
            .starts_with("--public-ip"));
        assert!(
            args(&["--permissions-host", "ftp://x", "--udp", "127.0.0.1:1"])
                .unwrap_err()
                .starts_with("--permissions-host")
        );
        assert!(args(&["--max-peers", "0", "--udp", "127.0.0.1:1"])
            .unwrap_err()
            .starts_with("--max-peers"));
    }

    #[test]
    fn public_ip_falls_back_to_an_interface_address() {
        match first_interface_ip(true) {
            Some(ip) => {
                assert!(!ip.is_loopback());
                let c = args(&["--udp", "0.0.0.0:6000"]).unwrap();
                assert_eq!(c.public_ips, vec![ip]);
            }
            // A host with only loopback: the error names the flag.
            None => assert!(args(&["--udp", "0.0.0.0:6000"])
                .unwrap_err()
                .starts_with("--public-ip")),
        }
    }

    #[test]
    fn public_ip_defaults_to_the_udp_ip() {
        let c = args(&["--udp", "127.0.0.5:6000"]).unwrap();
        assert_eq!(c.candidate_addrs(), vec!["127.0.0.5:6000".parse().unwrap()]);
    }

    #[test]
    fn public_ips_take_a_list_of_both_families_on_a_dual_stack_socket() {
        let c = args(&[
            "--udp",
            "[::]:6000",
            "--public-ip",
            "203.0.113.7,2001:db8::7",
        ])
        .unwrap();
        assert_eq!(
            c.candidate_addrs(),
            vec![
                "203.0.113.7:6000".parse().unwrap(),
                "[2001:db8::7]:6000".parse().unwrap()
            ]
        );
        assert!(
            args(&["--udp", "0.0.0.0:6000", "--public-ip", "2001:db8::7"])
                .unwrap_err()
                .starts_with("--public-ip")
        );
        assert!(args(&["--udp", "[::]:6000", "--public-ip", "::"])
            .unwrap_err()
            .starts_with("--public-ip"));
    }
}
