//! Datagrams between neighbours: heartbeats, their answers and STATUS
//! probes, as `LinkDatagram` protobuf messages over one UDP socket bound to
//! the control port number. This module encodes, decodes and checks where
//! a datagram comes from; the engine numbers the beats and judges the
//! answers ([`overlay_core::liveness`]), and the node's loops hand it what
//! arrives.
//!
//! Sends never wait: a datagram the kernel cannot take at once is dropped
//! and counted, as a lost packet would be.
//!
//! On a control plane with mutual TLS every link has a key, handed to both
//! ends by the bootstrapper (see [`LinkMaster`]), and each datagram ends in
//! an HMAC over the rest: a host that forges a neighbour's source address
//! still cannot fake a beat, an answer or a probe. Replays are harmless:
//! beats are answered to the neighbour itself, an answer counts once (its
//! sequence number is spent), and a probe is taken once per (server, seq).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use overlay_proto as pb;
use prost::Message;
use ring::hmac;
use tokio::net::UdpSocket;
use tracing::debug;

use crate::node::Neighbour;

/// Largest datagram taken in.
const MAX_DATAGRAM: usize = 65_535;

/// Bytes of the MAC kept in a datagram (of HMAC-SHA256's 32).
const MAC_LEN: usize = 16;
/// The MAC field as it ends a datagram: tag of field 5 (length-delimited),
/// length, MAC.
const MAC_FIELD: [u8; 2] = [(5 << 3) | 2, MAC_LEN as u8];

/// The 32-byte key of one link, known to its two ends.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkKey(pub [u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    /// The key as sent in a `Neighbour` (32 bytes), or `None` if absent.
    pub fn from_wire(bytes: &[u8]) -> Result<Option<LinkKey>, String> {
        match bytes.len() {
            0 => Ok(None),
            32 => Ok(Some(LinkKey(bytes.try_into().expect("32 bytes")))),
            n => Err(format!("a link key has 32 bytes, not {n}")),
        }
    }

    fn hmac(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }
}

/// The bootstrapper's source of link keys: one secret, from which the key
/// of each link is derived by the names of its two ends. Derived from the
/// bootstrapper's private key, so a restarted bootstrapper hands out the
/// same keys and nodes that registered before keep talking.
pub struct LinkMaster(hmac::Key);

impl LinkMaster {
    pub fn from_secret(secret: &[u8]) -> LinkMaster {
        let seed = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), b"overlay link datagram key v1");
        LinkMaster(hmac::Key::new(hmac::HMAC_SHA256, seed.as_ref()))
    }

    /// The key of the link between `a` and `b` (the same either way round).
    pub fn key(&self, a: &str, b: &str) -> LinkKey {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut ctx = hmac::Context::with_key(&self.0);
        // Lengths first, so that no two pairs of names give the same input.
        ctx.update(&(lo.len() as u64).to_be_bytes());
        ctx.update(lo.as_bytes());
        ctx.update(hi.as_bytes());
        LinkKey(ctx.sign().as_ref().try_into().expect("SHA-256 output has 32 bytes"))
    }
}

/// Appends the MAC field to an encoded datagram.
fn seal(key: &hmac::Key, datagram: &mut Vec<u8>) {
    let tag = hmac::sign(key, datagram);
    datagram.extend_from_slice(&MAC_FIELD);
    datagram.extend_from_slice(&tag.as_ref()[..MAC_LEN]);
}

/// Checks the MAC that ends `datagram`; the datagram as received (its MAC
/// field is ignored by the decoder) if right.
fn open<'a>(key: &hmac::Key, datagram: &'a [u8]) -> Option<&'a [u8]> {
    let body_len = datagram.len().checked_sub(MAC_FIELD.len() + MAC_LEN)?;
    let (body, field) = datagram.split_at(body_len);
    if field[..2] != MAC_FIELD {
        return None;
    }
    let tag = hmac::sign(key, body);
    // Constant-time comparison of the truncated tags.
    let diff = tag.as_ref()[..MAC_LEN].iter().zip(&field[2..]).fold(0u8, |d, (a, b)| d | (a ^ b));
    (diff == 0).then_some(datagram)
}

/// What arrived from a neighbour.
#[derive(Debug)]
pub enum Incoming {
    /// A heartbeat to answer (to `reply_to`, where it came from).
    Heartbeat { seq: u64, reply_to: SocketAddr },
    /// The answer to beat `seq` (the engine judges whether it was ours).
    Answer { from: String, seq: u64, carrying: Vec<String> },
    /// A STATUS probe.
    Probe(pb::Probe),
    /// A link notice, from the neighbour named.
    LinkNotice { from: String, notice: pb::LinkNotice },
}

/// Datagrams refused, by reason (for inspect).
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// From an address that is no neighbour's, or naming another sender.
    pub foreign: AtomicU64,
    /// From a neighbour's address on a keyed link, without the right MAC.
    pub unauthenticated: AtomicU64,
    pub undecodable: AtomicU64,
    /// Answers to no beat of ours (late or duplicated).
    pub stale: AtomicU64,
    /// Sends the kernel did not take at once.
    pub send_drops: AtomicU64,
}

/// The node's datagram socket; see the module doc.
pub struct Links {
    me: String,
    socket: UdpSocket,
    peers: HashMap<String, SocketAddr>,
    by_ip: HashMap<IpAddr, String>,
    /// Keys of the links that have one, by neighbour.
    keys: HashMap<String, hmac::Key>,
    pub counters: LinkCounters,
}

impl Links {
    /// Binds `bind` (UDP) for the datagrams of node `me` with these
    /// neighbours, reached at `port` on their addresses.
    pub fn bind(bind: SocketAddr, me: &str, neighbours: &[Neighbour], port: u16) -> std::io::Result<Links> {
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let peers = neighbours.iter().map(|n| (n.name.clone(), SocketAddr::new(n.address, port))).collect();
        let by_ip = neighbours.iter().map(|n| (n.address, n.name.clone())).collect();
        let keys = neighbours.iter().filter_map(|n| n.link_key.as_ref().map(|k| (n.name.clone(), k.hmac()))).collect();
        Ok(Links { me: me.to_string(), socket, peers, by_ip, keys, counters: LinkCounters::default() })
    }

    fn send(&self, to: SocketAddr, body: pb::link_datagram::Body) {
        let datagram = pb::LinkDatagram { sender: self.me.clone(), body: Some(body), mac: Vec::new() };
        let mut bytes = datagram.encode_to_vec();
        if let Some(key) = self.by_ip.get(&to.ip()).and_then(|n| self.keys.get(n)) {
            seal(key, &mut bytes);
        }
        match self.socket.try_send_to(&bytes, to) {
            Ok(_) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.send_drops.fetch_add(1, Ordering::Relaxed);
                debug!(node = %self.me, %to, "datagram not sent: {e}");
            }
        }
    }

    /// Sends heartbeat `seq` to `neighbour`.
    pub fn send_beat(&self, neighbour: &str, seq: u64) {
        if let Some(addr) = self.peers.get(neighbour) {
            self.send(*addr, pb::link_datagram::Body::Heartbeat(pb::Heartbeat { seq }));
        }
    }

    /// Answers a heartbeat.
    pub fn answer(&self, to: SocketAddr, seq: u64, carrying: Vec<String>) {
        self.send(to, pb::link_datagram::Body::HeartbeatReply(pb::HeartbeatReply { seq, carrying }));
    }

    /// Sends a STATUS probe to `neighbour`.
    pub fn send_probe(&self, neighbour: &str, probe: pb::Probe) {
        if let Some(addr) = self.peers.get(neighbour) {
            self.send(*addr, pb::link_datagram::Body::Probe(probe));
        }
    }

    /// Sends a link notice to `neighbour`.
    pub fn send_link_notice(&self, neighbour: &str, notice: pb::LinkNotice) {
        if let Some(addr) = self.peers.get(neighbour) {
            self.send(*addr, pb::link_datagram::Body::LinkNotice(notice));
        }
    }

    /// Waits for the next datagram that is a neighbour's and makes sense.
    pub async fn recv(&self, buf: &mut Vec<u8>) -> std::io::Result<Incoming> {
        buf.resize(MAX_DATAGRAM, 0);
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            if let Some(incoming) = self.take(&buf[..n], from) {
                return Ok(incoming);
            }
        }
    }

    /// Decodes and checks one datagram; `None` (counted) if refused.
    fn take(&self, bytes: &[u8], from: SocketAddr) -> Option<Incoming> {
        let Some(neighbour) = self.by_ip.get(&from.ip()) else {
            self.counters.foreign.fetch_add(1, Ordering::Relaxed);
            debug!(node = %self.me, %from, "datagram from no neighbour's address: dropped");
            return None;
        };
        let bytes = match self.keys.get(neighbour) {
            None => bytes,
            Some(key) => match open(key, bytes) {
                Some(bytes) => bytes,
                None => {
                    self.counters.unauthenticated.fetch_add(1, Ordering::Relaxed);
                    debug!(node = %self.me, %from, %neighbour, "datagram without the link's MAC: dropped");
                    return None;
                }
            },
        };
        let Ok(datagram) = pb::LinkDatagram::decode(bytes) else {
            self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if *neighbour != datagram.sender {
            self.counters.foreign.fetch_add(1, Ordering::Relaxed);
            debug!(node = %self.me, %from, sender = %datagram.sender.chars().take(64).collect::<String>(), "datagram naming another sender than its address says: dropped");
            return None;
        }
        let from_name = datagram.sender;
        match datagram.body? {
            pb::link_datagram::Body::Heartbeat(h) => Some(Incoming::Heartbeat { seq: h.seq, reply_to: from }),
            pb::link_datagram::Body::HeartbeatReply(r) => {
                Some(Incoming::Answer { from: from_name, seq: r.seq, carrying: r.carrying })
            }
            pb::link_datagram::Body::Probe(mut p) => {
                // The probe's sender is who sent the datagram, whatever it says.
                p.sender = from_name;
                Some(Incoming::Probe(p))
            }
            pb::link_datagram::Body::LinkNotice(notice) => Some(Incoming::LinkNotice { from: from_name, notice }),
        }
    }

    /// Counters for inspect.
    pub fn counters_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "sent": get(&c.sent),
            "received": get(&c.received),
            "foreign": get(&c.foreign),
            "unauthenticated": get(&c.unauthenticated),
            "undecodable": get(&c.undecodable),
            "stale": get(&c.stale),
            "send_drops": get(&c.send_drops),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn heartbeat(sender: &str, seq: u64) -> Vec<u8> {
        let body = pb::link_datagram::Body::Heartbeat(pb::Heartbeat { seq });
        pb::LinkDatagram { sender: sender.into(), body: Some(body), mac: Vec::new() }.encode_to_vec()
    }

    #[test]
    fn a_sealed_datagram_opens_with_its_key_and_decodes_as_before() {
        let key = LinkMaster::from_secret(b"secret").key("o1", "o2").hmac();
        let mut bytes = heartbeat("o1", 7);
        seal(&key, &mut bytes);
        let opened = open(&key, &bytes).expect("opens");
        let d = pb::LinkDatagram::decode(opened).unwrap();
        assert_eq!(d.sender, "o1");
        assert_eq!(d.mac.len(), MAC_LEN);
        assert!(matches!(d.body, Some(pb::link_datagram::Body::Heartbeat(pb::Heartbeat { seq: 7 }))));
    }

    #[test]
    fn a_changed_truncated_unsealed_or_foreign_keyed_datagram_does_not_open() {
        let master = LinkMaster::from_secret(b"secret");
        let key = master.key("o1", "o2").hmac();
        let mut bytes = heartbeat("o1", 7);
        seal(&key, &mut bytes);
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            assert!(open(&key, &changed).is_none(), "byte {i} changed");
        }
        assert!(open(&key, &bytes[..bytes.len() - 1]).is_none());
        assert!(open(&key, &heartbeat("o1", 7)).is_none());
        assert!(open(&key, &[]).is_none());
        assert!(open(&master.key("o1", "o3").hmac(), &bytes).is_none());
        assert!(open(&LinkMaster::from_secret(b"other").key("o1", "o2").hmac(), &bytes).is_none());
    }

    #[test]
    fn each_link_has_its_own_key_the_same_from_both_ends() {
        let m = LinkMaster::from_secret(b"secret");
        assert_eq!(m.key("o1", "o2"), m.key("o2", "o1"));
        assert_ne!(m.key("o1", "o2"), m.key("o1", "o3"));
        // Names are length-prefixed: "ab"+"c" is not "a"+"bc".
        assert_ne!(m.key("ab", "c"), m.key("a", "bc"));
        assert_eq!(LinkMaster::from_secret(b"secret").key("o1", "o2"), m.key("o1", "o2"), "stable across restarts");
    }

    #[test]
    fn a_key_on_the_wire_has_32_bytes_or_none() {
        assert_eq!(LinkKey::from_wire(&[]), Ok(None));
        assert!(LinkKey::from_wire(&[1; 32]).unwrap().is_some());
        assert!(LinkKey::from_wire(&[1; 31]).unwrap_err().contains("31"));
    }

    /// Two nodes on 127.0.0.1 and 127.0.0.2 and a forger sending from
    /// 127.0.0.2 (the neighbour's address) with its own socket.
    #[tokio::test]
    async fn a_datagram_from_a_neighbours_address_without_the_links_mac_is_dropped() {
        let master = LinkMaster::from_secret(b"secret");
        let n = |name: &str, ip: [u8; 4], keyed: bool| Neighbour {
            name: name.into(),
            address: IpAddr::from(ip),
            server: false,
            link_key: keyed.then(|| master.key("a", "b")),
        };
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let a =
            Links::bind(SocketAddr::from(([127, 0, 0, 1], port)), "a", &[n("b", [127, 0, 0, 2], true)], port).unwrap();
        let b =
            Links::bind(SocketAddr::from(([127, 0, 0, 2], port)), "b", &[n("a", [127, 0, 0, 1], true)], port).unwrap();
        let forger = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        let to_a = SocketAddr::from(([127, 0, 0, 1], port));
        forger.send_to(&heartbeat("b", 1), to_a).unwrap();
        let mut forged = heartbeat("b", 2);
        seal(&master.key("b", "c").hmac(), &mut forged);
        forger.send_to(&forged, to_a).unwrap();
        // Sends never wait: let the runtime learn the new sockets are writable.
        b.socket.writable().await.unwrap();
        a.socket.writable().await.unwrap();
        b.send_beat("a", 17);
        let mut buf = Vec::new();
        let got = tokio::time::timeout(Duration::from_secs(10), a.recv(&mut buf)).await.unwrap().unwrap();
        let Incoming::Heartbeat { seq, reply_to } = got else { panic!("{got:?}") };
        assert_eq!(seq, 17, "the real beat is the first taken");
        assert_eq!(reply_to.port(), port);
        assert_eq!(a.counters.unauthenticated.load(Ordering::Relaxed), 2);
        // The answer is sealed too, and b takes it as the answer to its beat.
        a.answer(reply_to, seq, vec!["test".into()]);
        let got = tokio::time::timeout(Duration::from_secs(10), b.recv(&mut buf)).await.unwrap().unwrap();
        let Incoming::Answer { from, seq, carrying } = got else { panic!("{got:?}") };
        assert_eq!((from.as_str(), seq, carrying), ("a", 17, vec!["test".to_string()]));

        // Without keys (a plain control plane) the same unsealed datagram is taken.
        let c =
            Links::bind(SocketAddr::from(([127, 0, 0, 3], 0)), "c", &[n("b", [127, 0, 0, 2], false)], port).unwrap();
        forger.send_to(&heartbeat("b", 3), c.socket.local_addr().unwrap()).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), c.recv(&mut buf)).await.unwrap().unwrap();
        assert!(matches!(got, Incoming::Heartbeat { seq: 3, .. }), "{got:?}");
    }
}
