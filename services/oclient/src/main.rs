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
use tonic::transport::{Channel, Endpoint};
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
    /// Round-trip probes per POP.
    #[arg(long, default_value_t = 3)]
    probes: u32,
    /// Jitter buffer latency in ms (how long to wait for late packets).
    #[arg(long, default_value_t = media::DEFAULT_LATENCY_MS)]
    latency_ms: u32,
    /// Use this POP (IP or IP:PORT) instead of probing the ones the bootstrapper lists.
    #[arg(long)]
    pop: Option<String>,
    /// Print a stats line every second.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stats_line: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    client: String,
    stream: String,
    pop: String,
    pop_name: String,
    pop_rtt_ms: BTreeMap<String, f64>,
    server: String,
    frames_decoded: u64,
    audio_buffers: u64,
    packets_received: u64,
    packets_lost: u64,
    bytes_received: u64,
    jitter_ms: f64,
    first_frame_ms: Option<f64>,
    setup_ms: f64,
    pauses: u32,
    /// Longest time between two received packets after the first, in ms.
    longest_gap_ms: f64,
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

fn endpoint(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(800))
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

/// The lowest of a few round trips to one POP address, in ms.
async fn probe_rtt(addr: SocketAddr, probes: u32) -> Option<f64> {
    let mut client = SessionClient::new(endpoint(addr).ok()?);
    let mut best: Option<f64> = None;
    for _ in 0..probes.max(1) {
        let t = Instant::now();
        let ok =
            tokio::time::timeout(Duration::from_secs(1), client.probe(pb::ClientProbe { client_time_us: 0 })).await;
        if let Ok(Ok(_)) = ok {
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            best = Some(best.map_or(ms, |b: f64| b.min(ms)));
        }
    }
    best
}

enum Key {
    TogglePause,
    Quit,
}

/// Reads p/space/q from standard input (raw mode on a terminal).
fn spawn_keys() -> mpsc::UnboundedReceiver<Key> {
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
    rx
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let bootstrap = parse_addr(&cli.bootstrap, cli.control_port).context("--bootstrap")?;
    // GStreamer and the decoder pipeline start while the session is set up.
    let config =
        media::PlayerConfig { headless: cli.headless, record: cli.record.clone(), latency_ms: cli.latency_ms };
    let player = tokio::task::spawn_blocking(move || media::Player::start(config));

    let span = tracing::info_span!("session", client = %cli.name, stream = %cli.stream);
    let (mut session, session_id, pop_addr, report_base, socket) = async {
        let mut boot = BootstrapClient::new(endpoint(bootstrap)?);
        let login = boot
            .login(pb::LoginRequest { client: cli.name.clone(), stream: cli.stream.clone() })
            .await
            .with_context(|| format!("LOGIN at the bootstrapper {bootstrap}"))?
            .into_inner();
        let port = login.control_port as u16;
        let mut addrs: Vec<(String, SocketAddr)> = login
            .pops
            .iter()
            .flat_map(|p| p.addresses.iter().filter_map(|a| Some((p.name.clone(), SocketAddr::new(a.parse().ok()?, port)))))
            .collect();
        if let Some(forced) = &cli.pop {
            let forced = parse_addr(forced, port).context("--pop")?;
            let name = addrs.iter().find(|(_, a)| *a == forced).map(|(n, _)| n.clone()).unwrap_or_else(|| forced.to_string());
            addrs = vec![(name, forced)];
        }
        if addrs.is_empty() {
            bail!("the bootstrapper {bootstrap} knows no live POP");
        }
        let mut rtts = BTreeMap::new();
        let mut best: Option<(f64, String, SocketAddr)> = None;
        let mut set = tokio::task::JoinSet::new();
        for (name, a) in addrs.clone() {
            let probes = cli.probes;
            set.spawn(async move { (name, a, probe_rtt(a, probes).await) });
        }
        while let Some(Ok((name, a, rtt))) = set.join_next().await {
            if let Some(ms) = rtt {
                rtts.insert(a.ip().to_string(), ms);
                if best.as_ref().is_none_or(|(b, _, _)| ms < *b) {
                    best = Some((ms, name, a));
                }
            }
        }
        let Some((rtt, pop_name, pop_addr)) = best else {
            bail!("no POP answered: tried {}", addrs.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>().join(", "))
        };
        info!(pop = %pop_name, addr = %pop_addr, rtt_ms = format!("{rtt:.2}"), "chose the POP with the lowest round trip");

        let socket = UdpSocket::bind(SocketAddr::new(cli.bind, 0)).await.context("bind the RTP socket")?;
        let rtp_port = socket.local_addr()?.port();
        let mut session = SessionClient::new(endpoint(pop_addr)?);
        let connect = session
            .connect_pop(pb::ConnectRequest { client: cli.name.clone() })
            .await
            .with_context(|| format!("CONNECT_POP at {pop_name} ({pop_addr})"))?
            .into_inner();
        let mut setup = tonic::Request::new(pb::SetupRequest {
            session_id: connect.session_id.clone(),
            stream: cli.stream.clone(),
            rtp_port: u32::from(rtp_port),
            rtp_host: if cli.bind.is_unspecified() { String::new() } else { cli.bind.to_string() },
        });
        telemetry::inject(setup.metadata_mut());
        let setup = match session.setup(setup).await {
            Ok(r) => r.into_inner(),
            Err(s) => match s.code() {
                tonic::Code::NotFound => bail!("stream {:?} is unknown: {}", cli.stream, s.message()),
                tonic::Code::Unavailable => bail!("stream {:?} cannot be reached: {}", cli.stream, s.message()),
                _ => bail!("SETUP of {:?} at {pop_name} failed: {}", cli.stream, s.message()),
            },
        };
        let report = Report {
            client: cli.name.clone(),
            stream: cli.stream.clone(),
            pop: pop_addr.ip().to_string(),
            pop_name: pop_name.clone(),
            pop_rtt_ms: rtts,
            server: setup.stream.map(|s| s.server).unwrap_or_default(),
            setup_ms: started.elapsed().as_secs_f64() * 1000.0,
            ..Report::default()
        };
        Ok((session, connect.session_id, pop_addr, report, socket))
    }
    .instrument(span)
    .await?;

    let player = player.await.context("player task")??;
    session
        .play(pb::SessionRequest { session_id: session_id.clone() })
        .await
        .with_context(|| format!("PLAY at {pop_addr}"))?;
    info!(stream = %cli.stream, pop = %report_base.pop_name, server = %report_base.server, "playing");

    let mut report = report_base;
    let mut stats = media::RtpStats::new();
    let mut keys = spawn_keys();
    let mut paused = false;
    let deadline = cli.duration.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (0u64, 0u64);
    let mut buf = vec![0u8; 2048];
    let mut last_packet: Option<Instant> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
                    if let Some(prev) = last_packet {
                        report.longest_gap_ms = report.longest_gap_ms.max((now - prev).as_secs_f64() * 1000.0);
                    }
                    last_packet = Some(now);
                    stats.on_packet(&packet, now);
                    player.push_rtp(&buf[..n]);
                }
            }
            key = keys.recv() => match key {
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
                None => {}
            },
            _ = tick.tick() => {
                if cli.stats_line {
                    let d = player.decoded();
                    let s = stats.summary();
                    let fps = d.video_frames - last.0;
                    let kbit = (s.bytes - last.1) * 8 / 1000;
                    last = (d.video_frames, s.bytes);
                    eprintln!("[{}] {fps} fps  {kbit} kbit/s  lost {}  jitter {:.1} ms{}", cli.name, s.packets_lost, s.jitter_ms, if paused { "  (paused)" } else { "" });
                }
                if let Some(e) = player.error() {
                    warn!("decoder error: {e}");
                }
            }
            _ = until_end => break,
            _ = tokio::signal::ctrl_c() => break,
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
    let decoded = tokio::task::spawn_blocking(move || player.stop()).await?;
    let s = stats.summary();
    report.frames_decoded = decoded.video_frames;
    report.audio_buffers = decoded.audio_buffers;
    report.packets_received = s.packets_received;
    report.packets_lost = s.packets_lost;
    report.bytes_received = s.bytes;
    report.jitter_ms = s.jitter_ms;
    report.first_frame_ms = decoded.first_frame.map(|t| t.duration_since(started).as_secs_f64() * 1000.0);
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
