//! Small address helpers shared by the roles.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tonic::transport::{Channel, Endpoint};

use crate::tls::Tls;

/// Parses "IP" or "IP:PORT"; a bare IP gets `default_port`.
pub fn parse_addr(text: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, default_port)),
        Err(_) => bail!("{text:?} is not an address (expected IP or IP:PORT)"),
    }
}

/// A lazily connected gRPC channel to `addr`, sending from `local` when it
/// is a specific address (so the peer sees which of our names we use).
/// With `tls`, the connection is TLS and the server must prove it is
/// `server_name` (the peer's topology name or the address dialled).
pub fn channel(
    addr: SocketAddr,
    local: Option<IpAddr>,
    timeout: Duration,
    tls: Option<(&Tls, &str)>,
) -> anyhow::Result<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).with_context(|| format!("bad endpoint {addr}"))?;
    if let Some((tls, server_name)) = tls {
        endpoint = endpoint.tls_config(tls.client_config(server_name)).context("TLS configuration")?;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_millis(800))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .local_address(local.filter(|ip| !ip.is_unspecified()));
    Ok(endpoint.connect_lazy())
}

/// Addresses of this host's interfaces (the network namespace's).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            } else if family == libc::AF_INET6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Microseconds since the Unix epoch, by this host's clock.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_port() {
        assert_eq!(parse_addr("10.0.0.1", 7070).unwrap(), "10.0.0.1:7070".parse().unwrap());
        assert_eq!(parse_addr("10.0.0.1:9", 7070).unwrap(), "10.0.0.1:9".parse().unwrap());
        assert!(parse_addr("nowhere", 7070).unwrap_err().to_string().contains("\"nowhere\""));
    }

    #[test]
    fn loopback_is_local() {
        assert!(local_addresses().contains(&"127.0.0.1".parse().unwrap()));
    }
}
