//! `overlay-sim`: seeded fault schedules on a simulated overlay, judged
//! against the route oracle; prints convergence, message load and delay
//! penalty. A seed that fails is printed with its trace; `--seed N
//! --trace` replays it.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use overlay_sim::graph::Shape;
use overlay_sim::sim::Config;
use overlay_sim::{by_kind, quantile, repairs_by_kind, run, Report};

#[derive(Parser, Debug)]
#[command(about = "Simulates the overlay (overlay-core's engine: STATUS probes, route tables, stream trees and their \
repair) on a virtual clock: a seeded topology, a cold start, viewers at POPs, then random faults, each judged against a \
route oracle until the routes pass and every viewer's POP is fed again; trees are checked for loops and bad roots")]
struct Args {
    /// Nodes in the overlay.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Servers among them (each offers one stream).
    #[arg(long, default_value_t = 10)]
    servers: usize,
    /// POPs among them.
    #[arg(long, default_value_t = 200)]
    pops: usize,
    /// Links each node makes to its nearest others (mean degree about twice this).
    #[arg(long, default_value_t = 3)]
    nearest: usize,
    /// Long-haul links between random nodes, per 100 nodes.
    #[arg(long, default_value_t = 10)]
    long_haul: usize,
    /// Side of the square the nodes are placed in, km (link delays follow
    /// distance).
    #[arg(long, default_value_t = 6000)]
    side_km: u32,
    /// Seeds to run (each: its own topology and fault schedule).
    #[arg(long, default_value_t = 8)]
    seeds: u64,
    /// The first seed; seeds run from it upward.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run only this seed (replay), printing its trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Faults per seed, each followed by convergence.
    #[arg(long, default_value_t = 12)]
    faults: usize,
    /// Chance that a message (probe or heartbeat) is lost.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Queueing jitter added to each message, up to this many µs.
    #[arg(long, default_value_t = 2000)]
    jitter_us: u64,
    /// Prefer routes at most this many rounds behind their server's newest
    /// probe (onode: 1, older ones only when no newer one is left).
    #[arg(long)]
    rounds_kept: Option<u64>,
    /// Updates a node may send each neighbour per round after the round's
    /// first copy (onode: 2).
    #[arg(long)]
    updates_per_round: Option<u32>,
    /// A route not refreshed for this long is forgotten, ms (onode: three
    /// probe intervals and 200 ms).
    #[arg(long, default_value_t = 1700)]
    stale_ms: u64,
    /// Trace the routes still failing at every interval after this many
    /// since a fault (print with --trace).
    #[arg(long)]
    explain_after: Option<u32>,
    /// Share of the POPs with a viewer (each watching one stream).
    #[arg(long, default_value_t = 0.5)]
    watching: f64,
    /// Put every node's log lines (joins, repairs, prunes) in the trace.
    #[arg(long)]
    notes: bool,
    /// Print every seed's trace, not only failing ones.
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.servers + args.pops > args.nodes || args.servers == 0 {
        eprintln!(
            "overlay-sim: --servers ({}) + --pops ({}) must fit in --nodes ({}), with at least one server",
            args.servers, args.pops, args.nodes
        );
        return ExitCode::from(2);
    }
    if !(0.0..1.0).contains(&args.loss) {
        eprintln!("overlay-sim: --loss must be in [0, 1), not {}", args.loss);
        return ExitCode::from(2);
    }
    let shape = Shape {
        nodes: args.nodes,
        servers: args.servers,
        pops: args.pops,
        nearest: args.nearest,
        long_haul: args.long_haul,
        side_km: args.side_km,
    };
    if !(0.0..=1.0).contains(&args.watching) {
        eprintln!("overlay-sim: --watching must be in [0, 1], not {}", args.watching);
        return ExitCode::from(2);
    }
    let mut config = Config {
        loss: args.loss,
        jitter_us: args.jitter_us,
        explain_after: args.explain_after,
        watching: args.watching,
        notes: args.notes,
        ..Config::default()
    };
    if let Some(r) = args.rounds_kept {
        config.routing.rounds_kept = r;
    }
    if let Some(u) = args.updates_per_round {
        config.routing.updates_per_round = u;
    }
    config.routing.stale_after = std::time::Duration::from_millis(args.stale_ms);
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    println!(
        "overlay-sim: {} nodes ({} servers, {} POPs), {} seeds x {} faults, loss {:.1}%, jitter {} µs, probe interval {} ms",
        args.nodes,
        args.servers,
        args.pops,
        seeds.len(),
        args.faults,
        args.loss * 100.0,
        args.jitter_us,
        config.probe_interval_us / 1000
    );
    let started = Instant::now();
    let mut reports: Vec<Report> = Vec::new();
    for seed in seeds {
        let t = Instant::now();
        let r = run(shape, config, seed, args.faults);
        let failures = r.failures();
        println!(
            "seed {seed}: degree {:.2}, cold start {} intervals, {:.1} probes/node/interval, delay penalty mean {:.4} max {:.3}; \
{} viewers' POPs fed after {} ms, trees {:.4} over the shortest path from the root (max {:.3}), {:.2} tree messages/node/interval ({:.1} s)",
            r.mean_degree,
            r.start.as_ref().map_or("NOT CONVERGED".to_string(), |k| k.to_string()),
            r.messages_per_node_interval,
            r.penalty_mean,
            r.penalty_max,
            r.viewers,
            r.trees_start.as_ref().map_or("NOT".to_string(), |us| (us / 1000).to_string()),
            r.tree_penalty_mean,
            r.tree_penalty_max,
            r.tree_messages_per_node_interval,
            t.elapsed().as_secs_f64()
        );
        if args.trace || !failures.is_empty() {
            for line in &r.trace {
                println!("    {line}");
            }
        }
        for f in &failures {
            println!(
                "PROBLEM seed {seed}: {f} (replay: overlay-sim --seed {seed} --nodes {} --faults {} --trace)",
                args.nodes, args.faults
            );
        }
        reports.push(r);
    }

    let bound = reports.iter().map(|r| r.mean_degree * r.servers as f64).fold(f64::MAX, f64::min);
    let msgs: Vec<f64> = reports.iter().map(|r| r.messages_per_node_interval).collect();
    let starts: Vec<u32> = {
        let mut v: Vec<u32> = reports.iter().filter_map(|r| r.start.as_ref().ok().copied()).collect();
        v.sort_unstable();
        v
    };
    println!();
    println!("summary over {} seeds ({:.1} s):", reports.len(), started.elapsed().as_secs_f64());
    println!(
        "  cold start: routes pass the oracle after {}..{} probe intervals (median {})",
        starts.first().copied().unwrap_or(0),
        starts.last().copied().unwrap_or(0),
        quantile(&starts, 0.5)
    );
    println!(
        "  control messages: {:.1}..{:.1} probe copies per node per probe interval (bound: mean degree x servers = {:.1})",
        msgs.iter().copied().fold(f64::MAX, f64::min),
        msgs.iter().copied().fold(0.0, f64::max),
        bound
    );
    println!(
        "  routes failing the oracle at rest (lost probes, rounds crossing): {:.3}% (worst seed {:.3}%; at one instant typically {}, at most {})",
        100.0 * reports.iter().map(|r| r.rest_failing).sum::<f64>() / reports.len().max(1) as f64,
        100.0 * reports.iter().map(|r| r.rest_failing).fold(0.0, f64::max),
        reports.iter().map(|r| r.rest_typical).max().unwrap_or(0),
        reports.iter().map(|r| r.rest_most).max().unwrap_or(0)
    );
    println!(
        "  relative delay penalty after convergence: mean {:.4}, worst route {:.3}",
        reports.iter().map(|r| r.penalty_mean).sum::<f64>() / reports.len().max(1) as f64,
        reports.iter().map(|r| r.penalty_max).fold(0.0, f64::max)
    );
    println!("  convergence after a fault (routes failing back to the typical number at rest), in probe intervals:");
    print_by_kind(by_kind(&reports));
    let mean = |f: fn(&Report) -> f64| reports.iter().map(f).sum::<f64>() / reports.len().max(1) as f64;
    println!(
        "  trees: delay to each viewer's POP over the shortest path from the tree's root {:.4} right after the last fault, \
{:.4} (worst POP {:.3}) once the trees moved (settle time + 5 s later); over the shortest path from the nearest server \
{:.4}; {} branches still sent to a neighbour fed by another",
        mean(|r| r.tree_penalty_before_moves),
        mean(|r| r.tree_penalty_mean),
        reports.iter().map(|r| r.tree_penalty_max).fold(0.0, f64::max),
        mean(|r| r.tree_nearest_mean),
        reports.iter().map(|r| r.strays).sum::<usize>()
    );
    println!("  tree repair after a fault (until every viewer's POP a server reaches is fed), in ms, faults that cut a feed:");
    print_by_kind(repairs_by_kind(&reports));
    let failed: usize = reports.iter().map(|r| r.failures().len()).sum();
    if failed > 0 {
        println!(
            "{failed} problems: runs that did not converge within {} probe intervals, or broken trees (PROBLEM lines above)",
            overlay_sim::LIMIT
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// One line per fault kind: how many, and the median, 95th percentile and
/// most of the figures.
fn print_by_kind(figures: std::collections::BTreeMap<overlay_sim::FaultKind, Vec<u32>>) {
    println!("    {:<24} {:>5} {:>7} {:>5} {:>5}", "fault", "count", "median", "p95", "max");
    for (kind, mut v) in figures {
        v.sort_unstable();
        println!(
            "    {:<24} {:>5} {:>7} {:>5} {:>5}",
            kind.label(),
            v.len(),
            quantile(&v, 0.5),
            quantile(&v, 0.95),
            v.last().copied().unwrap_or(0)
        );
    }
}
