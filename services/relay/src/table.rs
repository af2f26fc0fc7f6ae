//! The forwarding table and the per-packet decision.
//!
//! The table maps an SSRC to the one source it may come from and the
//! addresses it goes to. [`decide`] is a pure function of (packet, source,
//! table): the socket loop only carries the verdict out and counts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use overlay_core::rtp::{Kind, Packet};

/// Where packets of an SSRC may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Only from this node's own pipeline (a server's stream).
    Local,
    /// Only from the upstream neighbour's data address.
    From(SocketAddr),
    /// From anywhere (benchmarks and tools).
    Any,
}

/// A destination that takes RTP and RTCP on two ports (an RTSP player
/// over UDP), where a [`Route::downstream`] takes both on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitDest {
    pub rtp: SocketAddr,
    pub rtcp: SocketAddr,
}

/// One SSRC's forwarding entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub accept: Accept,
    /// Destinations taking RTP and RTCP on one port (RFC 5761).
    pub downstream: Vec<SocketAddr>,
    /// Destinations with a port for each (RTSP players): they get copies
    /// rewritten onto `continuity`'s line when there is one.
    pub split: Vec<SplitDest>,
    pub continuity: Option<crate::continuity::SharedContinuity>,
    /// Keep the packets since the last keyframe (a POP's video SSRC).
    pub cache_gop: bool,
    /// Marked whenever a packet of this SSRC is forwarded; the control
    /// plane shares one per stream to notice a silent upstream.
    pub heard: Heard,
    /// What came in on this route (the control plane shares one per
    /// stream, for its metrics).
    pub received: Tally,
    /// What went to each of `downstream`, in its order (a tally per
    /// neighbour and one for viewers, shared by a stream's SSRCs); a
    /// destination past its end is not counted.
    pub sent: Vec<Tally>,
    /// What went to `split` destinations.
    pub split_sent: Tally,
}

/// Milliseconds on a process-wide monotonic clock (what [`Heard`] keeps).
pub fn clock_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When a stream's packets were last forwarded: written by the data plane
/// (one relaxed store per packet), read by the control plane. Clones share
/// the same marker.
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<AtomicU64>);

impl Heard {
    /// A packet went through at `now_ms` ([`clock_ms`]).
    pub fn mark(&self, now_ms: u64) {
        self.0.store(now_ms + 1, Ordering::Relaxed);
    }

    /// Milliseconds since the last packet, `None` before the first.
    pub fn silent_ms(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            at => Some(clock_ms().saturating_sub(at - 1)),
        }
    }
}

impl PartialEq for Heard {
    /// The same marker, not the same reading.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Heard {}

/// Packets and bytes counted by the data plane (two relaxed adds a
/// packet), read by the control plane. Clones share the same counts.
#[derive(Debug, Clone, Default)]
pub struct Tally(Arc<(AtomicU64, AtomicU64)>);

impl Tally {
    pub fn add(&self, packets: u64, bytes: u64) {
        self.0 .0.fetch_add(packets, Ordering::Relaxed);
        self.0 .1.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (packets, bytes) so far.
    pub fn get(&self) -> (u64, u64) {
        (self.0 .0.load(Ordering::Relaxed), self.0 .1.load(Ordering::Relaxed))
    }
}

impl PartialEq for Tally {
    /// The same counts, not the same reading.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Tally {}

impl Route {
    /// A route that forwards from `accept` to `downstream`, counting
    /// nothing per stream, caching no GOP and with no player (benchmarks,
    /// tests, tools).
    pub fn plain(accept: Accept, downstream: Vec<SocketAddr>) -> Route {
        Route {
            accept,
            downstream,
            split: Vec::new(),
            continuity: None,
            cache_gop: false,
            heard: Heard::default(),
            received: Tally::default(),
            sent: Vec::new(),
            split_sent: Tally::default(),
        }
    }

    /// Counts one packet of `len` bytes sent to `downstream[i]`.
    #[inline]
    pub fn count_sent(&self, i: usize, len: usize) {
        if let Some(t) = self.sent.get(i) {
            t.add(1, len as u64);
        }
    }

    /// The split destinations' addresses for a packet (`rtcp`: control).
    pub fn split_targets(&self, rtcp: bool) -> impl Iterator<Item = &SocketAddr> {
        self.split.iter().map(move |s| if rtcp { &s.rtcp } else { &s.rtp })
    }

    /// The copy split destinations get: `bytes` itself, or rewritten into
    /// `scratch` (None: it must not go to them).
    pub fn for_split<'b>(&self, bytes: &'b [u8], scratch: &'b mut [u8]) -> Option<&'b [u8]> {
        match &self.continuity {
            None => Some(bytes),
            Some(c) => {
                let copy = &mut scratch[..bytes.len()];
                copy.copy_from_slice(bytes);
                c.lock().rewrite(copy).then_some(&*copy)
            }
        }
    }
}

/// SSRC → route. Built by the control plane, published whole, read by the
/// data plane without locks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardTable {
    routes: HashMap<u32, Route>,
}

impl ForwardTable {
    pub fn insert(&mut self, ssrc: u32, route: Route) {
        self.routes.insert(ssrc, route);
    }

    pub fn get(&self, ssrc: u32) -> Option<&Route> {
        self.routes.get(&ssrc)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// SSRCs whose GOP is cached.
    pub fn cached(&self) -> impl Iterator<Item = u32> + '_ {
        self.routes.iter().filter(|(_, r)| r.cache_gop).map(|(s, _)| *s)
    }
}

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    NotRtp,
    /// No route for this SSRC (yet): the packet may have beaten the join's
    /// answer.
    UnknownSsrc(u32),
    WrongSource,
}

/// What to do with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a, 'b> {
    /// Send to the route's downstream; `packet` is the datagram parsed,
    /// `ssrc` its SSRC, `rtcp` whether it is control.
    Forward {
        packet: Packet<'b>,
        ssrc: u32,
        route: &'a Route,
        rtcp: bool,
    },
    Drop(DropReason),
}

/// Decides the fate of a datagram received from `src` (None: this node's
/// own pipeline).
pub fn decide<'a, 'b>(table: &'a ForwardTable, bytes: &'b [u8], src: Option<SocketAddr>) -> Verdict<'a, 'b> {
    let Ok(packet) = Packet::parse(bytes) else {
        return Verdict::Drop(DropReason::NotRtp);
    };
    let Some(route) = table.get(packet.ssrc()) else {
        return Verdict::Drop(DropReason::UnknownSsrc(packet.ssrc()));
    };
    let allowed = match (route.accept, src) {
        (Accept::Any, _) => true,
        (Accept::Local, None) => true,
        (Accept::From(up), Some(src)) => up == src,
        _ => false,
    };
    if allowed {
        Verdict::Forward { packet, ssrc: packet.ssrc(), route, rtcp: packet.kind() == Kind::Rtcp }
    } else {
        Verdict::Drop(DropReason::WrongSource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::rtp::write_header;

    fn packet(ssrc: u32) -> Vec<u8> {
        let mut b = vec![0u8; 100];
        write_header(&mut b, 96, 1, 1, ssrc);
        b
    }

    #[test]
    fn forwards_by_ssrc_only_from_the_upstream() {
        let up: SocketAddr = "10.0.0.1:7071".parse().unwrap();
        let other: SocketAddr = "10.0.0.9:7071".parse().unwrap();
        let down: Vec<SocketAddr> = vec!["10.0.1.2:7071".parse().unwrap(), "10.0.2.2:5000".parse().unwrap()];
        let mut t = ForwardTable::default();
        t.insert(42, Route::plain(Accept::From(up), down.clone()));
        t.insert(43, Route::plain(Accept::Local, down.clone()));
        assert!(
            matches!(decide(&t, &packet(42), Some(up)), Verdict::Forward { ssrc: 42, route: r, rtcp: false, .. } if r.downstream == down)
        );
        assert_eq!(decide(&t, &packet(42), Some(other)), Verdict::Drop(DropReason::WrongSource));
        assert_eq!(decide(&t, &packet(42), None), Verdict::Drop(DropReason::WrongSource));
        assert!(
            matches!(decide(&t, &packet(43), None), Verdict::Forward { ssrc: 43, route: r, rtcp: false, .. } if r.downstream == down)
        );
        assert_eq!(decide(&t, &packet(43), Some(up)), Verdict::Drop(DropReason::WrongSource));
        assert_eq!(decide(&t, &packet(44), Some(up)), Verdict::Drop(DropReason::UnknownSsrc(44)));
        assert_eq!(decide(&t, b"hello", Some(up)), Verdict::Drop(DropReason::NotRtp));
    }
}
