//! Failover benchmark: runs every fault of `netlab::faults` several times
//! on a fresh lab each, and prints the media gap the affected clients saw
//! (median, min, max). Needs root.
//!
//! usage: faultbench [LAB] [RUNS] [FAULT...]   (default: netns/labs/seed.json, 3, all)
//!
//! FAULT picks faults by their debug name (kill-relay, link-down, kill-pop,
//! kill-root-server, restart-bootstrapper, restart-relay). Each run gets its
//! own lab prefix, so every run's logs stay under /tmp/netlab-PREFIX.

use std::path::PathBuf;

use netlab::faults::{self, Fault};
use netlab::lab::Lab;
use netlab::run::Bins;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: faultbench [LAB] [RUNS] [FAULT...]\nRuns each fault (or the FAULTs named: {}) RUNS times on LAB \
             (default netns/labs/seed.json, 3) and prints the media gap per fault.",
            Fault::ALL.map(slug).join(", ")
        );
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let wanted = &args[args.len().min(3)..];
    if let Some(unknown) = wanted.iter().find(|w| !Fault::ALL.iter().any(|f| slug(*f) == **w)) {
        anyhow::bail!("unknown fault {unknown:?}: faults are {}", Fault::ALL.map(slug).join(", "));
    }
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    println!("failover: media gap seen by the clients a fault hits, {runs} runs each, lab {}", lab_file.display());
    for (f, fault) in Fault::ALL.into_iter().enumerate() {
        if !wanted.is_empty() && !wanted.iter().any(|w| *w == slug(fault)) {
            continue;
        }
        let mut gaps = Vec::new();
        let mut problems = Vec::new();
        for i in 0..runs {
            let prefix = format!("fb{}f{f}r{i}", std::process::id() % 1000);
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

/// A fault's name on the command line: its variant in kebab case.
fn slug(fault: Fault) -> String {
    let mut out = String::new();
    for (i, c) in format!("{fault:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}
