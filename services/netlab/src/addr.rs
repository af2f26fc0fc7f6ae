//! IPv4 interface addresses (`10.0.18.2/24`) and the subnets they sit on.
//!
//! The lab file writes every address with its prefix length; links, LANs,
//! routes and the overlay checks all reason in terms of these two types.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An address given to an interface, with the prefix length of its subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfAddr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// A subnet: a network address (host bits zero) and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// Why an address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{0:?} is not an IPv4 address with a prefix length (like 10.0.1.2/24)")]
    Syntax(String),
    #[error("{0:?}: prefix length must be 1 to 31")]
    Prefix(String),
    #[error("{0:?} is the network or broadcast address of its subnet")]
    Reserved(String),
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl IfAddr {
    /// The subnet this address sits on.
    pub fn net(&self) -> Net {
        Net { addr: Ipv4Addr::from(u32::from(self.addr) & mask(self.prefix)), prefix: self.prefix }
    }
}

impl Net {
    /// Whether `ip` lies inside this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(&self, other: &Net) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(p) == u32::from(other.addr) & mask(p)
    }
}

impl FromStr for IfAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = s.split_once('/').ok_or_else(|| AddrError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = ip.parse().map_err(|_| AddrError::Syntax(s.to_string()))?;
        let prefix: u8 = len.parse().map_err(|_| AddrError::Syntax(s.to_string()))?;
        if !(1..=31).contains(&prefix) {
            return Err(AddrError::Prefix(s.to_string()));
        }
        let a = IfAddr { addr, prefix };
        if prefix <= 30 {
            let host_bits = u32::from(addr) & !mask(prefix);
            if host_bits == 0 || host_bits == !mask(prefix) {
                return Err(AddrError::Reserved(s.to_string()));
            }
        }
        Ok(a)
    }
}

impl fmt::Display for IfAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_subnet() {
        let a: IfAddr = "10.0.18.2/24".parse().unwrap();
        assert_eq!(a.addr, Ipv4Addr::new(10, 0, 18, 2));
        assert_eq!(a.net().to_string(), "10.0.18.0/24");
        assert!(a.net().contains(Ipv4Addr::new(10, 0, 18, 200)));
        assert!(!a.net().contains(Ipv4Addr::new(10, 0, 19, 1)));
    }

    #[test]
    fn refuses_bad_addresses() {
        assert!(matches!("10.0.18.2".parse::<IfAddr>(), Err(AddrError::Syntax(_))));
        assert!(matches!("10.0.18.2/32".parse::<IfAddr>(), Err(AddrError::Prefix(_))));
        assert!(matches!("10.0.18.0/24".parse::<IfAddr>(), Err(AddrError::Reserved(_))));
        assert!(matches!("10.0.18.255/24".parse::<IfAddr>(), Err(AddrError::Reserved(_))));
        assert!("10.0.18.0/31".parse::<IfAddr>().is_ok());
    }

    #[test]
    fn overlap() {
        let a: IfAddr = "10.0.0.1/16".parse().unwrap();
        let b: IfAddr = "10.0.5.1/24".parse().unwrap();
        let c: IfAddr = "10.1.5.1/24".parse().unwrap();
        assert!(a.net().overlaps(&b.net()));
        assert!(b.net().overlaps(&a.net()));
        assert!(!b.net().overlaps(&c.net()));
    }
}
