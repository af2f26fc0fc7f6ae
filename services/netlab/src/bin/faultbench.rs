//! Failover benchmark: runs every fault of `netlab::faults` several times
//! on a fresh lab each, and prints the media gap the affected clients saw
//! (median, min, max). Needs root.
//!
//! usage: faultbench [LAB] [RUNS]   (default: netns/labs/seed.json, 3)

use std::path::PathBuf;

use netlab::faults::{self, Fault};
use netlab::lab::Lab;
use netlab::run::Bins;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: faultbench [LAB] [RUNS]\nRuns each fault RUNS times on LAB (default netns/labs/seed.json, 3) and prints the media gap per fault.");
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    println!("failover: media gap seen by the clients a fault hits, {runs} runs each, lab {}", lab_file.display());
    for fault in Fault::ALL {
        let mut gaps = Vec::new();
        let mut problems = Vec::new();
        for i in 0..runs {
            let prefix = format!("fb{}{i}", std::process::id() % 10000);
            match faults::run_in_fresh_lab(&lab, &bins, fault, &prefix, None) {
                Ok(run) => {
                    gaps.push(run.gap_ms());
                    problems.extend(run.problems());
                }
                Err(e) => problems.push(format!("run {i}: {e:#}")),
            }
        }
        gaps.sort_by(f64::total_cmp);
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(f64::NAN);
        let list: Vec<String> = gaps.iter().map(|g| format!("{g:.0}")).collect();
        println!("  {:28} median {:6.0} ms   runs: {}", fault.name(), median, list.join(" "));
        for p in problems {
            println!("      problem: {p}");
        }
    }
    Ok(())
}
