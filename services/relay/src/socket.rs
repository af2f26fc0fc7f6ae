//! The relay's socket loop: one UDP socket, batched receive (recvmmsg) and
//! batched send (sendmmsg), no allocation per packet. The table is read
//! through an `ArcSwap` once per batch; the GOP caches are locked at most
//! once per batch.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

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
    /// Packets of an unknown SSRC held for a table that may learn it.
    pub held_early: AtomicU64,
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
    pub held_early: u64,
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
            held_early: g(&self.held_early),
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
    /// Set when a new table may know the SSRC of held packets: the relay
    /// thread sends them on before the next packets it forwards, so that
    /// no send happens on the publisher's thread (which may hold locks of
    /// its own) and the stream keeps its order.
    early_ready: AtomicBool,
}

/// Packets of an SSRC not (yet) in the table. A node that has just joined
/// a stream hears its first packets, often the keyframe, a moment before
/// the join's answer tells it the SSRCs; they are held briefly and sent on
/// when the table learns them. Only packets from the hosts that may send
/// a stream here (the node's neighbours) are held, so that strangers'
/// datagrams cannot push the real ones out, and the buffers are reused:
/// nothing is allocated per packet once the ring has grown.
struct Early {
    /// Hosts whose unknown packets are held (None: any host).
    from: Option<Vec<IpAddr>>,
    held: VecDeque<Held>,
    spare: Vec<Vec<u8>>,
}

struct Held {
    at: Instant,
    ssrc: u32,
    src: SocketAddr,
    bytes: Vec<u8>,
}

/// How many early packets are held, and for how long.
const EARLY_PACKETS: usize = 512;
const EARLY_FOR: Duration = Duration::from_millis(1500);

impl Early {
    /// Holds a packet of an unknown SSRC; false if its sender is not one
    /// whose packets are held.
    fn hold(&mut self, ssrc: u32, src: SocketAddr, bytes: &[u8], now: Instant) -> bool {
        if self.from.as_ref().is_some_and(|from| !from.contains(&src.ip())) {
            return false;
        }
        let mut buf = match self.held.len() {
            EARLY_PACKETS => self.held.pop_front().map(|h| h.bytes).unwrap_or_default(),
            _ => self.spare.pop().unwrap_or_else(|| Vec::with_capacity(BUF)),
        };
        buf.clear();
        buf.extend_from_slice(bytes);
        self.held.push_back(Held { at: now, ssrc, src, bytes: buf });
        true
    }

    /// Moves the held packets whose SSRC `table` knows into `out`, oldest
    /// first, and forgets the ones held too long.
    fn take_known(&mut self, table: &ForwardTable, now: Instant, out: &mut Vec<Held>) {
        let mut keep = VecDeque::new();
        std::mem::swap(&mut keep, &mut self.held);
        for h in keep {
            if now.duration_since(h.at) >= EARLY_FOR {
                self.spare.push(h.bytes);
            } else if table.get(h.ssrc).is_some() {
                out.push(h);
            } else {
                self.held.push_back(h);
            }
        }
    }
}

/// Where forwarded packets go out: the batch of the socket loop, or one
/// send at a time for packets made by this node's own pipeline.
trait Sink {
    /// Sends `bytes` to `dest`; the bytes stay untouched until the sink is
    /// flushed.
    fn send(&mut self, bytes: &[u8], dest: &SocketAddr, counters: &Counters);
}

/// A send per packet, at once.
struct Direct<'s>(&'s UdpSocket);

impl Sink for Direct<'_> {
    fn send(&mut self, bytes: &[u8], dest: &SocketAddr, counters: &Counters) {
        match self.0.send_to(bytes, dest) {
            Ok(n) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
                counters.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The GOP caches, locked on first need and held for the rest of a batch:
/// one lock per batch, not one per video packet.
struct GopsGuard<'r> {
    relay: &'r Relay,
    guard: Option<MutexGuard<'r, HashMap<u32, GopCache>>>,
}

impl GopsGuard<'_> {
    /// Caches a packet of a video SSRC; false (and counted) if it is a
    /// copy of one that came lately, not to be forwarded again.
    fn admit(&mut self, ssrc: u32, packet: &Packet<'_>) -> bool {
        let gops = self.guard.get_or_insert_with(|| self.relay.gops());
        let fresh = gops.get_mut(&ssrc).is_none_or(|cache| cache.admit(packet));
        if !fresh {
            self.relay.counters.dropped_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        fresh
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
            early: Mutex::new(Early { from: None, held: VecDeque::new(), spare: Vec::new() }),
            early_ready: AtomicBool::new(false),
        }))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Holds early packets (see [`Early`]) only from these hosts: the
    /// neighbours a stream can come from. By default any host's are held.
    pub fn hold_early_from(&self, hosts: Vec<IpAddr>) {
        self.early().from = Some(hosts);
    }

    /// Replaces the forwarding table; the loop picks it up at its next
    /// batch, and sends on the held packets the table now knows.
    pub fn publish(&self, table: ForwardTable) {
        {
            let mut gops = self.gops();
            gops.retain(|ssrc, _| table.get(*ssrc).is_some_and(|r| r.cache_gop));
            for ssrc in table.cached() {
                gops.entry(ssrc).or_default();
            }
        }
        self.table.store(Arc::new(table));
        // Always: a packet the loop held under the old table a moment ago
        // may be one the new table knows.
        self.early_ready.store(true, Ordering::Release);
    }

    fn early(&self) -> MutexGuard<'_, Early> {
        self.early.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gops(&self) -> MutexGuard<'_, HashMap<u32, GopCache>> {
        self.gops.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut out = Direct(&self.socket);
        for p in &packets {
            let rtcp = Packet::parse(p).is_ok_and(|p| p.kind() == Kind::Rtcp);
            out.send(p, if rtcp { &dest.rtcp } else { &dest.rtp }, &self.counters);
            tally.add(1, p.len() as u64);
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

    /// Sends one packet along its route: the one way every path (the
    /// socket loop, held packets, the node's own pipeline) forwards and
    /// counts a packet. A video packet that is a copy of one that came
    /// lately is dropped (false). Copies for players on a continuity line
    /// are made in `scratch`, which must stay untouched until `out` is
    /// flushed.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn forward(
        &self,
        packet: &Packet<'_>,
        ssrc: u32,
        route: &Route,
        rtcp: bool,
        now_ms: u64,
        gops: &mut GopsGuard<'_>,
        scratch: &mut [u8],
        out: &mut impl Sink,
    ) -> bool {
        let bytes = packet.bytes();
        route.heard.mark(now_ms);
        route.received.add(1, bytes.len() as u64);
        if route.cache_gop && !gops.admit(ssrc, packet) {
            return false;
        }
        for (j, d) in route.downstream.iter().enumerate() {
            out.send(bytes, d, &self.counters);
            route.count_sent(j, bytes.len());
        }
        if !route.split.is_empty() {
            if let Some(b) = route.for_split(bytes, scratch) {
                for d in route.split_targets(rtcp) {
                    out.send(b, d, &self.counters);
                    route.split_sent.add(1, b.len() as u64);
                }
            }
        }
        true
    }

    /// Forwards a packet made by this node's own pipeline.
    pub fn inject(&self, bytes: &[u8]) {
        let table = self.table.load();
        self.counters.injected.fetch_add(1, Ordering::Relaxed);
        match decide(&table, bytes, None) {
            Verdict::Forward { packet, ssrc, route, rtcp } => {
                let mut gops = GopsGuard { relay: self, guard: None };
                let mut scratch = if route.continuity.is_some() { vec![0u8; bytes.len()] } else { Vec::new() };
                self.forward(
                    &packet,
                    ssrc,
                    route,
                    rtcp,
                    clock_ms(),
                    &mut gops,
                    &mut scratch,
                    &mut Direct(&self.socket),
                );
            }
            Verdict::Drop(reason) => {
                self.counters.drop_reason(reason).fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends on the held packets whose SSRC the table now knows, through
    /// `out` (flushed after each, so that one scratch buffer serves all).
    fn release_early(
        &self,
        table: &ForwardTable,
        gops: &mut GopsGuard<'_>,
        scratch: &mut [u8],
        released: &mut Vec<Held>,
        out: &mut Outbox,
    ) {
        self.early().take_known(table, Instant::now(), released);
        let now_ms = clock_ms();
        for h in released.iter() {
            if let Verdict::Forward { packet, ssrc, route, rtcp } = decide(table, &h.bytes, Some(h.src)) {
                self.forward(&packet, ssrc, route, rtcp, now_ms, gops, scratch, out);
                out.flush(&self.counters);
            }
        }
        self.early().spare.extend(released.drain(..).map(|h| h.bytes));
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
        let mut out = Outbox::new(fd);
        let mut released = Vec::new();

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
            // The flag is read before the table: a table published before
            // the flag was set is then the one loaded (or a newer one).
            let release = self.early_ready.swap(false, Ordering::Acquire);
            let table = self.table.load();
            let mut gops = GopsGuard { relay: self, guard: None };
            // Held packets go first: they came before this batch.
            if release {
                self.release_early(&table, &mut gops, &mut rewritten[0], &mut released, &mut out);
            }
            if n <= 0 {
                continue; // timeout, EINTR, or a transient error (ICMP report)
            }
            let n = n as usize;
            let now_ms = clock_ms();
            let mut in_bytes = 0u64;
            for i in 0..n {
                let len = msgs[i].msg_len as usize;
                in_bytes += len as u64;
                let src = from_storage(&names[i]);
                match decide(&table, &bufs[i][..len], src) {
                    Verdict::Forward { packet, ssrc, route, rtcp } => {
                        // Copies for players go from their own buffer,
                        // alive until the batch is flushed.
                        self.forward(&packet, ssrc, route, rtcp, now_ms, &mut gops, &mut rewritten[i], &mut out);
                    }
                    Verdict::Drop(reason) => {
                        self.counters.drop_reason(reason).fetch_add(1, Ordering::Relaxed);
                        if let (DropReason::UnknownSsrc(ssrc), Some(src)) = (reason, src) {
                            if self.early().hold(ssrc, src, &bufs[i][..len], Instant::now()) {
                                self.counters.held_early.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            drop(gops);
            out.flush(&self.counters);
            self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
            self.counters.received_bytes.fetch_add(in_bytes, Ordering::Relaxed);
        }
    }
}

/// Sends queued for one sendmmsg call; the iovecs point into the receive
/// buffers, which stay untouched until the flush.
struct Outbox {
    fd: libc::c_int,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    len: usize,
}

impl Outbox {
    fn new(fd: libc::c_int) -> Self {
        Outbox {
            fd,
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

    fn flush(&mut self, counters: &Counters) {
        let fd = self.fd;
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

impl Sink for Outbox {
    fn send(&mut self, bytes: &[u8], dest: &SocketAddr, counters: &Counters) {
        if self.is_full() {
            self.flush(counters);
        }
        self.push(bytes, dest);
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
    fn only_a_neighbours_early_packets_are_held() {
        let relay = Relay::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        relay.hold_early_from(vec!["127.0.0.1".parse().unwrap()]);
        let neighbour = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s2) = (relay.clone(), stop.clone());
        let th = std::thread::spawn(move || r.run(&s2));
        let to = relay.local_addr().unwrap();
        let mut pkt = [0u8; 100];
        for seq in 0..3u16 {
            write_header(&mut pkt, 96, seq, 0, 77);
            neighbour.send_to(&pkt, to).unwrap();
        }
        // More than the ring holds, from a host that is no neighbour.
        for seq in 0..(EARLY_PACKETS as u16 + 100) {
            write_header(&mut pkt, 96, seq, 0, 78);
            stranger.send_to(&pkt, to).unwrap();
            if seq % 64 == 0 {
                std::thread::sleep(Duration::from_millis(2)); // within the socket buffer
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.counters().dropped_unknown_ssrc < 3 + EARLY_PACKETS as u64 + 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut t = ForwardTable::default();
        t.insert(77, Route::plain(Accept::From(neighbour.local_addr().unwrap()), vec![sink.local_addr().unwrap()]));
        t.insert(78, Route::plain(Accept::From(stranger.local_addr().unwrap()), vec![sink.local_addr().unwrap()]));
        relay.publish(t);
        let mut buf = [0u8; 2048];
        for seq in 0..3u16 {
            sink.recv(&mut buf).expect("the neighbour's held packets are sent on");
            assert_eq!((u16::from_be_bytes([buf[2], buf[3]]), buf[11]), (seq, 77));
        }
        assert!(sink.recv(&mut buf).is_err(), "the stranger's packets were not held");
        stop.store(true, Ordering::Relaxed);
        th.join().unwrap();
        assert_eq!(relay.counters().held_early, 3);
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
