//! The socket loop: one thread per direction carries out what the
//! [`Scheduler`] decides, a control thread serves the control socket and a
//! stats thread rewrites the stats file every 500 ms.
//!
//! A direction thread reads frames from its interface in batches, asks the
//! scheduler for each one's departure time (or drop), keeps the frames in a
//! heap ordered by departure, and sleeps in `ppoll` until the next
//! departure or the next frame, never spinning. Frame buffers come from a
//! free list that only grows up to `max_queued`, so a steady flow allocates
//! nothing. SIGINT and SIGTERM write to an eventfd that every thread polls:
//! all of them return, the stats file gets its last version and the
//! control socket is removed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::control::{Dir, DirStats, Reply, Request, Snapshot};
use crate::packet::{PacketSocket, RecvBatch, SendBatch, FRAME_MAX};
use crate::schedule::{Scheduler, Settings, SettingsError, Update, Verdict};

/// Frames read or sent per system call.
const BATCH: usize = 64;
/// How often the stats file is rewritten.
pub const STATS_PERIOD: Duration = Duration::from_millis(500);

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// A label for logs and stats (netlab uses the link's hosts, `o3-o4`).
    pub name: String,
    pub iface_a: String,
    pub iface_b: String,
    pub a2b: Settings,
    pub b2a: Settings,
    pub control: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    pub seed: u64,
    /// Most frames held at once per direction; more are dropped as queue
    /// drops.
    pub max_queued: usize,
    /// Turn offloads off on the two interfaces.
    pub offloads_off: bool,
}

/// The monotonic clock in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    sent_packets: AtomicU64,
    sent_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_kernel: AtomicU64,
    dropped_oversize: AtomicU64,
    send_errors: AtomicU64,
    queued_packets: AtomicU64,
    queued_bytes: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn sub(c: &AtomicU64, n: u64) {
    c.fetch_sub(n, Ordering::Relaxed);
}

/// One direction's settings (changed by the control thread) and counters.
struct DirShared {
    settings: Mutex<Settings>,
    generation: AtomicU64,
    c: Counters,
}

impl DirShared {
    fn new(s: Settings) -> DirShared {
        DirShared { settings: Mutex::new(s), generation: AtomicU64::new(0), c: Counters::default() }
    }

    fn settings(&self) -> Settings {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> DirStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.c;
        DirStats {
            settings: self.settings(),
            packets: g(&c.packets),
            bytes: g(&c.bytes),
            sent_packets: g(&c.sent_packets),
            sent_bytes: g(&c.sent_bytes),
            dropped_loss: g(&c.dropped_loss),
            dropped_queue: g(&c.dropped_queue),
            dropped_kernel: g(&c.dropped_kernel),
            dropped_oversize: g(&c.dropped_oversize),
            send_errors: g(&c.send_errors),
            queued_packets: g(&c.queued_packets),
            queued_bytes: g(&c.queued_bytes),
        }
    }
}

struct Shared {
    name: String,
    iface_a: String,
    iface_b: String,
    started: Instant,
    /// a2b, b2a.
    dirs: [DirShared; 2],
    stop: OwnedFd,
}

impl Shared {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            name: self.name.clone(),
            iface_a: self.iface_a.clone(),
            iface_b: self.iface_b.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            a2b: self.dirs[0].stats(),
            b2a: self.dirs[1].stats(),
        }
    }

    /// Applies an update to one or both directions, all or nothing.
    fn apply(&self, dir: Dir, update: &Update) -> Result<(), SettingsError> {
        let chosen: Vec<usize> = [0, 1].into_iter().filter(|i| dir.includes(*i == 0)).collect();
        let new: Vec<Settings> =
            chosen.iter().map(|i| update.apply(&self.dirs[*i].settings())).collect::<Result<_, _>>()?;
        for (i, s) in chosen.iter().zip(new) {
            *self.dirs[*i].settings.lock().unwrap_or_else(|e| e.into_inner()) = s;
            self.dirs[*i].generation.fetch_add(1, Ordering::Release);
            eprintln!("linkem {}: {} now {}", self.name, ["a2b", "b2a"][*i], describe(&s));
        }
        Ok(())
    }

    fn request_stop(&self) {
        signal_stop(self.stop.as_raw_fd());
    }
}

/// Settings in one line, for the log.
pub fn describe(s: &Settings) -> String {
    let mut parts = vec![format!("delay {} ms", s.delay_ms)];
    if s.jitter_ms > 0.0 {
        parts.push(format!("jitter {} ms{}", s.jitter_ms, if s.reorder { " (reordering)" } else { "" }));
    }
    if s.loss_pct > 0.0 {
        parts.push(format!("loss {}%", s.loss_pct));
    }
    if s.rate_kbit > 0 {
        parts.push(format!("rate {} kbit/s, queue {} ms", s.rate_kbit, s.queue_ms));
    }
    parts.join(", ")
}

static STOP_FD: AtomicI32 = AtomicI32::new(-1);

fn signal_stop(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes to an eventfd; async-signal-safe.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

extern "C" fn on_signal(_: libc::c_int) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        signal_stop(fd);
    }
}

/// Waits until one of `fds` is readable or `timeout_ns` passes.
fn wait(fds: &mut [libc::pollfd], timeout_ns: Option<u64>) -> io::Result<()> {
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let tp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds is a valid array; tp is null or points at ts.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, tp, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
}

/// A frame waiting for its departure.
struct Queued {
    at: u64,
    seq: u64,
    len: usize,
    buf: Box<[u8]>,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// One direction: frames from `rx` to `tx`.
fn forward(
    idx: usize,
    rx: &PacketSocket,
    tx: &PacketSocket,
    shared: &Shared,
    seed: u64,
    max_queued: usize,
) -> io::Result<()> {
    // SAFETY: prctl on this thread only; 1 µs of timer slack keeps ppoll's
    // wake-ups close to the departure times.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let d = &shared.dirs[idx];
    let c = &d.c;
    let mut generation = d.generation.load(Ordering::Acquire);
    let mut sched = Scheduler::new(d.settings(), seed);
    let mut heap: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut free: Vec<Box<[u8]>> = Vec::new();
    let mut allocated = 0usize;
    let mut recv = RecvBatch::new(BATCH);
    let mut send = SendBatch::new(BATCH);
    let mut due: Vec<Queued> = Vec::with_capacity(BATCH);
    let mut seq = 0u64;
    let mut fds = [pollfd(rx.fd()), pollfd(shared.stop.as_raw_fd())];
    loop {
        // Send what is due.
        let now = now_ns();
        while heap.peek().is_some_and(|q| q.0.at <= now) {
            due.clear();
            while due.len() < BATCH && heap.peek().is_some_and(|q| q.0.at <= now) {
                due.push(heap.pop().expect("peeked").0);
            }
            let (sent, err) = tx.send_batch(due.iter().map(|q| &q.buf[..q.len]), &mut send);
            for (i, q) in due.drain(..).enumerate() {
                if i < sent || (i == sent && err.is_some()) {
                    if i < sent {
                        add(&c.sent_packets, 1);
                        add(&c.sent_bytes, q.len as u64);
                    } else {
                        add(&c.send_errors, 1);
                    }
                    sub(&c.queued_packets, 1);
                    sub(&c.queued_bytes, q.len as u64);
                    free.push(q.buf);
                } else {
                    heap.push(Reverse(q)); // not tried yet: next round
                }
            }
        }

        // Sleep until the next departure or the next frame.
        let timeout = heap.peek().map(|q| q.0.at.saturating_sub(now_ns()));
        fds[0].revents = 0;
        fds[1].revents = 0;
        wait(&mut fds, timeout)?;
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 && fds[0].revents & libc::POLLIN == 0 {
            // A pending socket error (the interface went down): read it.
            let mut err: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: valid out pointers of the given size.
            unsafe {
                libc::getsockopt(
                    rx.fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
        }

        // Read what arrived, a few batches at most before sending again.
        for _ in 0..4 {
            let n = match rx.recv_batch(&mut recv) {
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENETDOWN) | Some(libc::EINTR)) => 0,
                Err(e) => return Err(io::Error::new(e.kind(), format!("reading {}: {e}", rx.iface))),
            };
            if n == 0 {
                break;
            }
            let now = now_ns();
            let g = d.generation.load(Ordering::Acquire);
            if g != generation {
                generation = g;
                sched.set(d.settings());
            }
            for i in 0..n {
                let r = recv.got[i];
                if r.is_outgoing() {
                    continue;
                }
                add(&c.packets, 1);
                add(&c.bytes, r.len as u64);
                if r.truncated || r.len > FRAME_MAX {
                    add(&c.dropped_oversize, 1);
                    continue;
                }
                let spare = match free.pop() {
                    Some(b) => b,
                    None if allocated < max_queued => {
                        allocated += 1;
                        vec![0u8; FRAME_MAX].into_boxed_slice()
                    }
                    None => {
                        add(&c.dropped_queue, 1);
                        continue;
                    }
                };
                match sched.on_packet(now, r.len) {
                    Verdict::Forward { at_ns } => {
                        let buf = std::mem::replace(&mut recv.bufs[i], spare);
                        seq += 1;
                        heap.push(Reverse(Queued { at: at_ns, seq, len: r.len, buf }));
                        add(&c.queued_packets, 1);
                        add(&c.queued_bytes, r.len as u64);
                    }
                    Verdict::DropLoss => {
                        add(&c.dropped_loss, 1);
                        free.push(spare);
                    }
                    Verdict::DropQueue => {
                        add(&c.dropped_queue, 1);
                        free.push(spare);
                    }
                }
            }
            if n < BATCH {
                break;
            }
        }
    }
}

fn write_stats(path: &Path, snap: &Snapshot) {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(snap).expect("a snapshot serializes");
    if std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn serve(shared: &Shared, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply { ok: false, error: Some(format!("bad request: {e}")), stats: None },
            Ok(Request::Stats) => Reply { ok: true, error: None, stats: Some(shared.snapshot()) },
            Ok(Request::Set { dir, update }) => match shared.apply(dir, &update) {
                Ok(()) => Reply { ok: true, error: None, stats: Some(shared.snapshot()) },
                Err(e) => Reply { ok: false, error: Some(e.to_string()), stats: None },
            },
        };
        let mut text = serde_json::to_string(&reply).expect("a reply serializes");
        text.push('\n');
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

fn control_loop(shared: &Shared, listener: &UnixListener) {
    let mut fds = [pollfd(listener.as_raw_fd()), pollfd(shared.stop.as_raw_fd())];
    loop {
        fds[0].revents = 0;
        fds[1].revents = 0;
        if wait(&mut fds, None).is_err() || fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                if let Err(e) = serve(shared, stream) {
                    eprintln!("linkem {}: control connection: {e}", shared.name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => eprintln!("linkem {}: accept: {e}", shared.name),
        }
    }
}

fn stats_loop(shared: &Shared, sockets: [&PacketSocket; 2], path: Option<&Path>) {
    let mut fds = [pollfd(shared.stop.as_raw_fd())];
    loop {
        fds[0].revents = 0;
        let _ = wait(&mut fds, Some(STATS_PERIOD.as_nanos() as u64));
        for (i, s) in sockets.iter().enumerate() {
            add(&shared.dirs[i].c.dropped_kernel, s.kernel_drops());
        }
        if let Some(p) = path {
            write_stats(p, &shared.snapshot());
        }
        if fds[0].revents != 0 {
            return;
        }
    }
}

/// Runs the emulator until SIGINT or SIGTERM (or a direction fails).
pub fn run(config: Config) -> Result<()> {
    config.a2b.check().context("a2b settings")?;
    config.b2a.check().context("b2a settings")?;
    if config.offloads_off {
        for iface in [&config.iface_a, &config.iface_b] {
            crate::offload::disable(iface).with_context(|| format!("turning offloads off on {iface}"))?;
        }
    }
    let a = PacketSocket::open(&config.iface_a).with_context(|| format!("packet socket on {}", config.iface_a))?;
    let b = PacketSocket::open(&config.iface_b).with_context(|| format!("packet socket on {}", config.iface_b))?;
    // SAFETY: eventfd returns a fresh fd that the OwnedFd takes over.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(io::Error::last_os_error()).context("eventfd");
    }
    let shared = Arc::new(Shared {
        name: config.name.clone(),
        iface_a: config.iface_a.clone(),
        iface_b: config.iface_b.clone(),
        started: Instant::now(),
        dirs: [DirShared::new(config.a2b), DirShared::new(config.b2a)],
        // SAFETY: efd is valid and owned by nobody else.
        stop: unsafe { OwnedFd::from_raw_fd(efd) },
    });
    STOP_FD.store(efd, Ordering::SeqCst);
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only writes to an eventfd, which is
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let listener = match &config.control {
        Some(p) => {
            if p.exists() {
                std::fs::remove_file(p).with_context(|| format!("removing the stale {}", p.display()))?;
            }
            let l = UnixListener::bind(p).with_context(|| format!("control socket {}", p.display()))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    eprintln!(
        "linkem {}: bridging {} and {}; a2b {}; b2a {}",
        config.name,
        config.iface_a,
        config.iface_b,
        describe(&config.a2b),
        describe(&config.b2a)
    );

    let outcome = std::thread::scope(|scope| -> Result<()> {
        let (sa, sb) = (&a, &b);
        let sh = &*shared;
        let mq = config.max_queued;
        let seed = config.seed;
        let dirs = [
            scope.spawn(move || forward(0, sa, sb, sh, seed ^ 0xA2B, mq)),
            scope.spawn(move || forward(1, sb, sa, sh, seed ^ 0xB2A, mq)),
        ];
        let stats_path = config.stats.as_deref();
        let stats = scope.spawn(move || stats_loop(sh, [sa, sb], stats_path));
        let control = listener.as_ref().map(|l| scope.spawn(move || control_loop(sh, l)));
        let mut first_error = None;
        for (name, h) in ["a2b", "b2a"].iter().zip(dirs) {
            let r = h.join().map_err(|_| anyhow!("direction {name} panicked"))?;
            if let Err(e) = r {
                first_error.get_or_insert(anyhow!("direction {name}: {e}"));
                sh.request_stop();
            }
        }
        sh.request_stop();
        let _ = stats.join();
        if let Some(c) = control {
            let _ = c.join();
        }
        first_error.map_or(Ok(()), Err)
    });
    STOP_FD.store(-1, Ordering::SeqCst);
    if let Some(p) = &config.control {
        let _ = std::fs::remove_file(p);
    }
    let s = shared.snapshot();
    eprintln!(
        "linkem {}: stopped; a2b {} in, {} out, {} lost, {} queue drops; b2a {} in, {} out, {} lost, {} queue drops",
        config.name,
        s.a2b.packets,
        s.a2b.sent_packets,
        s.a2b.dropped_loss,
        s.a2b.dropped_queue,
        s.b2a.packets,
        s.b2a.sent_packets,
        s.b2a.dropped_loss,
        s.b2a.dropped_queue
    );
    outcome
}
