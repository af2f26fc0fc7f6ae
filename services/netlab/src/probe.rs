//! ICMP echo from inside a namespace, with a raw socket (needs root, needs
//! no ping binary): the reachability check of `netlab check` and the lab
//! tests.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::sys;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word =
            if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { u16::from_be_bytes([chunk[0], 0]) };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with this identifier and sequence number.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"netlab-probe-000");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    pkt
}

/// The (source, id, seq) of an echo reply in a raw IPv4 packet.
fn parse_reply(buf: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(buf.first()? & 0x0f) * 4;
    let icmp = buf.get(ihl..ihl + 8)?;
    if icmp[0] != 0 {
        return None;
    }
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    Some((src, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

/// Pings every target from the current thread's namespace; returns the
/// targets that never answered within `timeout` (requests are repeated
/// every 300 ms).
fn ping_here(targets: &[Ipv4Addr], id: u16, timeout: Duration) -> std::io::Result<Vec<Ipv4Addr>> {
    // SAFETY: plain socket syscalls on a descriptor this function owns and
    // closes; buffers are valid for the lengths given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut answered = vec![false; targets.len()];
        let start = Instant::now();
        let mut last_send: Option<Instant> = None;
        let mut buf = [0u8; 1500];
        while start.elapsed() < timeout && answered.iter().any(|a| !a) {
            if last_send.is_none_or(|t| t.elapsed() >= Duration::from_millis(300)) {
                for (i, t) in targets.iter().enumerate() {
                    if answered[i] {
                        continue;
                    }
                    let pkt = echo_request(id, i as u16);
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr { s_addr: u32::from(*t).to_be() },
                        sin_zero: [0; 8],
                    };
                    libc::sendto(
                        fd,
                        pkt.as_ptr() as *const libc::c_void,
                        pkt.len(),
                        0,
                        &addr as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                }
                last_send = Some(Instant::now());
            }
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n <= 0 {
                continue;
            }
            if let Some((src, rid, seq)) = parse_reply(&buf[..n as usize]) {
                let i = usize::from(seq);
                if rid == id && i < targets.len() && targets[i] == src {
                    answered[i] = true;
                }
            }
        }
        libc::close(fd);
        Ok(targets.iter().zip(answered).filter(|(_, a)| !a).map(|(t, _)| *t).collect())
    }
}

/// Pings `targets` from inside namespace `ns`; returns those that did not
/// answer.
pub fn ping_from(ns: &str, targets: Vec<Ipv4Addr>, timeout: Duration) -> Result<Vec<Ipv4Addr>> {
    if targets.len() > usize::from(u16::MAX) {
        bail!("too many targets");
    }
    let id = (std::process::id() as u16) ^ (ns.bytes().fold(0u16, |h, b| h.rotate_left(5) ^ u16::from(b)));
    let res = sys::in_netns(ns, move || ping_here(&targets, id, timeout))?;
    Ok(res?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn parses_a_reply() {
        let mut ip = vec![0x45u8, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 9, 2, 10, 0, 6, 20];
        let mut icmp = echo_request(9, 3);
        icmp[0] = 0;
        ip.extend(icmp);
        assert_eq!(parse_reply(&ip), Some((Ipv4Addr::new(10, 0, 9, 2), 9, 3)));
        ip[20] = 8;
        assert_eq!(parse_reply(&ip), None);
    }
}
