//! Live publishing in a lab: the server's CPU per ingested Mbit (ffmpeg
//! publishing a file, H.264 and AAC, over RTSP and over SRT, nobody
//! watching; the server at rest measured in the same run), and the time to
//! first frame of an RTSP player (`rtspwatch`) at a POP once a publish is
//! up: cold (the POP joins a new tree; the player waits for the
//! publisher's next keyframe) and warm (another player already watches at
//! that POP: it starts from the cached GOP). Needs root and ffmpeg.
//!
//! usage: pubbench [LAB] [ROUNDS] [SECONDS]   (default: netns/labs/seed.json, 3, 8)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use netlab::lab::{Lab, RoleKind};
use netlab::run::{self, Bins};
use netlab::state::LabState;
use netlab::{cpu, faults};
use serde_json::Value;

/// ffmpeg publishing `file` in a loop from `host`'s namespace.
struct Publisher(Child);

impl Publisher {
    fn start(st: &LabState, host: &str, file: &Path, url: &str) -> Result<Publisher> {
        let ns = netlab::plan::ns_name(&st.prefix, host);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "ffmpeg", "-hide_banner", "-loglevel", "error", "-re"])
            .args(["-stream_loop", "-1", "-i"])
            .arg(file)
            .args(["-c", "copy"]);
        if url.starts_with("srt://") {
            cmd.args(["-f", "mpegts", url]);
        } else {
            cmd.args(["-f", "rtsp", "-rtsp_transport", "tcp", url]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Publisher(child))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// rtspwatch on `host` for `url`: its first frame (ms from its start).
fn first_frame(st: &LabState, bins: &Bins, host: &str, url: &str, secs: u32) -> Result<f64> {
    let tool = bins.oclient.with_file_name("rtspwatch");
    anyhow::ensure!(tool.is_file(), "no rtspwatch binary at {}", tool.display());
    let ns = netlab::plan::ns_name(&st.prefix, host);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&tool)
        .arg(url)
        .args(["--tcp", "--duration", &secs.to_string()])
        .output()?;
    let s: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rtspwatch printed no report: {}", String::from_utf8_lossy(&out.stderr)))?;
    s["first_frame_ms"].as_f64().ok_or_else(|| anyhow!("rtspwatch for {url}: no frame ({})", s["error"]))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: pubbench [LAB] [ROUNDS] [SECONDS]\nServer CPU per ingested Mbit (RTSP and SRT publishers) and an RTSP \
             player's time to first frame of a published stream (cold, warm), on LAB (default \
             netns/labs/seed.json), ROUNDS starts each (default 3), SECONDS per CPU window (default 8). Needs root \
             and ffmpeg."
        );
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let rounds: usize = args.get(2).map(|r| r.parse()).transpose().context("ROUNDS")?.unwrap_or(3);
    let secs: u64 = args.get(3).map(|r| r.parse()).transpose().context("SECONDS")?.unwrap_or(8);
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    let prefix = format!("pu{}", std::process::id() % 100_000);
    let opts = run::UpOptions::new(&prefix, Some(bins.dir()));
    let result = run::up(&lab, &opts).and_then(|st| measure(&lab, &st, &bins, rounds, Duration::from_secs(secs)));
    let down = run::down(&prefix);
    result?;
    down.map(|_| ())
}

fn measure(lab: &Lab, st: &LabState, bins: &Bins, rounds: usize, window: Duration) -> Result<()> {
    let boot = lab.roles.iter().find(|r| r.kind == RoleKind::Bootstrapper).ok_or_else(|| anyhow!("no bootstrapper"))?;
    let server = boot.name.clone();
    let server_addr = st.bootstrap.clone().ok_or_else(|| anyhow!("no bootstrapper address"))?;
    let server_ip = server_addr.rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or(server_addr.clone());
    let client =
        lab.roles.iter().find(|r| r.kind == RoleKind::Client).ok_or_else(|| anyhow!("the lab has no client"))?;
    let host = lab.hosts[client.host].name.clone();
    let pop = lab.local_pop(client.host).ok_or_else(|| anyhow!("client host {host} has no POP on its LAN"))?;
    let pid = st
        .processes
        .iter()
        .find(|p| p.name == server)
        .map(|p| p.pid)
        .ok_or_else(|| anyhow!("{server} is not running"))?;
    let file = st.dir().join("encoder.mp4");
    netlab::demo::make_encoder_file(&file)?;

    let cpu_over = |w: Duration| -> Result<(f64, u64)> {
        let bytes = |v: &Value| v["published"]["counters"]["bytes_in"].as_u64().unwrap_or(0);
        let b0 = bytes(&faults::inspect_node(lab, st, bins, &server)?);
        let before = cpu::read_ticks(pid).ok_or_else(|| anyhow!("{server} is gone"))?;
        let t = Instant::now();
        std::thread::sleep(w);
        let after = cpu::read_ticks(pid).ok_or_else(|| anyhow!("{server} is gone"))?;
        let wall = t.elapsed();
        let b1 = bytes(&faults::inspect_node(lab, st, bins, &server)?);
        Ok((
            cpu::rate(before, after, cpu::ticks_per_s(), wall),
            b1.saturating_sub(b0) * 1_000_000 / wall.as_micros().max(1) as u64,
        ))
    };
    netlab::sys::sleep(Duration::from_secs(2))?;
    let (idle, _) = cpu_over(window)?;
    let mut ingest = Vec::new();
    for (via, url) in [
        ("RTSP", format!("rtsp://{server_ip}:8554/benchrtsp")),
        ("SRT", format!("srt://{server_ip}:8890?streamid=publish:benchsrt")),
    ] {
        let publisher = Publisher::start(st, &host, &file, &url)?;
        netlab::sys::sleep(Duration::from_secs(3))?;
        let (us, bytes_per_s) = cpu_over(window)?;
        drop(publisher);
        let mbit = bytes_per_s as f64 * 8.0 / 1e6;
        println!("pubbench: {via} publisher: {mbit:.2} Mbit/s in, {server} {us:.0} µs/s");
        ingest.push((via, mbit, us));
        netlab::sys::sleep(Duration::from_secs(2))?;
    }

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let name = format!("start{round}");
        let publisher = Publisher::start(st, &host, &file, &format!("rtsp://{server_ip}:8554/{name}"))?;
        netlab::sys::sleep(Duration::from_secs(3))?;
        let url = format!("rtsp://{pop}:8554/{name}");
        let ms = first_frame(st, bins, &host, &url, 2)?;
        println!("pubbench: round {}: cold {ms:.0} ms", round + 1);
        cold.push(ms);
        // One player holds the tree at the POP; another starts beside it.
        let ns = netlab::plan::ns_name(&st.prefix, &host);
        let tool = bins.oclient.with_file_name("rtspwatch");
        let mut holder = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&tool)
            .arg(&url)
            .args(["--tcp", "--duration", "8"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        netlab::sys::sleep(Duration::from_secs(3))?;
        let ms = first_frame(st, bins, &host, &url, 2);
        let _ = holder.wait();
        let ms = ms?;
        println!("pubbench: round {}: warm at the POP {ms:.0} ms", round + 1);
        warm.push(ms);
        drop(publisher);
        netlab::sys::sleep(Duration::from_secs(2))?;
    }

    println!(
        "Live publishing, lab {}, server {server}, publisher and players on {host}, POP {pop}, binaries {}",
        lab.file.as_deref().unwrap_or(Path::new("?")).display(),
        bins.dir().display()
    );
    println!("  server at rest: {idle:.0} µs of CPU per second");
    println!(
        "  {:>5} {:>10} {:>12} {:>14} {:>18}",
        "via", "in Mbit/s", "server µs/s", "µs per Mbit", "net µs per Mbit"
    );
    for (via, mbit, us) in &ingest {
        println!(
            "  {:>5} {:>10.2} {:>12.0} {:>14.0} {:>18.0}",
            via,
            mbit,
            us,
            us / mbit.max(1e-9),
            (us - idle).max(0.0) / mbit.max(1e-9)
        );
    }
    println!(
        "  RTSP player's first frame of a published stream (rtspwatch over TCP, {rounds} rounds, median): cold {:.0} ms \
         (each {:?}), warm at the POP {:.0} ms (each {:?})",
        median(cold.clone()),
        cold.iter().map(|m| m.round()).collect::<Vec<_>>(),
        median(warm.clone()),
        warm.iter().map(|m| m.round()).collect::<Vec<_>>()
    );
    println!("  (ingest: H.264 re-packetised, AAC decoded and encoded as Opus; net: minus the server at rest)");
    Ok(())
}
