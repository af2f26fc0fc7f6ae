//! `linkem-bench`: the emulator's CPU per forwarded packet, and so how many
//! lab links one core can carry.
//!
//! Builds a test bed (two namespaces and a linkem between them, see
//! `linkem::testbed`), sends UDP from one side to the other at a fixed
//! packet rate through 10 ms of delay, and divides the CPU time linkem's
//! threads used (from /proc/PID/task/*/schedstat, in ns) by the frames it
//! forwarded. Needs root; prints `skipped: ...` and exits 0 otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;

use linkem::testbed::{in_netns, is_root, Testbed};

#[derive(Parser)]
#[command(name = "linkem-bench", about = "CPU per packet forwarded by linkem (needs root)")]
struct Args {
    /// Packet rates to offer, packets per second
    #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
    pps: Vec<u64>,
    /// Seconds per rate
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// UDP payload bytes
    #[arg(long, default_value_t = 1000)]
    size: usize,
    /// A lab link's load, packets per second both ways, for the links-per-core figure
    #[arg(long, default_value_t = 1000)]
    link_pps: u64,
    /// The linkem binary (default: next to this one)
    #[arg(long)]
    linkem: Option<PathBuf>,
}

/// CPU time of every thread of `pid`, ns.
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).context("linkem's threads")? {
        let text = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        total += text.split_whitespace().next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

fn round(tb: &Testbed, pid: u32, pps: u64, seconds: f64, size: usize) -> Result<(u64, f64)> {
    let to = SocketAddr::from((tb.addr_b, 9));
    let before = tb.stats()?.a2b.sent_packets;
    let cpu_before = cpu_ns(pid)?;
    let total = (pps as f64 * seconds) as u64;
    in_netns(&tb.ns_a, move || -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let buf = vec![0x5au8; size];
        let start = Instant::now();
        // A millisecond's worth of packets at a time.
        let per_ms = (pps / 1000).max(1);
        let mut sent = 0;
        let mut tick = 0u32;
        while sent < total {
            let due = start + Duration::from_millis(tick as u64);
            tick += 1;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            for _ in 0..per_ms.min(total - sent) {
                // Nothing listens on b: the frames still cross linkem.
                let _ = sock.send_to(&buf, to);
                sent += 1;
            }
        }
        Ok(())
    })??;
    // Let the delay line drain.
    std::thread::sleep(Duration::from_millis(200));
    let forwarded = tb.stats()?.a2b.sent_packets - before;
    let cpu = cpu_ns(pid)? - cpu_before;
    Ok((forwarded, cpu as f64 / forwarded.max(1) as f64 / 1000.0))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !is_root() {
        println!("linkem-bench: skipped: not root (network namespaces need root)");
        return ExitCode::SUCCESS;
    }
    let run = || -> Result<()> {
        let linkem = match &args.linkem {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("linkem"),
        };
        let tb = Testbed::new(&linkem, "delay_ms=10", "delay_ms=10")?;
        tb.pin_neighbours()?;
        let pid = tb.pid().ok_or_else(|| anyhow!("no linkem process"))?;
        for &pps in &args.pps {
            let (forwarded, us) = round(&tb, pid, pps, args.seconds, args.size)?;
            let per_core = 1e6 / us;
            println!(
                "linkem: {pps} pps of {} B through 10 ms of delay for {} s: {forwarded} frames forwarded, \
                 {us:.2} µs CPU per frame -> one core forwards about {:.0}k frames/s, {:.0} lab links at {} frames/s each",
                args.size,
                args.seconds,
                per_core / 1000.0,
                per_core / args.link_pps as f64,
                args.link_pps
            );
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linkem-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
