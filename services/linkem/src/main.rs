//! `linkem`: run the link emulator between two interfaces, or talk to a
//! running one (change its settings, read its counters).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use linkem::control::{self, Dir, Request};
use linkem::driver::{self, Config};
use linkem::schedule::{Settings, Update};

#[derive(Parser)]
#[command(
    name = "linkem",
    version,
    about = "Link emulator: bridges two interfaces with AF_PACKET and applies delay, jitter, loss and rate per direction",
    long_about = "Link emulator for kernels without netem. `linkem run` bridges two interfaces (the two \
veths of a lab link that end in a link namespace) and applies, per direction, delay, jitter (no \
reordering unless asked), random loss and a rate limit with a bounded queue. `a2b` is what arrives \
on --iface-a and leaves on --iface-b. `linkem set` and `linkem stats` talk to a running one through \
its control socket. Settings are key=value lists: delay_ms, jitter_ms, loss_pct, rate_kbit (0: \
unlimited), queue_ms (default 100), reorder (true/false)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bridge two interfaces until SIGINT or SIGTERM
    Run {
        /// First interface (side a)
        #[arg(long)]
        iface_a: String,
        /// Second interface (side b)
        #[arg(long)]
        iface_b: String,
        /// Label for logs and stats
        #[arg(long, default_value = "link")]
        name: String,
        /// Settings of both directions, like delay_ms=20,loss_pct=1
        #[arg(long, default_value = "")]
        both: String,
        /// Settings of a2b (over --both, field by field)
        #[arg(long, default_value = "")]
        a2b: String,
        /// Settings of b2a (over --both, field by field)
        #[arg(long, default_value = "")]
        b2a: String,
        /// Control socket (unix stream, JSON lines) to create
        #[arg(long)]
        control: Option<PathBuf>,
        /// Stats file to rewrite every 500 ms (JSON)
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Seed of the loss and jitter generator (default: from the clock)
        #[arg(long)]
        seed: Option<u64>,
        /// Most frames held at once per direction
        #[arg(long, default_value_t = 20_000)]
        max_queued: usize,
        /// Leave the interfaces' offloads as they are
        #[arg(long)]
        keep_offloads: bool,
    },
    /// Change a running linkem's settings (only the fields given)
    Set {
        /// Its control socket
        #[arg(long)]
        control: PathBuf,
        /// a2b, b2a or both
        #[arg(long, default_value = "both")]
        dir: Dir,
        #[command(flatten)]
        update: Update,
    },
    /// Print a running linkem's counters and settings (JSON)
    Stats {
        /// Its control socket
        #[arg(long)]
        control: PathBuf,
    },
}

fn settings(both: &str, one: &str, which: &str) -> Result<Settings> {
    let base = Update::parse(both).context("--both")?.apply(&Settings::default()).context("--both")?;
    Update::parse(one).and_then(|u| u.apply(&base)).with_context(|| format!("--{which}"))
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Run { iface_a, iface_b, name, both, a2b, b2a, control, stats, seed, max_queued, keep_offloads } => {
            (|| {
                let config = Config {
                    name,
                    iface_a,
                    iface_b,
                    a2b: settings(&both, &a2b, "a2b")?,
                    b2a: settings(&both, &b2a, "b2a")?,
                    control,
                    stats,
                    seed: seed.unwrap_or_else(driver::now_ns),
                    max_queued,
                    offloads_off: !keep_offloads,
                };
                driver::run(config)
            })()
        }
        Cmd::Set { control, dir, update } => {
            control::request(&control, &Request::Set { dir, update }, Duration::from_secs(3))
                .map(|s| {
                    println!("a2b: {}\nb2a: {}", driver::describe(&s.a2b.settings), driver::describe(&s.b2a.settings))
                })
                .map_err(Into::into)
        }
        Cmd::Stats { control } => control::request(&control, &Request::Stats, Duration::from_secs(3))
            .map(|s| println!("{}", serde_json::to_string_pretty(&s).expect("a snapshot serializes")))
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linkem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
