//! `netlab`: build the overlay's underlay in network namespaces from a lab
//! file, run onode and oclient inside it, report, tear it down.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use netlab::lab::{Impairment, Lab};
use netlab::run::{self, Bins, ClientRun, UpOptions};
use netlab::state::{self, LabState};
use netlab::{delays, demo, plan, probe, sys};

#[derive(Parser)]
#[command(
    name = "netlab",
    version,
    about = "Build the overlay's underlay in Linux network namespaces and run the product in it",
    long_about = "Build the overlay's underlay in Linux network namespaces from a lab file \
(hosts, routers, links, LANs, impairment, roles; see netns/README.md), start the roles \
(bootstrapper first, then servers, relays and POPs) and wait until the overlay is ready; \
run clients, show status, tear everything down.\n\n\
Every namespace is <prefix>-<host>; the lab folder /tmp/netlab-<prefix>/ holds the \
state file, the logs and the clients' stats. Commands other than up and demo find the \
lab by --prefix, or take the only lab that is up. Needs root."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab's network, start its roles, wait until the overlay is ready
    Up {
        /// The lab file (JSON)
        lab: PathBuf,
        #[command(flatten)]
        up: UpArgs,
        /// Build the network only, start no role
        #[arg(long)]
        network_only: bool,
        /// Folder of media files given to the servers as --media
        #[arg(long)]
        media: Option<PathBuf>,
        /// Leave a half-built lab in place when up fails (for debugging)
        #[arg(long)]
        keep_on_failure: bool,
    },
    /// Stop every process in the lab's namespaces and delete them (safe to run twice)
    Down {
        /// Lab prefix (default: the only lab that is up)
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
    },
    /// Show the lab's hosts, addresses, processes and the overlay's readiness
    Status {
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
    },
    /// Run a command inside a host's namespace: netlab exec o3 -- ip route
    Exec {
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
        /// Host name from the lab file
        host: String,
        /// The command and its arguments
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run oclient on a host (a window unless --headless) and print its stats
    Client {
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
        /// Host name from the lab file (a host on a POP's LAN)
        host: String,
        /// Stream to watch (`test` is built in)
        stream: String,
        /// Stop after this many seconds
        #[arg(long)]
        duration: Option<f64>,
        /// Decode without a window
        #[arg(long)]
        headless: bool,
        /// Where onode and oclient are (default: as recorded by up)
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Bring the lab up, play its clients on two streams, print the report, tear down
    Demo {
        /// The lab file (JSON)
        lab: PathBuf,
        #[command(flatten)]
        up: UpArgs,
        /// Leave the lab up after the report (tear down later with `netlab down`)
        #[arg(long)]
        keep: bool,
    },
    /// Ping every address of the lab from every host (ICMP from inside each namespace)
    Check {
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
    },
    /// Change an emulated link's delay, jitter, loss or rate while the lab runs
    LinkSet {
        #[arg(long, env = "NETLAB_PREFIX")]
        prefix: Option<String>,
        /// The link, as HOST-HOST (either order), like o2-o9
        link: String,
        /// Only what this host sends (default: both directions)
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        change: linkem::Update,
    },
    /// Validate a lab file and print its hosts and routes (needs no root)
    Validate {
        lab: PathBuf,
        /// Also print every host's routes
        #[arg(long)]
        routes: bool,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Lab prefix, 1-10 of a-z0-9 (default: nl + 4 random characters)
    #[arg(long, env = "NETLAB_PREFIX")]
    prefix: Option<String>,
    /// Where onode and oclient are (default: $NETLAB_BIN_DIR, next to netlab, target/debug, target/release)
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds to wait for the overlay to be ready
    #[arg(long, default_value_t = 60)]
    ready_timeout: u64,
    /// Control plane over plain TCP with nobody authenticated (default:
    /// mutual TLS with certificates made for this lab); for comparisons
    #[arg(long)]
    plain_control: bool,
}

impl UpArgs {
    fn options(&self, media: Option<PathBuf>, network_only: bool) -> Result<UpOptions> {
        let prefix = self.prefix.clone().unwrap_or_else(state::new_prefix);
        plan::check_prefix(&prefix).map_err(|e| anyhow!(e))?;
        Ok(UpOptions {
            prefix,
            bin_dir: self.bin_dir.clone(),
            media_dir: media,
            network_only,
            ready_timeout: Duration::from_secs(self.ready_timeout),
            plain_control: self.plain_control,
        })
    }
}

fn load_lab(path: &Path) -> Result<Lab> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Lab::load(&abs)?)
}

fn tear_down(prefix: &str) {
    match run::down(prefix) {
        Ok(r) => eprintln!(
            "netlab: lab {prefix} down: stopped {} processes, deleted {} namespaces{}; logs in {}",
            r.processes,
            r.namespaces,
            if r.leftovers > 0 { format!(", removed {} leftover interfaces", r.leftovers) } else { String::new() },
            state::lab_dir(prefix).display()
        ),
        Err(e) => eprintln!("netlab: tearing lab {prefix} down failed: {e:#}"),
    }
}

fn cmd_up(lab_path: &Path, opts: UpOptions, keep_on_failure: bool) -> Result<()> {
    let lab = load_lab(lab_path)?;
    sys::catch_interrupts();
    match run::up(&lab, &opts) {
        Ok(st) => {
            println!(
                "lab {p} is up ({}); folder {}\n  netlab status --prefix {p}\n  netlab exec --prefix {p} HOST -- CMD\n  netlab down --prefix {p}",
                lab_path.display(),
                st.dir().display(),
                p = opts.prefix
            );
            Ok(())
        }
        Err(e) => {
            if sys::interrupted() || !keep_on_failure {
                tear_down(&opts.prefix);
            } else {
                eprintln!("netlab: the half-built lab stays (--keep-on-failure): netlab down --prefix {}", opts.prefix);
            }
            Err(e)
        }
    }
}

fn cmd_demo(lab_path: &Path, opts: UpOptions, keep: bool) -> Result<bool> {
    let lab = load_lab(lab_path)?;
    let bins = Bins::find(opts.bin_dir.as_deref())?;
    if !bins.oclient.is_file() {
        bail!("no oclient next to {}", bins.onode.display());
    }
    sys::catch_interrupts();
    let prefix = opts.prefix.clone();
    let media = state::lab_dir(&prefix).join("media");
    let outcome = (|| -> Result<bool> {
        demo::make_media(&media, &demo::client_streams(&lab))?;
        let opts = UpOptions { media_dir: Some(media.clone()), bin_dir: Some(bins.dir()), ..opts };
        let mut st = run::up(&lab, &opts)?;
        let sc = demo::play(&lab, &mut st, &bins)?;
        print!("{}", demo::report(&sc));
        Ok(!netlab::analysis::any_without_frames(&sc.clients))
    })();
    if keep && !sys::interrupted() {
        eprintln!("netlab: lab {prefix} stays up (--keep): netlab down --prefix {prefix}");
    } else {
        tear_down(&prefix);
    }
    outcome
}

fn cmd_client(
    prefix: Option<&str>,
    host: &str,
    stream: &str,
    duration: Option<f64>,
    headless: bool,
    bin_dir: Option<&Path>,
) -> Result<bool> {
    let prefix = run::pick_prefix(prefix)?;
    let st = LabState::load(&prefix)?;
    let bins = run::lab_bins(&st, bin_dir)?;
    let n = std::fs::read_dir(st.dir().join("clients")).map(|d| d.count()).unwrap_or(0);
    let stats = st.dir().join("clients").join(format!("{host}-{stream}-{}.json", n + 1));
    let c = ClientRun {
        host: host.to_string(),
        stream: stream.to_string(),
        duration_s: duration,
        headless,
        stats: stats.clone(),
        log: None,
    };
    let mut child = run::start_client(&st, &bins, &c)?;
    let status = child.wait()?;
    match std::fs::read_to_string(&stats) {
        Ok(text) => println!("{}", text.trim()),
        Err(_) => eprintln!("netlab: oclient wrote no stats ({})", stats.display()),
    }
    Ok(status.success())
}

fn cmd_check(prefix: Option<&str>) -> Result<bool> {
    let prefix = run::pick_prefix(prefix)?;
    let st = LabState::load(&prefix)?;
    let lab = st.lab()?;
    let all = lab.all_addresses();
    let mut ok = true;
    let mut probes = 0;
    for (h, host) in lab.hosts.iter().enumerate() {
        let targets: Vec<_> = all.iter().filter(|(o, _)| *o != h).map(|(_, a)| *a).collect();
        probes += targets.len();
        let missing = probe::ping_from(&plan::ns_name(&prefix, &host.name), targets, Duration::from_secs(3))?;
        if !missing.is_empty() {
            ok = false;
            println!(
                "{}: no answer from {}",
                host.name,
                missing.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if ok {
        println!("ok: {} hosts reach every address of the lab ({probes} pings)", lab.hosts.len());
    }
    Ok(ok)
}

fn cmd_validate(path: &Path, routes: bool) -> Result<()> {
    let lab = load_lab(path)?;
    println!(
        "{}: {} hosts, {} links, {} LANs, {} roles, overlay {}",
        path.display(),
        lab.hosts.len(),
        lab.segments.iter().filter(|s| s.label.starts_with("link")).count(),
        lab.segments.iter().filter(|s| s.label.starts_with("lan")).count(),
        lab.roles.len(),
        lab.overlay_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
    );
    for w in &lab.warnings {
        println!("warning: {w}");
    }
    if routes {
        for (h, host) in lab.hosts.iter().enumerate() {
            println!("{}:", host.name);
            for i in &host.ifaces {
                println!("  {} {}", i.name, i.addr);
            }
            for r in &lab.routes[h] {
                println!("  {} via {} dev {} (cost {})", r.dest, r.via, r.dev, r.cost);
            }
        }
        if lab.overlay.is_some() {
            print!("{}", overlay_routes(&lab)?);
        }
    }
    Ok(())
}

/// The overlay's link delays and each node's expected next hop toward
/// each server, from the lab file's delays.
fn overlay_routes(lab: &Lab) -> Result<String> {
    use std::fmt::Write as _;
    let d = delays::OverlayDelays::of(lab).map_err(|e| anyhow!(e))?;
    let rule = overlay_core::routing::RoutingConfig::default();
    let mut out = String::from("overlay link delays (ms, as the nodes measure them: half the round trip):\n");
    for ((x, y), ms) in d.link_ms.iter().filter(|((x, y), _)| x < y) {
        let _ = writeln!(out, "  {x}-{y} {ms}");
    }
    out.push_str("expected next hops (lowest summed delay; within 10%, fewer hops):\n");
    for (node, servers) in d.expected_routes(&rule) {
        for (server, c) in servers {
            let _ = writeln!(out, "  {node} toward {server}: via {} ({} ms, {} hops)", c.via, c.delay_ms, c.hops);
        }
    }
    for a in d.ambiguities(&rule, 0.2, 0.05) {
        let _ = writeln!(out, "warning: ambiguous: {a}");
    }
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<bool> = match cli.command {
        Cmd::Up { lab, up, network_only, media, keep_on_failure } => {
            up.options(media, network_only).and_then(|o| cmd_up(&lab, o, keep_on_failure)).map(|_| true)
        }
        Cmd::Down { prefix } => {
            if prefix.is_none() && state::known_prefixes().is_empty() {
                eprintln!("netlab: no lab is up (give --prefix to clean up a lab whose state file is gone)");
                Ok(true)
            } else {
                run::pick_prefix(prefix.as_deref()).map(|p| {
                    tear_down(&p);
                    true
                })
            }
        }
        Cmd::Status { prefix } => run::pick_prefix(prefix.as_deref()).and_then(|p| run::status(&p)).map(|s| {
            print!("{s}");
            true
        }),
        Cmd::Exec { prefix, host, cmd } => {
            run::pick_prefix(prefix.as_deref()).and_then(|p| run::exec(&p, &host, &cmd)).map(|status| {
                if !status.success() {
                    std::process::exit(status.code().unwrap_or(1));
                }
                true
            })
        }
        Cmd::Client { prefix, host, stream, duration, headless, bin_dir } => {
            cmd_client(prefix.as_deref(), &host, &stream, duration, headless, bin_dir.as_deref())
        }
        Cmd::Demo { lab, up, keep } => up.options(None, false).and_then(|o| cmd_demo(&lab, o, keep)),
        Cmd::Check { prefix } => cmd_check(prefix.as_deref()),
        Cmd::Validate { lab, routes } => cmd_validate(&lab, routes).map(|_| true),
        Cmd::LinkSet { prefix, link, from, change } => {
            let change = Impairment::from(change);
            run::pick_prefix(prefix.as_deref()).and_then(|p| run::link_set(&p, &link, from.as_deref(), &change)).map(
                |s| {
                    let (a, b) = s.name.split_once('-').unwrap_or(("a", "b"));
                    println!("{a} -> {b}: {}", linkem::driver::describe(&s.a2b.settings));
                    println!("{b} -> {a}: {}", linkem::driver::describe(&s.b2a.settings));
                    true
                },
            )
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("netlab: error: {e:#}");
            if sys::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
