//! Datagrams between neighbours: heartbeats, their answers and STATUS
//! probes, as `LinkDatagram` protobuf messages over one UDP socket bound to
//! the control port number. This module encodes, decodes, checks where a
//! datagram comes from, and keeps the heartbeat bookkeeping
//! ([`overlay_core::liveness`]) with the waiters of one-off checks; the
//! node's loops decide what to do with what arrives.
//!
//! Sends never wait: a datagram the kernel cannot take at once is dropped
//! and counted, as a lost packet would be.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use overlay_core::liveness::{Answer, BeatKind, Expired, Liveness};
use overlay_proto as pb;
use prost::Message;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tracing::debug;

use crate::node::Neighbour;

/// Largest datagram taken in.
const MAX_DATAGRAM: usize = 65_535;

/// What arrived from a neighbour.
#[derive(Debug)]
pub enum Incoming {
    /// A heartbeat to answer (to `reply_to`, where it came from).
    Heartbeat { seq: u64, reply_to: SocketAddr },
    /// The answer to one of our beats.
    Answer { from: String, answer: Answer, carrying: Vec<String> },
    /// A STATUS probe.
    Probe(pb::Probe),
}

/// Datagrams refused, by reason (for inspect).
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// From an address that is no neighbour's, or naming another sender.
    pub foreign: AtomicU64,
    pub undecodable: AtomicU64,
    /// Answers to no beat of ours (late or duplicated).
    pub stale: AtomicU64,
    /// Sends the kernel did not take at once.
    pub send_drops: AtomicU64,
}

/// The node's datagram socket and heartbeat state; see the module doc.
pub struct Links {
    me: String,
    socket: UdpSocket,
    peers: HashMap<String, SocketAddr>,
    by_ip: HashMap<IpAddr, String>,
    liveness: Mutex<Liveness>,
    checks: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
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
        let first_seq = crate::net::unix_us();
        Ok(Links {
            me: me.to_string(),
            socket,
            peers,
            by_ip,
            liveness: Mutex::new(Liveness::new(first_seq)),
            checks: Mutex::new(HashMap::new()),
            counters: LinkCounters::default(),
        })
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<bool>>> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, to: SocketAddr, body: pb::link_datagram::Body) {
        let datagram = pb::LinkDatagram { sender: self.me.clone(), body: Some(body) };
        match self.socket.try_send_to(&datagram.encode_to_vec(), to) {
            Ok(_) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.send_drops.fetch_add(1, Ordering::Relaxed);
                debug!(node = %self.me, %to, "datagram not sent: {e}");
            }
        }
    }

    /// Sends the periodic heartbeat to every neighbour; each is missed if
    /// not answered within `timeout`.
    pub fn beat_all(&self, now: Instant, timeout: Duration) {
        for (name, addr) in &self.peers {
            let seq = self.liveness().send(name, BeatKind::Periodic, now, timeout);
            if let Some(seq) = seq {
                self.send(*addr, pb::link_datagram::Body::Heartbeat(pb::Heartbeat { seq }));
            }
        }
    }

    /// Asks `neighbour` once whether it is there: true if it answers within
    /// `timeout`.
    pub async fn check(&self, neighbour: &str, timeout: Duration) -> bool {
        let Some(addr) = self.peers.get(neighbour).copied() else { return false };
        let (tx, rx) = oneshot::channel();
        let Some(seq) = self.liveness().send(neighbour, BeatKind::Check, Instant::now(), timeout) else {
            return false;
        };
        self.waiters().insert(seq, tx);
        self.send(addr, pb::link_datagram::Body::Heartbeat(pb::Heartbeat { seq }));
        let answered = matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(true)));
        self.waiters().remove(&seq);
        answered
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

    /// Ends the beats whose time is up at `now` and returns the neighbours
    /// that just missed too many in a row. (A check's asker has its own
    /// timeout; its expired beat is only forgotten here.)
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let Expired { lost, .. } = self.liveness().expire(now);
        lost
    }

    /// The neighbour was declared lost another way; see
    /// [`Liveness::mark_lost`].
    pub fn mark_lost(&self, neighbour: &str) {
        self.liveness().mark_lost(neighbour);
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
        let Ok(datagram) = pb::LinkDatagram::decode(bytes) else {
            self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if self.by_ip.get(&from.ip()) != Some(&datagram.sender) {
            self.counters.foreign.fetch_add(1, Ordering::Relaxed);
            debug!(node = %self.me, %from, sender = %datagram.sender.chars().take(64).collect::<String>(), "datagram from no neighbour's address: dropped");
            return None;
        }
        let from_name = datagram.sender;
        match datagram.body? {
            pb::link_datagram::Body::Heartbeat(h) => Some(Incoming::Heartbeat { seq: h.seq, reply_to: from }),
            pb::link_datagram::Body::HeartbeatReply(r) => {
                let answer = self.liveness().on_reply(&from_name, r.seq, Instant::now());
                let Some(answer) = answer else {
                    self.counters.stale.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                if answer.kind == BeatKind::Check {
                    if let Some(tx) = self.waiters().remove(&answer.seq) {
                        let _ = tx.send(true);
                    }
                }
                Some(Incoming::Answer { from: from_name, answer, carrying: r.carrying })
            }
            pb::link_datagram::Body::Probe(mut p) => {
                // The probe's sender is who sent the datagram, whatever it says.
                p.sender = from_name;
                Some(Incoming::Probe(p))
            }
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
            "undecodable": get(&c.undecodable),
            "stale": get(&c.stale),
            "send_drops": get(&c.send_drops),
        })
    }
}
