//! CPU benchmark: what each kind of process costs in a lab, at rest and
//! while streaming, in microseconds of CPU per second (relay at rest, relay
//! forwarding, POP, server, client, link emulator), so that a change that
//! makes a node heavy shows; then, while the viewers still watch, what one
//! Prometheus scrape costs a POP and what one state of the live map costs
//! the bootstrapper (each of the map's updates renders one). Needs root.
//!
//! usage: cpubench [LAB] [SECONDS]   (default: netns/labs/seed.json, 10)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use netlab::cpu::{self, Kind, Usage};
use netlab::lab::Lab;
use netlab::run::{self, Bins, ClientRun};
use netlab::state::LabState;

/// Viewers while streaming: (client host, stream).
const VIEWERS: &[(&str, &str)] = &[("c2", "test"), ("c1", "test")];
/// Time for the trees to form before the streaming window.
const SETTLE: Duration = Duration::from_secs(4);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: cpubench [LAB] [SECONDS]\nCPU per process kind (µs of CPU per second) on LAB (default \
             netns/labs/seed.json), over SECONDS at rest and SECONDS while two viewers watch \"test\" (default 10)."
        );
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let secs: u64 = args.get(2).map(|r| r.parse()).transpose().context("SECONDS")?.unwrap_or(10);
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    let prefix = format!("cb{}", std::process::id() % 100_000);
    let opts = run::UpOptions::new(&prefix, Some(bins.dir()));
    let window = Duration::from_secs(secs);
    let result = run::up(&lab, &opts).and_then(|st| measure(&lab, &st, &bins, window));
    let down = run::down(&prefix);
    let (rest, streaming) = result?;
    down?;
    println!(
        "CPU per process kind, lab {}, binaries {} (µs of CPU per second of wall time)",
        lab_file.display(),
        bins.dir().display()
    );
    println!(" at rest ({secs} s, no stream):");
    print!("{}", cpu::table(&rest));
    println!(" streaming ({secs} s, viewers {VIEWERS:?}):");
    print!("{}", cpu::table(&streaming));
    Ok(())
}

/// Requests per figure of the request costs.
const REQUESTS: usize = 400;

/// CPU time of every thread of `pid` so far, in nanoseconds
/// (/proc/PID/task/*/schedstat), or None once it is gone.
fn cpu_ns(pid: i32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let text = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// What one `GET path` at `addr:port` costs the process `pid` in CPU
/// (µs), and its size: `REQUESTS` of them back to back from `host`'s
/// namespace, less what the process spends meanwhile at the rate it had
/// over the second before.
fn request_cost(st: &LabState, pid: i32, host: &str, addr: &str, port: u16, path: &str) -> Result<(f64, usize)> {
    use std::io::{Read, Write};
    let before = (Instant::now(), cpu_ns(pid).context("the node is gone")?);
    netlab::sys::sleep(Duration::from_secs(1))?;
    let start = (Instant::now(), cpu_ns(pid).context("the node is gone")?);
    let base = (start.1 - before.1) as f64 / (start.0 - before.0).as_secs_f64();
    let (addr, path) = (addr.to_string(), path.to_string());
    let size = netlab::sys::in_netns(&netlab::plan::ns_name(&st.prefix, host), move || -> Result<usize> {
        let mut size = 0;
        for _ in 0..REQUESTS {
            let mut conn = std::net::TcpStream::connect((addr.as_str(), port))?;
            write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply)?;
            size = reply.len();
        }
        Ok(size)
    })??;
    let end = (Instant::now(), cpu_ns(pid).context("the node is gone")?);
    let spent = (end.1 - start.1) as f64 - base * (end.0 - start.0).as_secs_f64();
    Ok((spent.max(0.0) / 1000.0 / REQUESTS as f64, size))
}

fn measure(lab: &Lab, st: &LabState, bins: &Bins, window: Duration) -> Result<(Vec<Usage>, Vec<Usage>)> {
    netlab::sys::sleep(Duration::from_secs(2))?;
    let began = Instant::now();
    let tracked = cpu::track(st);
    netlab::sys::sleep(window)?;
    let rest = cpu::classify(&cpu::spent(tracked, began.elapsed()), |_| false);

    let dir = st.dir().join("cpubench");
    let mut children = Vec::new();
    let mut runs = Vec::new();
    for (host, stream) in VIEWERS {
        let run = ClientRun {
            host: host.to_string(),
            stream: stream.to_string(),
            duration_s: Some((SETTLE + window).as_secs_f64() + 12.0),
            headless: true,
            stats: dir.join(format!("{host}.json")),
            log: Some(dir.join(format!("{host}.log"))),
        };
        children.push(run::start_client(st, bins, &run)?);
        runs.push(run);
    }
    netlab::sys::sleep(SETTLE)?;
    let forwarding = netlab::faults::carrying_nodes(lab, st, bins)?;
    let began = Instant::now();
    let tracked = cpu::track(st);
    netlab::sys::sleep(window)?;
    let mut streaming = cpu::classify(&cpu::spent(tracked, began.elapsed()), |name| forwarding.contains(name));
    // A scrape of a POP that serves a viewer, and the map's state at the
    // bootstrapper.
    let process = |kind: netlab::lab::RoleKind| st.processes.iter().find(|p| p.role == kind);
    let address = |name: &str| -> Option<String> {
        let node = lab.overlay.as_ref()?.node(name)?;
        Some(node.names.first()?.to_string())
    };
    let pop = st
        .processes
        .iter()
        .find(|p| p.role == netlab::lab::RoleKind::Pop && forwarding.contains(&p.name))
        .context("no POP carries the stream")?;
    let (us, size) = request_cost(st, pop.pid, &pop.host, &address(&pop.name).unwrap_or_default(), 9998, "/metrics")?;
    println!(" one /metrics scrape of POP {} while it serves a viewer: {us:.0} µs of CPU ({size} bytes)", pop.name);
    if let Some(boot) = process(netlab::lab::RoleKind::Bootstrapper) {
        let (us, size) =
            request_cost(st, boot.pid, &boot.host, &address(&boot.name).unwrap_or_default(), 9997, "/state")?;
        println!(
            " one state of the live map at the bootstrapper {} (what each update renders): {us:.0} µs of CPU ({size} bytes)",
            boot.name
        );
    }
    for (mut child, run) in children.into_iter().zip(&runs) {
        let _ = child.wait();
        let text =
            std::fs::read_to_string(&run.stats).with_context(|| format!("client on {} wrote no stats", run.host))?;
        let stats: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(us) = stats["cpu_us_per_s"].as_f64() {
            streaming.push(Usage { name: run.host.clone(), kind: Kind::Client, us_per_s: us });
        }
    }
    Ok((rest, streaming))
}
