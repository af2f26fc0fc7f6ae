//! The emulator on real sockets: two namespaces joined through a third in
//! which the linkem binary bridges them (see `linkem::testbed`). Delay is
//! checked as a lower bound only (never a timed upper bound), loss within
//! a binomial tolerance, the rate in bytes per second within generous
//! bounds, and settings changed while traffic flows lose nothing. Needs
//! root; prints `skipped: ...` and passes otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use linkem::driver::now_ns;
use linkem::testbed::{in_netns, is_root, spawn_in_netns, Testbed};
use linkem::Dir;

/// The machine has two cores: one test bed at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PORT: u16 = 7000;

fn bed(a2b: &str, b2a: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Testbed)> {
    if !is_root() {
        println!("skipped: not root (network namespaces need root)");
        return None;
    }
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::new(Path::new(env!("CARGO_BIN_EXE_linkem")), a2b, b2a).expect("test bed");
    Some((guard, tb))
}

/// What a receiver saw: per datagram, its sequence number, the one-way
/// delay (sender's clock in the payload; every namespace shares one clock)
/// and its length.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    one_way_ns: Vec<u64>,
    arrivals_ns: Vec<u64>,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
}

struct Receiver {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<Seen>>,
}

impl Receiver {
    /// Receives on the b side until told to stop.
    fn start(tb: &Testbed) -> Receiver {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn_in_netns(&tb.ns_b, move || {
            let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind receiver");
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            tx.send(()).unwrap();
            let mut seen = Seen::default();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let now = now_ns();
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    let sent = u64::from_be_bytes(buf[8..16].try_into().unwrap());
                    seen.seqs.push(seq);
                    seen.one_way_ns.push(now - sent);
                    seen.arrivals_ns.push(now);
                    seen.bytes += n as u64 + 42; // UDP, IP and Ethernet headers
                    if seen.first_ns == 0 {
                        seen.first_ns = now;
                    }
                    seen.last_ns = now;
                }
            }
            seen
        })
        .expect("receiver thread");
        rx.recv_timeout(Duration::from_secs(5)).expect("receiver bound");
        Receiver { stop, handle }
    }

    /// Waits until nothing has arrived for `quiet`, then stops.
    fn finish(self, quiet: Duration) -> Seen {
        std::thread::sleep(quiet);
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("receiver thread").expect("in namespace")
    }
}

/// Sends `n` datagrams of `size` bytes from a to b, one every `gap`,
/// each carrying its sequence number and send time.
fn send(tb: &Testbed, n: u64, size: usize, gap: Duration) {
    let to = SocketAddr::from((tb.addr_b, PORT));
    in_netns(&tb.ns_a, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind sender");
        let mut buf = vec![0u8; size.max(16)];
        let start = Instant::now();
        for i in 0..n {
            let due = start + gap * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            buf[..8].copy_from_slice(&i.to_be_bytes());
            buf[8..16].copy_from_slice(&now_ns().to_be_bytes());
            sock.send_to(&buf, to).expect("send");
        }
    })
    .expect("sender in namespace");
}

#[test]
fn every_echo_takes_at_least_twice_the_delay() {
    let Some((_one, tb)) = bed("delay_ms=15", "delay_ms=15") else { return };
    let to = SocketAddr::from((tb.addr_b, PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready, bound) = std::sync::mpsc::channel();
    let echo = spawn_in_netns(&tb.ns_b, move || {
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind echo");
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        ready.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::SeqCst) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                sock.send_to(&buf[..n], from).expect("echo back");
            }
        }
    })
    .unwrap();
    bound.recv_timeout(Duration::from_secs(5)).expect("echo server bound");
    let rtts = in_netns(&tb.ns_a, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..30u32 {
            let t = Instant::now();
            sock.send_to(&i.to_be_bytes(), to).unwrap();
            let n = sock.recv(&mut buf).expect("an echo (loss is 0)");
            assert_eq!(&buf[..n], &i.to_be_bytes());
            rtts.push(t.elapsed());
        }
        rtts
    })
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    echo.join().unwrap().unwrap();
    let min = rtts.iter().min().unwrap();
    assert!(rtts.iter().all(|r| *r >= Duration::from_millis(30)), "an echo took less than 2 x 15 ms: {rtts:?}");
    println!("30 echoes across 15 ms each way: shortest {min:?}");
    let s = tb.stats().unwrap();
    assert_eq!(s.a2b.dropped_loss + s.a2b.dropped_queue + s.b2a.dropped_loss + s.b2a.dropped_queue, 0);
    assert!(s.a2b.sent_packets >= 30 && s.b2a.sent_packets >= 30, "{s:?}");
}

#[test]
fn loss_is_within_a_binomial_tolerance() {
    let Some((_one, tb)) = bed("", "") else { return };
    tb.pin_neighbours().unwrap();
    tb.set(Dir::A2b, "loss_pct=20").unwrap();
    let rx = Receiver::start(&tb);
    let n = 3000u64;
    send(&tb, n, 100, Duration::from_micros(300));
    let seen = rx.finish(Duration::from_millis(300));
    let got = seen.seqs.len() as f64;
    let (mean, sd) = (n as f64 * 0.8, (n as f64 * 0.2 * 0.8).sqrt());
    assert!((got - mean).abs() <= 5.0 * sd, "{got} of {n} arrived at 20% loss (expected {mean} ± 5 x {sd:.1})");
    // The counters agree: every frame that arrived was lost or sent on.
    let s = tb.stats().unwrap();
    assert_eq!(s.a2b.packets, s.a2b.sent_packets + s.a2b.dropped_loss + s.a2b.queued_packets, "{:?}", s.a2b);
    assert!(s.a2b.dropped_loss as f64 >= n as f64 - got, "{:?}", s.a2b);
    assert_eq!(s.b2a.dropped_loss, 0);
    // The stats file is rewritten while it runs.
    std::thread::sleep(Duration::from_millis(600));
    let file = linkem::control::read_stats_file(&tb.stats).unwrap();
    assert!(file.a2b.packets >= n, "{:?}", file.a2b);
    println!("loss 20%: {got} of {n} arrived; linkem counted {} lost", s.a2b.dropped_loss);
}

#[test]
fn a_rate_limit_holds_in_bytes_per_second() {
    let Some((_one, tb)) = bed("rate_kbit=4000,queue_ms=50", "") else { return };
    tb.pin_neighbours().unwrap();
    let rx = Receiver::start(&tb);
    // Offer about 8 Mbit/s (1000-byte datagrams every millisecond) for 2 s.
    send(&tb, 2000, 1000, Duration::from_millis(1));
    let seen = rx.finish(Duration::from_millis(300));
    let secs = (seen.last_ns - seen.first_ns) as f64 / 1e9;
    let rate = seen.bytes as f64 * 8.0 / secs / 1000.0;
    let s = tb.stats().unwrap();
    println!("rate 4000 kbit/s, 8000 offered: {rate:.0} kbit/s over {secs:.2} s, {} queue drops", s.a2b.dropped_queue);
    assert!((3000.0..=4400.0).contains(&rate), "{rate:.0} kbit/s through a 4000 kbit/s link");
    assert!(s.a2b.dropped_queue > 0, "twice the rate offered, yet no tail drop: {:?}", s.a2b);
}

#[test]
fn settings_change_while_traffic_flows_without_loss() {
    let Some((_one, tb)) = bed("delay_ms=5", "delay_ms=5") else { return };
    tb.pin_neighbours().unwrap();
    let rx = Receiver::start(&tb);
    let n = 3000u64;
    let sender = {
        let ns = tb.ns_a.clone();
        let to = SocketAddr::from((tb.addr_b, PORT));
        spawn_in_netns(&ns, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            let start = Instant::now();
            let mut buf = [0u8; 200];
            for i in 0..n {
                let due = start + Duration::from_millis(i);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                buf[..8].copy_from_slice(&i.to_be_bytes());
                buf[8..16].copy_from_slice(&now_ns().to_be_bytes());
                sock.send_to(&buf, to).unwrap();
            }
        })
        .unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    tb.set(Dir::A2b, "delay_ms=40").unwrap();
    let slow_from = now_ns();
    std::thread::sleep(Duration::from_millis(800));
    let slow_until = now_ns();
    tb.set(Dir::Both, "delay_ms=2,jitter_ms=1,rate_kbit=50000").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    tb.set(Dir::A2b, "jitter_ms=0,rate_kbit=0,delay_ms=25").unwrap();
    sender.join().unwrap().unwrap();
    let seen = rx.finish(Duration::from_millis(300));
    assert_eq!(seen.seqs.len() as u64, n, "packets lost with loss 0");
    assert!(seen.seqs.windows(2).all(|w| w[1] == w[0] + 1), "packets reordered without reorder");
    // Sent while the delay was 40 ms: every one took at least that long.
    let mut slow = 0;
    for (ow, at) in seen.one_way_ns.iter().zip(&seen.arrivals_ns) {
        if (slow_from..slow_until).contains(&(at - ow)) {
            slow += 1;
            assert!(*ow >= 40_000_000, "a packet sent while the delay was 40 ms took {ow} ns");
        }
    }
    assert!(slow > 500, "{slow}");
    let s = tb.stats().unwrap();
    assert_eq!(s.a2b.settings.delay_ms, 25.0);
    assert_eq!(s.b2a.settings.rate_kbit, 50000);
    assert_eq!(s.a2b.dropped_queue + s.a2b.dropped_loss + s.a2b.send_errors, 0, "{:?}", s.a2b);
}

#[test]
fn jitter_reorders_only_when_asked() {
    let Some((_one, tb)) = bed("delay_ms=10,jitter_ms=8,reorder=true", "") else { return };
    tb.pin_neighbours().unwrap();
    let rx = Receiver::start(&tb);
    send(&tb, 500, 100, Duration::from_micros(500));
    let seen = rx.finish(Duration::from_millis(300));
    assert_eq!(seen.seqs.len(), 500);
    let inversions = seen.seqs.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(inversions > 0, "±8 ms of jitter on packets 0.5 ms apart, reordering allowed, yet all in order");
    assert!(seen.one_way_ns.iter().all(|ow| *ow >= 2_000_000), "below delay - jitter");

    tb.set(Dir::A2b, "reorder=false").unwrap();
    let rx = Receiver::start(&tb);
    send(&tb, 500, 100, Duration::from_micros(500));
    let seen = rx.finish(Duration::from_millis(300));
    assert_eq!(seen.seqs.len(), 500);
    assert!(seen.seqs.windows(2).all(|w| w[1] > w[0]), "reordered without reorder");
    println!("jitter ±8 ms: {inversions} inversions with reorder, none without");
}

#[test]
fn sigterm_stops_it_cleanly() {
    let Some((_one, mut tb)) = bed("delay_ms=50", "") else { return };
    tb.pin_neighbours().unwrap();
    send(&tb, 100, 100, Duration::from_micros(100));
    // The emulator reads the packets a moment after the sender wrote them; a
    // stop that lands first would rightly count fewer. Wait until it has them
    // all (a generous bound), so that the final file is what is judged.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tb.stats().unwrap().a2b.packets < 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = tb.stop().expect("stops");
    assert!(status.success(), "{status}: {}", tb.log_text());
    assert!(!tb.control.exists(), "control socket left behind");
    let last = linkem::control::read_stats_file(&tb.stats).expect("final stats file");
    assert!(last.a2b.packets >= 100, "{:?}", last.a2b);
    assert!(tb.log_text().contains("stopped"), "{}", tb.log_text());
}

#[test]
fn tcp_crosses_unchanged() {
    use std::io::{Read, Write};
    let Some((_one, tb)) = bed("delay_ms=5,rate_kbit=100000", "delay_ms=5") else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(&tb.ns_b, move || {
        let l = std::net::TcpListener::bind(("0.0.0.0", PORT)).expect("listen");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got
    })
    .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let to = SocketAddr::from((tb.addr_b, PORT));
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    in_netns(&tb.ns_a, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.write_all(&sent).expect("write");
    })
    .unwrap();
    let got = server.join().unwrap().unwrap();
    assert!(got == data, "{} bytes arrived of {}, or changed", got.len(), data.len());
    let s = tb.stats().unwrap();
    assert_eq!(s.a2b.dropped_oversize + s.b2a.dropped_oversize, 0, "super-frames crossed: offloads on?");
    assert!(s.a2b.bytes > 4_000_000, "{:?}", s.a2b);
}
