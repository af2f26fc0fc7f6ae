//! `oclient`: logs in at the bootstrapper, measures the round trip to each
//! POP and picks the lowest, opens a session there (CONNECT_POP, SETUP,
//! PLAY), decodes what arrives, and reports what it got.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use overlay_core::rtp::Packet;
use overlay_proto as pb;
use overlay_proto::bootstrap_client::BootstrapClient;
use overlay_proto::session_client::SessionClient;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn, Instrument};

#[derive(Parser)]
#[command(
    name = "oclient",
    version,
    about = "Watch a stream of the overlay",
    long_about = "Watch a stream of the overlay.\n\nLogs in at the bootstrapper, probes every POP and picks the one with the lowest round trip, sets up a session for STREAM and plays it: in a window when a display is available, or headless (--headless) counting frames.\n\nKeys on the terminal (or lines on standard input): p or space pauses and resumes, q ends the session."
)]
struct Cli {
    /// The bootstrapper's address, IP or IP:PORT.
    #[arg(long)]
    bootstrap: String,
    /// Stream name (`test` is always offered).
    stream: String,
    /// Decode without a window or sound.
    #[arg(long)]
    headless: bool,
    /// Also record what arrives to this Matroska file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// End (with TEARDOWN) after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Write statistics as JSON to this file at exit.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Name shown in the POP's logs.
    #[arg(long, default_value = "oclient")]
    name: String,
    /// Local address to receive RTP on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Control port of the bootstrapper when ADDR has none.
    #[arg(long, default_value_t = 7070)]
    control_port: u16,
    /// Round-trip probes (TCP handshakes) per POP; the lowest counts.
    #[arg(long, default_value_t = 5)]
    probes: u32,
    /// Jitter buffer latency in ms (how long to wait for late packets).
    #[arg(long, default_value_t = media::DEFAULT_LATENCY_MS)]
    latency_ms: u32,
    /// Silence (ms) after which the client checks its POP and, if it does
    /// not answer, moves to the best remaining one (checked every 100 ms; a
    /// POP that answers is waited for, its tree may be repairing).
    #[arg(long, default_value_t = 300)]
    failover_ms: u64,
    /// Use this POP (IP or IP:PORT) instead of probing the ones the bootstrapper lists.
    #[arg(long)]
    pop: Option<String>,
    /// Keep audio and video in sync by the capture times in the sender
    /// reports (false: present each kind as it arrives).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    lip_sync: bool,
    /// Print a stats line every second.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stats_line: bool,
    /// The overlay's TLS folder (only its ca.pem is read): talk TLS to the
    /// bootstrapper and the POP, and check that they hold the overlay's
    /// certificates.
    #[arg(long, env = "OVERLAY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Viewer token (from `onode token`), for POPs that require one.
    #[arg(long, env = "OVERLAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    client: String,
    stream: String,
    pop: String,
    pop_name: String,
    /// Round trips of the POPs that answered before the choice was made
    /// (an on-link POP answering first ends the probing).
    pop_rtt_ms: BTreeMap<String, f64>,
    server: String,
    frames_decoded: u64,
    audio_buffers: u64,
    packets_received: u64,
    packets_lost: u64,
    bytes_received: u64,
    jitter_ms: f64,
    first_frame_ms: Option<f64>,
    /// From the first request to the chosen POP (CONNECT_POP, then SETUP
    /// and PLAY) to the first decoded frame: the start-up a viewer waits
    /// for once logged in.
    request_to_first_frame_ms: Option<f64>,
    /// From start to the end of SETUP and PLAY (login, POP choice included).
    setup_ms: f64,
    /// Phases of the start, ms from the client's start.
    startup: Startup,
    pauses: u32,
    /// Longest time between two received packets after the first, in ms.
    longest_gap_ms: f64,
    /// Moves to another POP after one stopped answering.
    pop_switches: Vec<Switch>,
    /// Video frames decoded in each second of playing, in order.
    fps_timeline: Vec<u64>,
    /// The stream ended (the server's RTCP BYE: its publisher went away for
    /// good), before the session did.
    stream_ended: bool,
    /// Glass-to-glass latency of the video: from capture at the server
    /// (the RTP/NTP mapping of the sender reports) to presentation by the
    /// video sink; steady state (the first 2 s after the first packet left
    /// out).
    glass_to_glass_ms: Option<Latency>,
    /// The same for audio, capture to the audio sink.
    audio_latency_ms: Option<Latency>,
    /// Median audio latency minus median video latency, ms: how far sound
    /// trails (positive) or leads the picture it belongs to.
    av_skew_ms: Option<f64>,
    /// How long lip sync held each kind back at the end, ms.
    lip_sync_hold_ms: LipSyncHold,
    /// CPU this process used (user and system), in microseconds per second
    /// of its run: what watching cost on this machine.
    cpu_us_per_s: f64,
}

#[derive(Debug, Default, Serialize)]
struct LipSyncHold {
    video: f64,
    audio: f64,
}

/// A latency distribution, ms.
#[derive(Debug, Clone, Serialize)]
struct Latency {
    median: f64,
    p95: f64,
    max: f64,
    samples: usize,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Latency { median: at(0.5), p95: at(0.95), max: at(1.0), samples: samples.len() })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oclient: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let telemetry = telemetry::init(&format!("oclient-{}", cli.name));
        let result = run(cli).await;
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("oclient: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn endpoint(addr: SocketAddr, ca: Option<&[u8]>) -> anyhow::Result<Channel> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
    if let Some(ca) = ca {
        // Overlay certificates name every address of their node.
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(addr.ip().to_string());
        endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
    }
    // A connect must survive one lost SYN (retransmitted after 1 s).
    Ok(endpoint
        .connect_timeout(Duration::from_millis(2500))
        .timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy())
}

fn parse_addr(text: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let ip: IpAddr = text.parse().with_context(|| format!("{text:?} is not an address (IP or IP:PORT)"))?;
    Ok(SocketAddr::new(ip, port))
}

enum Key {
    TogglePause,
    Quit,
}

/// Reads p/space/q from standard input (raw mode on a terminal).
/// Keys read from stdin (a terminal, or a pipe from a script); the
/// channel closes at the end of input.
fn spawn_keys() -> Option<mpsc::UnboundedReceiver<Key>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let _raw = RawMode::enable();
        let mut stdin = std::io::stdin();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte) {
            let key = match byte[0] {
                b'p' | b' ' => Key::TogglePause,
                b'q' | 3 => Key::Quit,
                _ => continue,
            };
            if tx.send(key).is_err() {
                break;
            }
        }
    });
    Some(rx)
}

/// CPU time (user and system) this process has used so far, µs.
fn process_cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// The next key; never, once the input has ended (`keys` is then None).
async fn next_key(keys: &mut Option<mpsc::UnboundedReceiver<Key>>) -> Option<Key> {
    match keys {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Puts the terminal in non-canonical mode while alive.
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enable() -> RawMode {
        if !std::io::stdin().is_terminal() {
            return RawMode(None);
        }
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawMode(None);
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawMode(Some(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// A candidate POP with its measured round trip.
#[derive(Debug, Clone)]
struct Candidate {
    name: String,
    addr: SocketAddr,
    rtt_ms: f64,
    /// The POP address is on one of this host's own subnets.
    on_link: bool,
}

/// RTCP packet type of a BYE (the server ends a published stream with it).
const RTCP_BYE: u8 = 203;
/// Round trips closer than this (or than half the lowest) are measurement
/// noise: a loaded host delays its own handshakes by fractions of a ms.
const RTT_NOISE_MS: f64 = 0.5;
/// How long a silent POP that still answers is waited for (a cold start,
/// or its tree repairing) before the client moves anyway.
const ALIVE_POP_PATIENCE: Duration = Duration::from_millis(3600);
/// How much later than its round trip says a POP's probe result may come
/// (the probes are staggered by a millisecond, and tasks get scheduled).
const PROBE_SLACK_MS: f64 = 5.0;

/// The POP with the lowest round trip; among POPs within measurement
/// noise of the lowest, one on the client's own subnet (no router between).
fn choose_pop(candidates: &[Candidate]) -> Option<&Candidate> {
    let best = candidates.iter().min_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms))?;
    let noise = RTT_NOISE_MS.max(best.rtt_ms * 0.5);
    candidates
        .iter()
        .filter(|c| c.on_link && c.rtt_ms <= best.rtt_ms + noise)
        .min_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms))
        .or(Some(best))
}

/// Round trip to a POP measured as the TCP handshake to its control port
/// (answered by the kernel, so no application noise): the lowest of a few.
/// The handshakes run side by side (a millisecond apart), so a far POP
/// costs one round trip, not one per probe.
async fn handshake_rtt(addr: SocketAddr, probes: u32) -> Option<f64> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..probes.max(1) {
        set.spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(i))).await;
            let t = Instant::now();
            let stream = tokio::time::timeout(Duration::from_millis(700), tokio::net::TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            drop(stream);
            Some(ms)
        });
    }
    let mut best: Option<f64> = None;
    while let Some(r) = set.join_next().await {
        if let Ok(Some(ms)) = r {
            best = Some(best.map_or(ms, |b: f64| b.min(ms)));
        }
    }
    best
}

/// This host's IPv4 subnets (address, prefix mask).
fn local_subnets() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            && !ifa.ifa_netmask.is_null()
            && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET
        {
            let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
            let (a, m) = (u32::from_be(a.sin_addr.s_addr), u32::from_be(m.sin_addr.s_addr));
            if a >> 24 != 127 {
                out.push((a, m));
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(head) };
    out
}

fn on_link(ip: IpAddr, subnets: &[(u32, u32)]) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let ip = u32::from(v4);
            subnets.iter().any(|(a, m)| ip & m == a & m)
        }
        IpAddr::V6(_) => false,
    }
}

/// One open session at a POP.
struct Open {
    session: SessionClient<Channel>,
    id: String,
    pop_addr: SocketAddr,
    pop_name: String,
    rtts: BTreeMap<String, f64>,
    server: String,
    startup: Startup,
    /// The POPs the bootstrapper listed at LOGIN, and the overlay's control
    /// port: a later move tries them first, without logging in again.
    pops: Known,
}

/// The POPs a LOGIN listed (name, address), and the overlay's control port.
type Known = (u16, Vec<(String, SocketAddr)>);

/// LOGIN (unless the POPs are `known` from an earlier one), choose a POP
/// (never one of `avoid`), CONNECT_POP and SETUP.
async fn open_session(
    cli: &Cli,
    bootstrap: SocketAddr,
    rtp_port: u16,
    avoid: &[SocketAddr],
    known: Option<&Known>,
    started: Instant,
) -> anyhow::Result<Open> {
    let ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut startup = Startup::default();
    let ca = match &cli.tls_dir {
        Some(dir) => {
            let path = dir.join("ca.pem");
            Some(std::fs::read(&path).with_context(|| format!("--tls-dir: cannot read {}", path.display()))?)
        }
        None => None,
    };
    let pops: Known = match known {
        Some(known) => known.clone(),
        None => {
            let mut boot = BootstrapClient::new(endpoint(bootstrap, ca.as_deref())?);
            let login = boot
                .login(pb::LoginRequest { client: cli.name.clone(), stream: cli.stream.clone() })
                .await
                .with_context(|| format!("LOGIN at the bootstrapper {bootstrap}"))?
                .into_inner();
            startup.login_ms = ms();
            let port = login.control_port as u16;
            let listed = login
                .pops
                .iter()
                .flat_map(|p| {
                    p.addresses.iter().filter_map(|a| Some((p.name.clone(), SocketAddr::new(a.parse().ok()?, port))))
                })
                .collect();
            (port, listed)
        }
    };
    let port = pops.0;
    let mut addrs: Vec<(String, SocketAddr)> = pops.1.iter().filter(|(_, a)| !avoid.contains(a)).cloned().collect();
    if let Some(forced) = &cli.pop {
        let forced = parse_addr(forced, port).context("--pop")?;
        let name =
            addrs.iter().find(|(_, a)| *a == forced).map(|(n, _)| n.clone()).unwrap_or_else(|| forced.to_string());
        addrs = vec![(name, forced)];
    }
    if addrs.is_empty() {
        bail!("the bootstrapper {bootstrap} knows no live POP");
    }
    let subnets = local_subnets();
    let mut set = tokio::task::JoinSet::new();
    for (name, a) in addrs.clone() {
        let probes = cli.probes;
        set.spawn(async move { (name, a, handshake_rtt(a, probes).await) });
    }
    // Probes of all POPs start together, so POPs answer in order of round
    // trip. When the first to answer is on the client's link nothing later
    // can beat it; otherwise the others get as long as could still make
    // them the choice (an on-link POP within the noise margin), plus
    // scheduling slack. A dead POP listed by the bootstrapper never holds
    // the start longer than that.
    let mut candidates = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, set.join_next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => set.join_next().await,
        };
        let Some(joined) = next else { break };
        let Ok((name, addr, Some(rtt_ms))) = joined else { continue };
        let candidate = Candidate { name, addr, rtt_ms, on_link: on_link(addr.ip(), &subnets) };
        let first_on_link = candidates.is_empty() && candidate.on_link;
        candidates.push(candidate);
        if first_on_link {
            break;
        }
        if deadline.is_none() {
            let wait_ms = RTT_NOISE_MS.max(rtt_ms * 0.5) + PROBE_SLACK_MS;
            deadline = Some(tokio::time::Instant::now() + Duration::from_secs_f64(wait_ms / 1000.0));
        }
    }
    set.abort_all();
    let rtts = candidates.iter().map(|c| (c.addr.ip().to_string(), c.rtt_ms)).collect();
    startup.pop_chosen_ms = ms();
    let Some(chosen) = choose_pop(&candidates).cloned() else {
        bail!("no POP answered: tried {}", addrs.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>().join(", "))
    };
    info!(pop = %chosen.name, addr = %chosen.addr, rtt_ms = format!("{:.3}", chosen.rtt_ms), on_link = chosen.on_link, "chose the POP with the lowest round trip");

    let mut session = SessionClient::new(endpoint(chosen.addr, ca.as_deref())?);
    let connect = session
        .connect_pop(pb::ConnectRequest { client: cli.name.clone() })
        .await
        .with_context(|| format!("CONNECT_POP at {} ({})", chosen.name, chosen.addr))?
        .into_inner();
    let mut setup = tonic::Request::new(pb::SetupRequest {
        session_id: connect.session_id.clone(),
        stream: cli.stream.clone(),
        rtp_port: u32::from(rtp_port),
        rtp_host: if cli.bind.is_unspecified() { String::new() } else { cli.bind.to_string() },
    });
    telemetry::inject(setup.metadata_mut());
    if let Some(token) = &cli.token {
        let value = format!("Bearer {token}").parse().context("--token holds characters a header cannot carry")?;
        setup.metadata_mut().insert("authorization", value);
    }
    let setup = match session.setup(setup).await {
        Ok(r) => r.into_inner(),
        Err(s) => match s.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                bail!("{} refused to show {:?}: {}", chosen.name, cli.stream, s.message())
            }
            tonic::Code::NotFound => bail!("stream {:?} is unknown: {}", cli.stream, s.message()),
            tonic::Code::Unavailable => bail!("stream {:?} cannot be reached: {}", cli.stream, s.message()),
            _ => bail!("SETUP of {:?} at {} failed: {}", cli.stream, chosen.name, s.message()),
        },
    };
    startup.setup_ms = ms();
    session
        .play(pb::SessionRequest { session_id: connect.session_id.clone() })
        .await
        .with_context(|| format!("PLAY at {}", chosen.addr))?;
    startup.play_ms = ms();
    Ok(Open {
        startup,
        session,
        id: connect.session_id,
        pop_addr: chosen.addr,
        pop_name: chosen.name,
        rtts,
        server: setup.stream.map(|s| s.server).unwrap_or_default(),
        pops,
    })
}

/// Room for the keyframe burst a POP sends when playing starts (a whole
/// GOP at once); the default buffer would drop part of it.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    // FORCE passes rmem_max when privileged; otherwise the plain option
    // gets what the system allows.
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        let done = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            break;
        }
    }
}

/// When each step of the start completed, ms from the client's start.
#[derive(Debug, Default, Clone, Serialize)]
struct Startup {
    login_ms: f64,
    pop_chosen_ms: f64,
    setup_ms: f64,
    play_ms: f64,
    player_ready_ms: f64,
    first_packet_ms: Option<f64>,
}

/// A move to another POP after the first stopped answering.
#[derive(Debug, Clone, Serialize)]
struct Switch {
    from: String,
    to: String,
    /// When the switch completed, from the client's start (ms).
    at_ms: f64,
    /// From the last packet of the old POP to the first of the new one.
    gap_ms: f64,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let bootstrap = parse_addr(&cli.bootstrap, cli.control_port).context("--bootstrap")?;
    // GStreamer and the decoder pipeline start while the session is set up.
    let config = media::PlayerConfig {
        headless: cli.headless,
        record: cli.record.clone(),
        latency_ms: cli.latency_ms,
        lip_sync: cli.lip_sync,
    };
    let player = tokio::task::spawn_blocking(move || media::Player::start(config));
    let socket = UdpSocket::bind(SocketAddr::new(cli.bind, 0)).await.context("bind the RTP socket")?;
    grow_receive_buffer(&socket);
    let rtp_port = socket.local_addr()?.port();

    let span = tracing::info_span!("session", client = %cli.name, stream = %cli.stream);
    let open = open_session(&cli, bootstrap, rtp_port, &[], None, started).instrument(span).await?;
    let mut report = Report {
        client: cli.name.clone(),
        stream: cli.stream.clone(),
        pop: open.pop_addr.ip().to_string(),
        pop_name: open.pop_name.clone(),
        pop_rtt_ms: open.rtts.clone(),
        server: open.server.clone(),
        setup_ms: started.elapsed().as_secs_f64() * 1000.0,
        startup: open.startup.clone(),
        ..Report::default()
    };
    let Open { mut session, id: mut session_id, mut pop_addr, mut pops, .. } = open;
    let mut pop_name = report.pop_name.clone();

    let player = player.await.context("player task")??;
    report.startup.player_ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    info!(stream = %cli.stream, pop = %report.pop_name, server = %report.server, "playing");

    let mut stats = media::RtpStats::new();
    let mut keys = spawn_keys();
    let mut paused = false;
    let deadline = cli.duration.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (0u64, 0u64);
    let mut buf = vec![0u8; 2048];
    let mut last_packet: Option<Instant> = None;
    let mut first_packet_wall: Option<std::time::SystemTime> = None;
    let mut watchdog = tokio::time::interval(Duration::from_millis(100));
    let mut avoid: Vec<SocketAddr> = Vec::new();
    let mut pending_switch: Option<(Switch, Instant)> = None;
    let silence_limit = Duration::from_millis(cli.failover_ms.max(100));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let until_end = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { continue };
                if let Ok(packet) = Packet::parse(&buf[..n]) {
                    let now = Instant::now();
                    if packet.kind() == overlay_core::rtp::Kind::Rtcp {
                        if packet.payload_type() == RTCP_BYE {
                            info!(stream = %cli.stream, "the stream ended: its publisher went away (RTCP BYE)");
                            report.stream_ended = true;
                            break;
                        }
                        // Sender reports time the media for lip sync.
                        player.push_rtp(&buf[..n]);
                        continue;
                    }
                    first_packet_wall.get_or_insert_with(std::time::SystemTime::now);
                    if let Some(prev) = last_packet {
                        report.longest_gap_ms = report.longest_gap_ms.max((now - prev).as_secs_f64() * 1000.0);
                    }
                    last_packet = Some(now);
                    if report.startup.first_packet_ms.is_none() {
                        report.startup.first_packet_ms = Some((now - started).as_secs_f64() * 1000.0);
                    }
                    if let Some((mut sw, silent_since)) = pending_switch.take() {
                        sw.gap_ms = (now - silent_since).as_secs_f64() * 1000.0;
                        info!(from = %sw.from, to = %sw.to, gap_ms = format!("{:.0}", sw.gap_ms), "media flows from the new POP");
                        report.pop_switches.push(sw);
                    }
                    stats.on_packet(&packet, now);
                    player.push_rtp(&buf[..n]);
                }
            }
            key = next_key(&mut keys) => match key {
                Some(Key::TogglePause) => {
                    let request = pb::SessionRequest { session_id: session_id.clone() };
                    let r = if paused { session.play(request).await } else { session.pause(request).await };
                    match r {
                        Ok(reply) => {
                            paused = !paused;
                            if paused { report.pauses += 1; }
                            info!(state = %reply.into_inner().state, "playback state changed");
                        }
                        Err(s) => warn!("pause/play refused: {}", s.message()),
                    }
                }
                Some(Key::Quit) => break,
                None => keys = None,
            },
            _ = tick.tick() => {
                let d = player.decoded();
                let s = stats.summary();
                let fps = d.video_frames - last.0;
                let kbit = (s.bytes - last.1) * 8 / 1000;
                last = (d.video_frames, s.bytes);
                report.fps_timeline.push(fps);
                // Tell the POP we are still here (it expires silent sessions).
                let mut keepalive = session.clone();
                let request = pb::SessionRequest { session_id: session_id.clone() };
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), keepalive.keepalive(request)).await;
                });
                if cli.stats_line {
                    eprintln!("[{}] {fps} fps  {kbit} kbit/s  lost {}  jitter {:.1} ms{}", cli.name, s.packets_lost, s.jitter_ms, if paused { "  (paused)" } else { "" });
                }
                if let Some(e) = player.error() {
                    warn!("decoder error: {e}");
                }
            }
            _ = watchdog.tick() => {
                let silent_since = last_packet.unwrap_or(started);
                let silent = silent_since.elapsed();
                if paused || pending_switch.is_some() || silent < silence_limit {
                    continue;
                }
                let alive = handshake_rtt(pop_addr, 1).await.is_some();
                if alive && silent < (silence_limit * 6).max(ALIVE_POP_PATIENCE) {
                    continue; // the POP answers: its tree is being repaired
                }
                warn!(pop = %pop_name, silent_ms = silent.as_millis() as u64, alive, "no media from the POP: moving to another");
                avoid.push(pop_addr);
                // The POPs listed at LOGIN first (no round trip to the
                // bootstrapper); a new LOGIN if none of them will do.
                let moved = match open_session(&cli, bootstrap, rtp_port, &avoid, Some(&pops), started).await {
                    Ok(open) => Ok(open),
                    Err(e) => {
                        info!("none of the POPs known will do ({e:#}): logging in again");
                        open_session(&cli, bootstrap, rtp_port, &avoid, None, started).await
                    }
                };
                match moved {
                    Ok(open) => {
                        let sw = Switch {
                            from: pop_name.clone(),
                            to: open.pop_name.clone(),
                            at_ms: started.elapsed().as_secs_f64() * 1000.0,
                            gap_ms: 0.0,
                        };
                        info!(from = %sw.from, to = %sw.to, "switched POP");
                        pending_switch = Some((sw, silent_since));
                        session = open.session;
                        session_id = open.id;
                        pops = open.pops;
                        pop_addr = open.pop_addr;
                        pop_name = open.pop_name;
                        report.pop = pop_addr.ip().to_string();
                        report.pop_name = pop_name.clone();
                    }
                    Err(e) => {
                        warn!("no other POP yet: {e:#}");
                        avoid.retain(|a| *a != pop_addr);
                    }
                }
            }
            _ = until_end => break,
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
        }
    }

    let teardown = session.teardown(pb::SessionRequest { session_id: session_id.clone() });
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), teardown)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|s| s.message().to_string()))
    {
        warn!("TEARDOWN not acknowledged: {e}");
    }
    if let Some(first) = first_packet_wall {
        let presented = player.presented_since(first + Duration::from_secs(2));
        report.av_skew_ms = presented.skew_ms();
        report.glass_to_glass_ms = Latency::of(presented.video_ms);
        report.audio_latency_ms = Latency::of(presented.audio_ms);
    }
    let [video, audio] = player.lip_sync_holds();
    report.lip_sync_hold_ms = LipSyncHold { video: video * 1000.0, audio: audio * 1000.0 };
    let decoded = tokio::task::spawn_blocking(move || player.stop()).await?;
    let s = stats.summary();
    report.frames_decoded = decoded.video_frames;
    report.audio_buffers = decoded.audio_buffers;
    report.packets_received = s.packets_received;
    report.packets_lost = s.packets_lost;
    report.bytes_received = s.bytes;
    report.jitter_ms = s.jitter_ms;
    report.first_frame_ms = decoded.first_frame.map(|t| t.duration_since(started).as_secs_f64() * 1000.0);
    report.request_to_first_frame_ms = report.first_frame_ms.map(|ms| ms - report.startup.pop_chosen_ms);
    report.cpu_us_per_s = process_cpu_us() / started.elapsed().as_secs_f64().max(1e-3);
    let json = serde_json::to_string_pretty(&report)?;
    match &cli.stats_json {
        Some(path) => std::fs::write(path, &json).with_context(|| format!("write {}", path.display()))?,
        None => println!("{json}"),
    }
    info!(frames = report.frames_decoded, audio = report.audio_buffers, lost = report.packets_lost, first_frame_ms = ?report.first_frame_ms, "session ended");
    if report.frames_decoded == 0 {
        bail!("no video frame was decoded from {} packets", report.packets_received);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, rtt_ms: f64, on_link: bool) -> Candidate {
        Candidate { name: name.into(), addr: "10.0.0.1:7070".parse().unwrap(), rtt_ms, on_link }
    }

    #[test]
    fn lowest_round_trip_wins_and_on_link_breaks_noise_ties() {
        assert_eq!(choose_pop(&[c("a", 5.0, false), c("b", 2.0, false)]).unwrap().name, "b");
        assert_eq!(choose_pop(&[c("a", 0.25, true), c("b", 0.2, false)]).unwrap().name, "a");
        assert_eq!(choose_pop(&[c("a", 3.0, true), c("b", 0.2, false)]).unwrap().name, "b", "a far on-link POP loses");
        assert!(choose_pop(&[]).is_none());
    }

    #[test]
    fn on_link_matches_the_subnet() {
        let nets = [(u32::from(std::net::Ipv4Addr::new(10, 0, 7, 20)), 0xffff_ff00)];
        assert!(on_link("10.0.7.2".parse().unwrap(), &nets));
        assert!(!on_link("10.0.8.2".parse().unwrap(), &nets));
    }
}
