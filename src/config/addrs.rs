//! Addresses from flags: Go-style `:PORT`, host names, and the public IPs
//! put in every answer (given, or found on an interface).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Parses `HOST:PORT`, `IP:PORT`, `[v6]:PORT` or Go-style `:PORT` (all interfaces).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// The candidate IPs: the ones given (each concrete, and of a family the
/// socket serves), else the socket's own IP, else an interface address of
/// each family an unspecified socket serves (`0.0.0.0`: IPv4; `[::]`: both).
pub(super) fn public_ips(given: &[IpAddr], udp: SocketAddr) -> Result<Vec<IpAddr>, String> {
    for ip in given {
        if ip.is_unspecified() {
            return Err("--public-ip: must be concrete addresses, not 0.0.0.0/::".into());
        }
        if ip.is_ipv6() && udp.is_ipv4() {
            return Err(format!(
                "--public-ip: {ip} is IPv6 but --udp {udp} is an IPv4 socket; bind --udp [::]:PORT for both"
            ));
        }
        if ip.is_ipv4() && udp.is_ipv6() && !udp.ip().is_unspecified() {
            return Err(format!(
                "--public-ip: {ip} is IPv4 but --udp {udp} is an IPv6 address; bind --udp [::]:PORT for both"
            ));
        }
    }
    if !given.is_empty() {
        let mut ips = given.to_vec();
        ips.dedup();
        return Ok(ips);
    }
    if !udp.ip().is_unspecified() {
        return Ok(vec![udp.ip()]);
    }
    let mut ips: Vec<IpAddr> = first_interface_ip(true).into_iter().collect();
    if udp.is_ipv6() {
        ips.extend(first_interface_ip(false));
    }
    if ips.is_empty() {
        return Err(
            "--public-ip: no non-loopback interface address found; set --public-ip".to_string(),
        );
    }
    Ok(ips)
}

/// The first non-loopback interface address of this host of one family
/// (link-local addresses skipped), read from the interface list.
pub(super) fn first_interface_ip(v4: bool) -> Option<IpAddr> {
    let addrs = if_addrs::get_if_addrs().ok()?;
    let usable = |ip: &IpAddr| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            }
    };
    addrs
        .iter()
        .map(|i| i.ip())
        .filter(usable)
        .find(|ip| ip.is_ipv4() == v4)
}
