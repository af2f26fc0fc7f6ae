//! POP fan-out to RTSP players: the CPU a POP spends per output Mbit and
//! per output packet with 1, 10 and 50 RTSP players of `test`, over UDP
//! and over TCP (interleaved), in a lab. The players are light: each runs
//! DESCRIBE, SETUP of both tracks and PLAY like any RTSP player, then only
//! takes the packets and counts them (no decoding), so that 50 of them fit
//! on one client host of a 2-core machine. The POP's CPU at rest (not
//! carrying the stream) is measured in the same run, and figures are also
//! given net of it. Needs root.
//!
//! usage: rtspbench [LAB] [SECONDS]   (default: netns/labs/seed.json, 8)

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use netlab::cpu;
use netlab::lab::{Lab, RoleKind};
use netlab::run::{self, Bins};
use netlab::state::LabState;
use rtsp_types::{Message, ParseError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const STREAM: &str = "test";
const PLAYERS: [usize; 3] = [1, 10, 50];
/// From the last PLAY to the window, for the stream to flow to all.
const SETTLE: Duration = Duration::from_secs(3);
/// After the players leave, for the tree to be pruned.
const PRUNE_PAUSE: Duration = Duration::from_secs(2);

/// What the players of one case took in.
#[derive(Default)]
struct Taken {
    packets: AtomicU64,
    bytes: AtomicU64,
}

struct Case {
    players: usize,
    tcp: bool,
    pop_us_per_s: f64,
    mbit_per_s: f64,
    packets_per_s: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: rtspbench [LAB] [SECONDS]\nPOP CPU per output Mbit and per output packet with {PLAYERS:?} RTSP \
             players of {STREAM:?} over UDP and TCP, on LAB (default netns/labs/seed.json), SECONDS per window \
             (default 8). Needs root."
        );
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let secs: u64 = args.get(2).map(|r| r.parse()).transpose().context("SECONDS")?.unwrap_or(8);
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    // All the players run on one host: its POP must take them all (the
    // roles inherit this environment).
    std::env::set_var("ONODE_MAX_SESSIONS_PER_ADDRESS", (PLAYERS[PLAYERS.len() - 1] + 4).to_string());
    let prefix = format!("rb{}", std::process::id() % 100_000);
    let opts = run::UpOptions::new(&prefix, Some(bins.dir()));
    let window = Duration::from_secs(secs.max(1));
    let result = run::up(&lab, &opts).and_then(|st| measure(&lab, &st, window));
    let down = run::down(&prefix);
    let (pop, idle, cases) = result?;
    down?;
    println!(
        "POP fan-out to RTSP players of {STREAM:?}, lab {}, POP {pop}, binaries {}, {secs} s windows",
        lab_file.display(),
        bins.dir().display()
    );
    println!("  POP at rest (not carrying the stream): {idle:.0} µs of CPU per second");
    println!(
        "  {:>7} {:>4} {:>9} {:>8} {:>11} {:>13} {:>16} {:>16}",
        "players", "via", "out Mbit/s", "pkts/s", "POP µs/s", "µs per Mbit", "µs per packet", "net µs/packet"
    );
    for c in &cases {
        let net = (c.pop_us_per_s - idle).max(0.0);
        println!(
            "  {:>7} {:>4} {:>9.2} {:>8.0} {:>11.0} {:>13.0} {:>16.2} {:>16.2}",
            c.players,
            if c.tcp { "tcp" } else { "udp" },
            c.mbit_per_s,
            c.packets_per_s,
            c.pop_us_per_s,
            c.pop_us_per_s / c.mbit_per_s.max(1e-9),
            c.pop_us_per_s / c.packets_per_s.max(1e-9),
            net / c.packets_per_s.max(1e-9),
        );
    }
    let at = |n: usize, tcp: bool| cases.iter().find(|c| c.players == n && c.tcp == tcp);
    if let (Some(u), Some(t)) = (at(50, false), at(50, true)) {
        let per_packet = |c: &Case| (c.pop_us_per_s - idle).max(0.0) / c.packets_per_s.max(1e-9);
        println!(
            "  TCP against UDP at 50 players, net CPU per output packet (same run): {:.2}x",
            per_packet(t) / per_packet(u).max(1e-9)
        );
    }
    println!(
        "  (net: minus the POP at rest; compare µs per packet with the relay benchmark's fan-out 50 figures, \
         ours and the recvmmsg/sendmmsg floor)"
    );
    Ok(())
}

/// The POP on the first client host's LAN, its CPU at rest, and every case.
fn measure(lab: &Lab, st: &LabState, window: Duration) -> Result<(String, f64, Vec<Case>)> {
    let client =
        lab.roles.iter().find(|r| r.kind == RoleKind::Client).ok_or_else(|| anyhow!("the lab has no client"))?;
    let host = lab.hosts[client.host].name.clone();
    let pop_addr = lab.local_pop(client.host).ok_or_else(|| anyhow!("client host {host} has no POP on its LAN"))?;
    let pop = lab
        .roles
        .iter()
        .find(|r| r.kind == RoleKind::Pop && lab.hosts[r.host].ifaces.iter().any(|i| i.addr.addr == pop_addr))
        .map(|r| r.name.clone())
        .ok_or_else(|| anyhow!("no POP role owns {pop_addr}"))?;
    let pid = st
        .processes
        .iter()
        .find(|p| p.name == pop)
        .map(|p| p.pid)
        .ok_or_else(|| anyhow!("POP {pop} is not running"))?;
    netlab::sys::sleep(Duration::from_secs(2))?;
    let idle = pop_cpu(pid, window)?;
    let mut cases = Vec::new();
    for tcp in [false, true] {
        for players in PLAYERS {
            let ns = netlab::plan::ns_name(&st.prefix, &host);
            let addr = pop_addr.to_string();
            let case = netlab::sys::in_netns(&ns, move || run_case(&addr, players, tcp, pid, window))??;
            println!(
                "rtspbench: {players} players over {}: {:.2} Mbit/s out, POP {:.0} µs/s",
                if tcp { "tcp" } else { "udp" },
                case.mbit_per_s,
                case.pop_us_per_s
            );
            cases.push(case);
            netlab::sys::sleep(PRUNE_PAUSE)?;
        }
    }
    Ok((format!("{pop} ({pop_addr}), players on {host}"), idle, cases))
}

/// The POP's CPU over `window`, µs per second.
fn pop_cpu(pid: i32, window: Duration) -> Result<f64> {
    let before = cpu::read_ticks(pid).ok_or_else(|| anyhow!("the POP (pid {pid}) is gone"))?;
    let t = Instant::now();
    std::thread::sleep(window);
    let after = cpu::read_ticks(pid).ok_or_else(|| anyhow!("the POP (pid {pid}) is gone"))?;
    Ok(cpu::rate(before, after, cpu::ticks_per_s(), t.elapsed()))
}

/// Opens `players` players from this thread's namespace, lets them settle,
/// and measures the POP and what the players took in over `window`.
fn run_case(pop: &str, players: usize, tcp: bool, pid: i32, window: Duration) -> Result<Case> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let taken = Arc::new(Taken::default());
        let mut held = Vec::new();
        for i in 0..players {
            let player = Player::start(pop, tcp, taken.clone())
                .await
                .with_context(|| format!("RTSP player {} of {players}", i + 1))?;
            held.push(player);
        }
        tokio::time::sleep(SETTLE).await;
        let (p0, b0) = (taken.packets.load(Ordering::Relaxed), taken.bytes.load(Ordering::Relaxed));
        let before = cpu::read_ticks(pid).ok_or_else(|| anyhow!("the POP (pid {pid}) is gone"))?;
        let t = Instant::now();
        tokio::time::sleep(window).await;
        let after = cpu::read_ticks(pid).ok_or_else(|| anyhow!("the POP (pid {pid}) is gone"))?;
        let wall = t.elapsed();
        let (p1, b1) = (taken.packets.load(Ordering::Relaxed), taken.bytes.load(Ordering::Relaxed));
        for p in held {
            p.stop().await;
        }
        let secs = wall.as_secs_f64();
        if p1 == p0 {
            bail!("{players} players over {} took in nothing", if tcp { "tcp" } else { "udp" });
        }
        Ok(Case {
            players,
            tcp,
            pop_us_per_s: cpu::rate(before, after, cpu::ticks_per_s(), wall),
            mbit_per_s: (b1 - b0) as f64 * 8.0 / secs / 1e6,
            packets_per_s: (p1 - p0) as f64 / secs,
        })
    })
}

/// How often a player says it is still there (the POP's session timeout
/// is 10 s by default).
const KEEPALIVE: Duration = Duration::from_secs(3);

/// One light RTSP player: the tasks holding its connection and taking its
/// packets.
struct Player {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Player {
    async fn start(pop: &str, tcp: bool, taken: Arc<Taken>) -> Result<Player> {
        let mut conn = TcpStream::connect((pop, 8554)).await.with_context(|| format!("connecting to {pop}:8554"))?;
        let base = format!("rtsp://{pop}:8554/{STREAM}");
        let mut buf = Vec::new();
        ask(&mut conn, &mut buf, &format!("DESCRIBE {base} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n"))
            .await?;
        let mut session = String::new();
        let mut sockets = Vec::new();
        for track in 0..2u16 {
            let transport = if tcp {
                format!("RTP/AVP/TCP;unicast;interleaved={}-{}", 2 * track, 2 * track + 1)
            } else {
                let (rtp, rtcp) = port_pair().await?;
                let port = rtp.local_addr()?.port();
                sockets.extend([rtp, rtcp]);
                format!("RTP/AVP;unicast;client_port={port}-{}", port + 1)
            };
            let with_session = if session.is_empty() { String::new() } else { format!("Session: {session}\r\n") };
            let reply = ask(
                &mut conn,
                &mut buf,
                &format!(
                    "SETUP {base}/trackID={track} RTSP/1.0\r\nCSeq: {}\r\nTransport: {transport}\r\n{with_session}",
                    2 + track
                ),
            )
            .await?;
            let id = reply.header(&rtsp_types::headers::SESSION).map(|v| v.as_str().to_string()).unwrap_or_default();
            session = id.split(';').next().unwrap_or_default().trim().to_string();
        }
        ask(&mut conn, &mut buf, &format!("PLAY {base} RTSP/1.0\r\nCSeq: 4\r\nSession: {session}\r\n")).await?;
        let mut tasks = Vec::new();
        for socket in sockets {
            let taken = taken.clone();
            tasks.push(tokio::spawn(async move {
                let mut b = vec![0u8; 2048];
                while let Ok(n) = socket.recv(&mut b).await {
                    taken.packets.fetch_add(1, Ordering::Relaxed);
                    taken.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        let (mut reader, mut writer) = conn.into_split();
        let keepalive = format!("GET_PARAMETER {base} RTSP/1.0\r\nSession: {session}\r\n");
        tasks.push(tokio::spawn(async move {
            for cseq in 5.. {
                tokio::time::sleep(KEEPALIVE).await;
                if writer.write_all(format!("{keepalive}CSeq: {cseq}\r\n\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }));
        // The answers to the keepalives, and over TCP the packets, framed.
        tasks.push(tokio::spawn(async move {
            let mut chunk = vec![0u8; 65_536];
            loop {
                loop {
                    match Message::<Vec<u8>>::parse(&buf) {
                        Ok((msg, used)) => {
                            if let Message::Data(d) = msg {
                                taken.packets.fetch_add(1, Ordering::Relaxed);
                                taken.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                            }
                            buf.drain(..used);
                        }
                        Err(ParseError::Incomplete(_)) => break,
                        Err(ParseError::Error) => return,
                    }
                }
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }));
        Ok(Player { tasks })
    }

    /// Ends the player: its connection closes, which ends its session.
    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Two UDP sockets on consecutive ports, the first even (RTP and RTCP).
async fn port_pair() -> Result<(UdpSocket, UdpSocket)> {
    for _ in 0..100 {
        let rtp = UdpSocket::bind("0.0.0.0:0").await?;
        let port = rtp.local_addr()?.port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if let Ok(rtcp) = UdpSocket::bind(("0.0.0.0", port + 1)).await {
            return Ok((rtp, rtcp));
        }
    }
    bail!("no two consecutive free UDP ports in 100 tries")
}

/// Sends one request (its head, without the blank line) and reads the
/// response: an error unless it is 200.
async fn ask(conn: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Result<rtsp_types::Response<Vec<u8>>> {
    conn.write_all(format!("{head}\r\n").as_bytes()).await?;
    let mut chunk = vec![0u8; 16_384];
    loop {
        match Message::<Vec<u8>>::parse(&buf[..]) {
            Ok((msg, used)) => {
                buf.drain(..used);
                match msg {
                    Message::Response(r) if r.status() == rtsp_types::StatusCode::Ok => return Ok(r),
                    Message::Response(r) => {
                        bail!(
                            "{} answered {} {}",
                            head.lines().next().unwrap_or(""),
                            u16::from(r.status()),
                            r.reason_phrase()
                        )
                    }
                    // Media that came before the answer.
                    _ => continue,
                }
            }
            Err(ParseError::Incomplete(_)) => {}
            Err(ParseError::Error) => bail!("the POP's answer to {head:?} does not parse"),
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .map_err(|_| anyhow!("no answer to {} in 10 s", head.lines().next().unwrap_or("")))??;
        if n == 0 {
            bail!("the POP closed the connection after {}", head.lines().next().unwrap_or(""));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
