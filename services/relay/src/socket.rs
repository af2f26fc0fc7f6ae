//! The relay's socket loop: one UDP socket, batched receive (recvmmsg) and
//! batched send (sendmmsg), no allocation per packet, no lock: the table is
//! read through an `ArcSwap` once per batch.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::continuity::SharedContinuity;
use crate::gop::GopCache;
use crate::table::{clock_ms, decide, DropReason, ForwardTable, Route, SplitDest, Tally, Verdict};
use overlay_core::rtp::{Kind, Packet};

const BATCH: usize = 32;
const MAX_OUT: usize = 512;
const BUF: usize = 2048;
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Packet counters of one relay, updated once per batch.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub injected: AtomicU64,
    pub dropped_not_rtp: AtomicU64,
    pub dropped_unknown_ssrc: AtomicU64,
    pub dropped_wrong_source: AtomicU64,
    /// Copies of packets that came lately (a GOP burst overlapping the
    /// live stream).
    pub dropped_duplicate: AtomicU64,
    pub send_errors: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub received: u64,
    pub received_bytes: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub injected: u64,
    pub dropped_not_rtp: u64,
    pub dropped_unknown_ssrc: u64,
    pub dropped_wrong_source: u64,
    pub dropped_duplicate: u64,
    pub send_errors: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            received: g(&self.received),
            received_bytes: g(&self.received_bytes),
            sent: g(&self.sent),
            sent_bytes: g(&self.sent_bytes),
            injected: g(&self.injected),
            dropped_not_rtp: g(&self.dropped_not_rtp),
            dropped_unknown_ssrc: g(&self.dropped_unknown_ssrc),
            dropped_wrong_source: g(&self.dropped_wrong_source),
            dropped_duplicate: g(&self.dropped_duplicate),
            send_errors: g(&self.send_errors),
        }
    }

    fn drop_reason(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::NotRtp => &self.dropped_not_rtp,
            DropReason::UnknownSsrc(_) => &self.dropped_unknown_ssrc,
            DropReason::WrongSource => &self.dropped_wrong_source,
        }
    }
}

/// One node's data plane.
pub struct Relay {
    socket: UdpSocket,
    table: ArcSwap<ForwardTable>,
    counters: Counters,
    gops: Mutex<HashMap<u32, GopCache>>,
    early: Mutex<Early>,
}

/// Packets of an SSRC not (yet) in the table. A node that has just joined
/// a stream hears its first packets, often the keyframe, a moment before
/// the join's answer tells it the SSRCs; they are held briefly and sent on
/// when the table learns them.
#[derive(Default)]
struct Early {
    packets: std::collections::VecDeque<(std::time::Instant, u32, SocketAddr, Vec<u8>)>,
}

/// How many early packets are held, and for how long.
const EARLY_PACKETS: usize = 512;
const EARLY_FOR: Duration = Duration::from_millis(1500);

impl Early {
    fn hold(&mut self, ssrc: u32, src: SocketAddr, bytes: &[u8]) {
        if self.packets.len() == EARLY_PACKETS {
            self.packets.pop_front();
        }
        self.packets.push_back((std::time::Instant::now(), ssrc, src, bytes.to_vec()));
    }
}

impl Relay {
    /// Binds the data socket.
    pub fn bind(addr: SocketAddr) -> io::Result<Arc<Relay>> {
        let socket = UdpSocket::bind(addr)?;
        let fd = socket.as_raw_fd();
        // Best effort: the FORCE variants pass rmem_max/wmem_max when
        // privileged; otherwise the kernel caps the plain ones.
        for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
            for opt in [force, plain] {
                let done = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        opt,
                        &SOCKET_BUFFER as *const _ as *const libc::c_void,
                        size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if done == 0 {
                    break;
                }
            }
        }
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Arc::new(Relay {
            socket,
            table: ArcSwap::from_pointee(ForwardTable::default()),
            counters: Counters::default(),
            gops: Mutex::new(HashMap::new()),
            early: Mutex::new(Early::default()),
        }))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Replaces the forwarding table; the loop picks it up at its next batch.
    pub fn publish(&self, table: ForwardTable) {
        {
            let mut gops = self.gops();
            gops.retain(|ssrc, _| table.get(*ssrc).is_some_and(|r| r.cache_gop));
            for ssrc in table.cached() {
                gops.entry(ssrc).or_default();
            }
        }
        let table = Arc::new(table);
        self.table.store(table.clone());
        self.release_early(&table);
    }

    /// Sends on the held packets whose SSRC the table now knows.
    fn release_early(&self, table: &ForwardTable) {
        let ready: Vec<(SocketAddr, Vec<u8>)> = {
            let mut early = self.early.lock().unwrap_or_else(|p| p.into_inner());
            early.packets.retain(|(at, ..)| at.elapsed() < EARLY_FOR);
            let (ready, keep): (Vec<_>, Vec<_>) =
                early.packets.drain(..).partition(|(_, ssrc, ..)| table.get(*ssrc).is_some());
            early.packets.extend(keep);
            ready.into_iter().map(|(_, _, src, bytes)| (src, bytes)).collect()
        };
        for (src, bytes) in ready {
            if let Verdict::Forward { ssrc, route, rtcp } = decide(table, &bytes, Some(src)) {
                route.heard.mark(clock_ms());
                if route.cache_gop && !self.remember(ssrc, &bytes) {
                    continue;
                }
                self.send_along(&bytes, route, rtcp);
            }
        }
    }

    fn gops(&self) -> std::sync::MutexGuard<'_, HashMap<u32, GopCache>> {
        self.gops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Caches a packet of a video SSRC; false (and counted) if it is a
    /// copy of one that came lately, not to be forwarded again.
    fn remember(&self, ssrc: u32, bytes: &[u8]) -> bool {
        let fresh = self.gops().get_mut(&ssrc).is_none_or(|cache| cache.admit(bytes));
        if !fresh {
            self.counters.dropped_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    /// How many packets the cached GOP of `ssrc` holds.
    pub fn gop_len(&self, ssrc: u32) -> usize {
        self.gops().get(&ssrc).map_or(0, GopCache::len)
    }

    /// Sends the cached GOP of `ssrc` (packets since its last keyframe) to
    /// `dest`, so a viewer starting now decodes at once. Returns the count.
    pub fn send_gop(&self, ssrc: u32, dest: SocketAddr, tally: &Tally) -> usize {
        self.send_gop_on(ssrc, SplitDest { rtp: dest, rtcp: dest }, None, tally)
    }

    /// [`Relay::send_gop`] to a destination with a port for RTP and one for
    /// RTCP, each packet rewritten onto a continuity line first when there
    /// is one (RTSP players). What went out is added to `tally`.
    pub fn send_gop_on(&self, ssrc: u32, dest: SplitDest, line: Option<&SharedContinuity>, tally: &Tally) -> usize {
        let mut packets = self.gop(ssrc);
        if let Some(line) = line {
            let mut line = line.lock();
            packets.retain_mut(|p| line.rewrite(p));
        }
        for p in &packets {
            let rtcp = Packet::parse(p).is_ok_and(|p| p.kind() == Kind::Rtcp);
            match self.socket.send_to(p, if rtcp { dest.rtcp } else { dest.rtp }) {
                Ok(n) => {
                    self.counters.sent.fetch_add(1, Ordering::Relaxed);
                    self.counters.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    tally.add(1, n as u64);
                }
                Err(_) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        packets.len()
    }

    /// A copy of the cached GOP of `ssrc` (empty if none).
    pub fn gop(&self, ssrc: u32) -> Vec<Vec<u8>> {
        self.gops().get(&ssrc).map(|c| c.packets().map(<[u8]>::to_vec).collect()).unwrap_or_default()
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Sends one packet to every target of its route, a send at a time (the
    /// paths outside the batched loop). A copy is made only for players on
    /// a continuity line.
    fn send_along(&self, bytes: &[u8], route: &Route, rtcp: bool) {
        let send = |b: &[u8], d: &SocketAddr| match self.socket.send_to(b, d) {
            Ok(n) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                self.counters.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        };
        route.received.add(1, bytes.len() as u64);
        for (j, d) in route.downstream.iter().enumerate() {
            send(bytes, d);
            route.count_sent(j, bytes.len());
        }
        if route.split.is_empty() {
            return;
        }
        let mut scratch = if route.continuity.is_some() { vec![0u8; bytes.len()] } else { Vec::new() };
        if let Some(b) = route.for_split(bytes, &mut scratch) {
            for d in route.split_targets(rtcp) {
                send(b, d);
                route.split_sent.add(1, b.len() as u64);
            }
        }
    }

    /// Forwards a packet made by this node's own pipeline.
    pub fn inject(&self, bytes: &[u8]) {
        let table = self.table.load();
        self.counters.injected.fetch_add(1, Ordering::Relaxed);
        match decide(&table, bytes, None) {
            Verdict::Forward { ssrc, route, rtcp } => {
                if route.cache_gop {
                    self.remember(ssrc, bytes);
                }
                self.send_along(bytes, route, rtcp);
            }
            Verdict::Drop(reason) => {
                self.counters.drop_reason(reason).fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Receives and forwards until `stop` is set (checked at least every
    /// 100 ms). Runs on a thread of its own.
    pub fn run(&self, stop: &AtomicBool) {
        let fd = self.socket.as_raw_fd();
        let mut bufs = vec![[0u8; BUF]; BATCH];
        let mut rewritten = vec![[0u8; BUF]; BATCH];
        let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; BATCH];
        let mut iovs: Vec<libc::iovec> = vec![unsafe { zeroed() }; BATCH];
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
        let mut out = Outbox::new();

        while !stop.load(Ordering::Relaxed) {
            for i in 0..BATCH {
                iovs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: BUF };
                msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
                msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                msgs[i].msg_hdr.msg_iov = &mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_len = 0;
            }
            let n = unsafe {
                libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_WAITFORONE, std::ptr::null_mut())
            };
            if n <= 0 {
                continue; // timeout, EINTR, or a transient error (ICMP report)
            }
            let n = n as usize;
            let table = self.table.load();
            let now_ms = clock_ms();
            let mut in_bytes = 0u64;
            for i in 0..n {
                let len = msgs[i].msg_len as usize;
                in_bytes += len as u64;
                let src = from_storage(&names[i]);
                match decide(&table, &bufs[i][..len], src) {
                    Verdict::Forward { ssrc, route, rtcp } => {
                        route.heard.mark(now_ms);
                        route.received.add(1, len as u64);
                        if route.cache_gop && !self.remember(ssrc, &bufs[i][..len]) {
                            continue;
                        }
                        for (j, d) in route.downstream.iter().enumerate() {
                            if out.is_full() {
                                out.flush(fd, &self.counters);
                            }
                            out.push(&bufs[i][..len], d);
                            route.count_sent(j, len);
                        }
                        if !route.split.is_empty() {
                            // Copies for players go from their own buffer,
                            // alive until the batch is flushed.
                            if let Some(b) = route.for_split(&bufs[i][..len], &mut rewritten[i]) {
                                for d in route.split_targets(rtcp) {
                                    if out.is_full() {
                                        out.flush(fd, &self.counters);
                                    }
                                    out.push(b, d);
                                    route.split_sent.add(1, b.len() as u64);
                                }
                            }
                        }
                    }
                    Verdict::Drop(reason) => {
                        self.counters.drop_reason(reason).fetch_add(1, Ordering::Relaxed);
                        if let (DropReason::UnknownSsrc(ssrc), Some(src)) = (reason, src) {
                            self.early.lock().unwrap_or_else(|p| p.into_inner()).hold(ssrc, src, &bufs[i][..len]);
                        }
                    }
                }
            }
            out.flush(fd, &self.counters);
            self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
            self.counters.received_bytes.fetch_add(in_bytes, Ordering::Relaxed);
        }
    }
}

/// Sends queued for one sendmmsg call; the iovecs point into the receive
/// buffers, which stay untouched until the flush.
struct Outbox {
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    len: usize,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            names: vec![unsafe { zeroed() }; MAX_OUT],
            iovs: vec![unsafe { zeroed() }; MAX_OUT],
            msgs: vec![unsafe { zeroed() }; MAX_OUT],
            len: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.len == MAX_OUT
    }

    fn push(&mut self, bytes: &[u8], dest: &SocketAddr) {
        let i = self.len;
        let namelen = to_storage(dest, &mut self.names[i]);
        self.iovs[i] = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        let hdr = &mut self.msgs[i].msg_hdr;
        hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = namelen;
        hdr.msg_iov = &mut self.iovs[i];
        hdr.msg_iovlen = 1;
        self.len += 1;
    }

    fn flush(&mut self, fd: libc::c_int, counters: &Counters) {
        let mut done = 0;
        let mut bytes = 0u64;
        let mut sent = 0u64;
        while done < self.len {
            let r = unsafe { libc::sendmmsg(fd, self.msgs[done..].as_mut_ptr(), (self.len - done) as libc::c_uint, 0) };
            if r <= 0 {
                // The message at `done` failed (unreachable port, full
                // queue): count it and go on with the rest.
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
                done += 1;
                continue;
            }
            for m in &self.msgs[done..done + r as usize] {
                bytes += u64::from(m.msg_len);
            }
            sent += r as u64;
            done += r as usize;
        }
        counters.sent.fetch_add(sent, Ordering::Relaxed);
        counters.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.len = 0;
    }
}

fn to_storage(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            let sin: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            let sin6: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Accept, Heard};
    use overlay_core::rtp::write_header;

    #[test]
    fn sockaddr_round_trip() {
        for a in ["10.1.2.3:7071", "[::1]:5000"] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut s: libc::sockaddr_storage = unsafe { zeroed() };
            to_storage(&addr, &mut s);
            assert_eq!(from_storage(&s), Some(addr));
        }
    }

    #[test]
    fn forwards_real_datagrams_and_counts_garbage() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sinks: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for s in &sinks {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let heard = Heard::default();
        let (received, first) = (Tally::default(), Tally::default());
        let mut t = ForwardTable::default();
        t.insert(
            9,
            Route {
                accept: Accept::From(sender.local_addr().unwrap()),
                downstream: sinks.iter().map(|s| s.local_addr().unwrap()).collect(),
                split: Vec::new(),
                continuity: None,
                cache_gop: false,
                heard: heard.clone(),
                received: received.clone(),
                sent: vec![first.clone()],
                split_sent: Default::default(),
            },
        );
        assert_eq!(heard.silent_ms(), None);
        relay.publish(t);
        let stop = Arc::new(AtomicBool::new(false));
        let r = relay.clone();
        let s2 = stop.clone();
        let th = std::thread::spawn(move || r.run(&s2));
        let dest = relay.local_addr().unwrap();
        sender.send_to(b"not rtp at all", dest).unwrap();
        let mut pkt = [0u8; 300];
        for seq in 0..10u16 {
            write_header(&mut pkt, 96, seq, 0, 9);
            sender.send_to(&pkt, dest).unwrap();
        }
        write_header(&mut pkt, 96, 0, 0, 10);
        sender.send_to(&pkt, dest).unwrap();
        let mut buf = [0u8; 2048];
        for s in &sinks {
            for seq in 0..10u16 {
                let n = s.recv(&mut buf).unwrap();
                assert_eq!(n, 300);
                assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), seq);
            }
        }
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
        // The route's tallies: ten in, ten to the first sink; the other
        // sinks have none and are not counted.
        assert_eq!(received.get(), (10, 3000));
        assert_eq!(first.get(), (10, 3000));
        // The forwarded packets marked their stream as heard just now.
        assert!(heard.silent_ms().is_some_and(|ms| ms < 60_000), "{:?}", heard.silent_ms());
        let c = relay.counters();
        assert_eq!(c.received, 12);
        assert_eq!(c.sent, 30);
        assert_eq!(c.dropped_not_rtp, 1);
        assert_eq!(c.dropped_unknown_ssrc, 1);
    }

    #[test]
    fn packets_that_beat_the_table_are_sent_on_when_it_knows_them() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s2) = (relay.clone(), stop.clone());
        let th = std::thread::spawn(move || r.run(&s2));
        let mut pkt = [0u8; 100];
        for seq in 0..3u16 {
            write_header(&mut pkt, 96, seq, 0, 77);
            sender.send_to(&pkt, relay.local_addr().unwrap()).unwrap();
        }
        // A sender report too: its SSRC sits elsewhere in the header.
        let sr = overlay_core::rtp::sender_report(77, 1.0e9, 0, 3, 300);
        sender.send_to(&sr, relay.local_addr().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut t = ForwardTable::default();
        let route = Route {
            accept: Accept::From(sender.local_addr().unwrap()),
            downstream: vec![sink.local_addr().unwrap()],
            split: Vec::new(),
            continuity: None,
            cache_gop: false,
            heard: Heard::default(),
            ..Route::plain(Accept::Any, Vec::new())
        };
        t.insert(77, route);
        relay.publish(t);
        let mut buf = [0u8; 2048];
        for seq in 0..3u16 {
            sink.recv(&mut buf).unwrap();
            assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), seq);
        }
        let n = sink.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &sr[..], "the early sender report follows");
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
    }

    #[test]
    fn a_split_destination_gets_rtp_on_one_port_and_rtcp_on_the_other() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (rtp, rtcp, mux) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        for s in [&rtp, &rtcp, &mux] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let mut t = ForwardTable::default();
        let split = SplitDest { rtp: rtp.local_addr().unwrap(), rtcp: rtcp.local_addr().unwrap() };
        let route = Route {
            accept: Accept::From(sender.local_addr().unwrap()),
            downstream: vec![mux.local_addr().unwrap()],
            split: vec![split],
            continuity: None,
            cache_gop: true,
            heard: Heard::default(),
            ..Route::plain(Accept::Any, Vec::new())
        };
        t.insert(77, route);
        relay.publish(t);
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s2) = (relay.clone(), stop.clone());
        let th = std::thread::spawn(move || r.run(&s2));
        let mut pkt = [0u8; 100];
        write_header(&mut pkt, 96, 5, 0, 77);
        let sr = overlay_core::rtp::sender_report(77, 1.0e9, 0, 3, 300);
        sender.send_to(&pkt, relay.local_addr().unwrap()).unwrap();
        sender.send_to(&sr, relay.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2048];
        let n = rtp.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pkt[..]);
        let n = rtcp.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &sr[..]);
        for want in [&pkt[..], &sr[..]] {
            let n = mux.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want, "the one-port destination gets both");
        }
        rtp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(rtp.recv(&mut buf).is_err(), "no RTCP on the RTP port");
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
    }

    #[test]
    fn a_bye_reaches_players_on_a_line_and_downstreams() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (player, down) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        for s in [&player, &down] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        let mut t = ForwardTable::default();
        t.insert(
            77,
            Route {
                accept: Accept::From(up.local_addr().unwrap()),
                downstream: vec![down.local_addr().unwrap()],
                split: vec![SplitDest { rtp: player.local_addr().unwrap(), rtcp: player.local_addr().unwrap() }],
                continuity: Some(SharedContinuity::new(90_000)),
                cache_gop: true,
                heard: Heard::default(),
                ..Route::plain(Accept::Any, Vec::new())
            },
        );
        relay.publish(t);
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s2) = (relay.clone(), stop.clone());
        let th = std::thread::spawn(move || r.run(&s2));
        let mut pkt = [0u8; 100];
        write_header(&mut pkt, 96, 5, 0, 77);
        let bye = [0x81, 203, 0, 1, 0, 0, 0, 77];
        up.send_to(&pkt, relay.local_addr().unwrap()).unwrap();
        up.send_to(&bye, relay.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2048];
        for s in [&down, &player] {
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(n, pkt.len());
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &bye[..]);
        }
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
    }

    #[test]
    fn players_on_a_line_see_one_stream_when_the_source_changes() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (up1, up2) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        let player = UdpSocket::bind("127.0.0.1:0").unwrap();
        player.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let line = SharedContinuity::new(90_000);
        let split = vec![SplitDest { rtp: player.local_addr().unwrap(), rtcp: player.local_addr().unwrap() }];
        let route = |from: &UdpSocket| Route {
            accept: Accept::From(from.local_addr().unwrap()),
            downstream: Vec::new(),
            split: split.clone(),
            continuity: Some(line.clone()),
            cache_gop: false,
            heard: Heard::default(),
            ..Route::plain(Accept::Any, Vec::new())
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s2) = (relay.clone(), stop.clone());
        let th = std::thread::spawn(move || r.run(&s2));
        let mut t = ForwardTable::default();
        t.insert(7, route(&up1));
        relay.publish(t);
        let mut pkt = [0u8; 100];
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        for seq in [100u16, 101] {
            write_header(&mut pkt, 96, seq, u32::from(seq) * 3000, 7);
            up1.send_to(&pkt, relay.local_addr().unwrap()).unwrap();
            let n = player.recv(&mut buf).unwrap();
            let p = Packet::parse(&buf[..n]).unwrap();
            got.push((p.ssrc(), p.sequence()));
        }
        // The tree re-roots: another server's SSRC, far-off numbers.
        let mut t = ForwardTable::default();
        t.insert(9, route(&up2));
        relay.publish(t);
        for seq in [7u16, 8] {
            write_header(&mut pkt, 96, seq, 55, 9);
            up2.send_to(&pkt, relay.local_addr().unwrap()).unwrap();
            let n = player.recv(&mut buf).unwrap();
            let p = Packet::parse(&buf[..n]).unwrap();
            got.push((p.ssrc(), p.sequence()));
        }
        assert_eq!(got, [(7, 100), (7, 101), (7, 102), (7, 103)]);
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
    }
}
