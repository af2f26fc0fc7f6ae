//! CPU benchmark: what each kind of process costs in a lab, at rest and
//! while streaming, in microseconds of CPU per second (relay at rest, relay
//! forwarding, POP, server, client, link emulator), so that a change that
//! makes a node heavy shows. Needs root.
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
            duration_s: Some((SETTLE + window).as_secs_f64() + 3.0),
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
