//! Start-up benchmark: time to first frame on a lab with its link delays,
//! one measured viewer at a time (so that the figures show the protocol,
//! not a 2-core machine decoding five streams at once). Needs root.
//!
//! - cold: nobody watches; the tree is built from the server.
//! - warm at the POP: a background viewer on the same host keeps the stream
//!   at the POP (what an edge server's start-up figure measures).
//! - warm in the overlay: the stream flows to another POP; this one joins
//!   the existing tree.
//!
//! Beside them, a standard RTSP player (GStreamer's rtspsrc, through
//! `rtspwatch`) at the POP on the viewer's LAN: cold, and warm at the POP
//! over UDP and over TCP, from the player's first request to its first
//! decoded frame (in the mutual TLS lab only).
//!
//! And a browser (headless Chromium) opening the POP's player page, which
//! plays with WebRTC (WHEP): cold, and warm at the POP, from the page's
//! first request to its first presented frame (also in the TLS lab only).
//!
//! Each is measured twice, in one lab with the control plane over mutual
//! TLS (the default) and in one over plain TCP, to show what TLS costs;
//! the time from starting the roles to a ready overlay is shown for both.
//!
//! usage: startbench [LAB] [RUNS]   (default: netns/labs/seed.json, 3)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result};
use netlab::lab::{Lab, RoleKind};
use netlab::run::{self, Bins, ClientRun};
use netlab::state::LabState;
use serde_json::Value;

const STREAM: &str = "test";
/// How long each measured viewer watches.
const WATCH_S: f64 = 3.0;
/// Pause after a viewer leaves, for the tree to be pruned.
const PRUNE_PAUSE: Duration = Duration::from_secs(2);

/// One measured start.
struct Start {
    host: String,
    pop: String,
    /// Client start to first frame, and its phases (ms).
    first_frame_ms: f64,
    from_request_ms: f64,
    login_ms: f64,
    pop_choice_ms: f64,
    setup_ms: f64,
}

impl Start {
    /// A standard player's start (RTSP or a browser): one figure, from its
    /// first request, and none of our client's phases.
    fn player(host: &str, pop: &str, first_frame_ms: f64) -> Start {
        Start {
            host: host.to_string(),
            pop: pop.to_string(),
            first_frame_ms,
            from_request_ms: first_frame_ms,
            login_ms: f64::NAN,
            pop_choice_ms: f64::NAN,
            setup_ms: f64::NAN,
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: startbench [LAB] [RUNS]\nMeasures time to first frame of {STREAM:?} on LAB (default \
             netns/labs/seed.json), cold and warm, RUNS times per client host (default 3)."
        );
        return Ok(());
    }
    let lab_file = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("netns/labs/seed.json"));
    let runs: usize = args.get(2).map(|r| r.parse()).transpose().context("RUNS")?.unwrap_or(3);
    let lab = Lab::load(&lab_file)?;
    let bins = Bins::find(None)?;
    netlab::sys::catch_interrupts();
    let mut medians: Vec<BTreeMap<&'static str, f64>> = Vec::new();
    for (mode, plain) in [("mutual TLS", false), ("plain TCP", true)] {
        let prefix = format!("sb{}{}", std::process::id() % 100_000, if plain { "p" } else { "t" });
        let opts = run::UpOptions { plain_control: plain, ..run::UpOptions::new(&prefix, Some(bins.dir())) };
        let started = std::time::Instant::now();
        let result = run::up(&lab, &opts).and_then(|st| {
            let ready = started.elapsed();
            measure(&lab, &st, &bins, runs, !plain).map(|m| (ready, m))
        });
        let down = run::down(&prefix);
        let (ready, by_kind) = result?;
        down?;
        println!(
            "time to first frame of {STREAM:?}, lab {}, control plane over {mode}, one viewer at a time (ms; median, min-max)",
            lab_file.display()
        );
        println!(
            "  lab up to overlay ready (network, certificates, roles, registration): {:.0} ms",
            ready.as_secs_f64() * 1e3
        );
        let mut m = BTreeMap::new();
        for (kind, starts) in &by_kind {
            print_kind(kind, starts);
            m.insert(*kind, median(starts.iter().map(|s| s.first_frame_ms)));
        }
        medians.push(m);
    }
    println!("TLS against plain TCP, median first frame from the client's start (same run):");
    for (kind, tls) in &medians[0] {
        if let Some(plain) = medians[1].get(kind) {
            println!("  {:24} {tls:.0} ms / {plain:.0} ms = {:.2}x", &kind[2..], tls / plain);
        }
    }
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the cold starts, then the warm ones beside a background viewer.
fn measure(
    lab: &Lab,
    st: &LabState,
    bins: &Bins,
    runs: usize,
    rtsp: bool,
) -> Result<BTreeMap<&'static str, Vec<Start>>> {
    let hosts: Vec<String> =
        lab.roles.iter().filter(|r| r.kind == RoleKind::Client).map(|r| lab.hosts[r.host].name.clone()).collect();
    anyhow::ensure!(!hosts.is_empty(), "the lab has no client host");
    // The POP on each client's LAN, for the RTSP player.
    let local_pop: BTreeMap<String, String> = lab
        .roles
        .iter()
        .filter(|r| rtsp && r.kind == RoleKind::Client)
        .filter_map(|r| lab.local_pop(r.host).map(|a| (lab.hosts[r.host].name.clone(), a.to_string())))
        .collect();
    let dir = st.dir().join("startbench");
    let mut by_kind: BTreeMap<&'static str, Vec<Start>> = BTreeMap::new();
    let mut n = 0;
    for _ in 0..runs {
        for host in &hosts {
            n += 1;
            let start = watch(st, bins, host, &dir.join(format!("cold-{n}")))?;
            by_kind.entry("1 cold").or_default().push(start);
            netlab::sys::sleep(PRUNE_PAUSE)?;
            if let Some(pop) = local_pop.get(host) {
                let start = watch_rtsp(st, bins, host, pop, false)?;
                by_kind.entry("4 RTSP cold (UDP)").or_default().push(start);
                netlab::sys::sleep(PRUNE_PAUSE)?;
                if netlab::browser::chromium().is_some() {
                    let start = watch_browser(st, host, pop, &dir.join(format!("browser-cold-{n}")))?;
                    by_kind.entry("9 WebRTC cold (browser)").or_default().push(start);
                    netlab::sys::sleep(PRUNE_PAUSE)?;
                }
            }
        }
    }
    let background_host = &hosts[0];
    let background = ClientRun {
        host: background_host.clone(),
        stream: STREAM.into(),
        duration_s: None,
        headless: true,
        stats: dir.join("background.json"),
        log: Some(dir.join("background.log")),
    };
    let mut background_child = Background(run::start_client(st, bins, &background)?);
    netlab::sys::sleep(Duration::from_secs(3))?;
    let mut warm = Vec::new();
    let mut warm_rtsp = Vec::new();
    let mut warm_browser = Vec::new();
    for _ in 0..runs {
        for host in &hosts {
            n += 1;
            warm.push(watch(st, bins, host, &dir.join(format!("warm-{n}")))?);
            netlab::sys::sleep(PRUNE_PAUSE)?;
            if let Some(pop) = local_pop.get(host) {
                for tcp in [false, true] {
                    warm_rtsp.push((tcp, watch_rtsp(st, bins, host, pop, tcp)?));
                    netlab::sys::sleep(PRUNE_PAUSE)?;
                }
                if netlab::browser::chromium().is_some() {
                    warm_browser.push(watch_browser(st, host, pop, &dir.join(format!("browser-warm-{n}")))?);
                    netlab::sys::sleep(PRUNE_PAUSE)?;
                }
            }
        }
    }
    background_child.stop();
    // The background viewer's POP, from the stats it wrote on stopping.
    let text = std::fs::read_to_string(&background.stats).context("the background viewer wrote no stats")?;
    let background_pop = serde_json::from_str::<Value>(&text)?["pop_name"].as_str().unwrap_or_default().to_string();
    for start in warm {
        let kind = if start.pop == background_pop { "2 warm at the POP" } else { "3 warm in the overlay" };
        by_kind.entry(kind).or_default().push(start);
    }
    // RTSP starts name their POP by address: the same POP may have several.
    let pop_of = |addr: &str| {
        lab.roles
            .iter()
            .find(|r| {
                r.kind == RoleKind::Pop && lab.hosts[r.host].ifaces.iter().any(|i| i.addr.addr.to_string() == addr)
            })
            .map(|r| r.name.clone())
            .unwrap_or_default()
    };
    for (tcp, start) in warm_rtsp {
        let kind = match (pop_of(&start.pop) == background_pop, tcp) {
            (true, false) => "5 RTSP warm at the POP (UDP)",
            (true, true) => "6 RTSP warm at the POP (TCP)",
            (false, false) => "7 RTSP warm in the overlay (UDP)",
            (false, true) => "8 RTSP warm in the overlay (TCP)",
        };
        by_kind.entry(kind).or_default().push(start);
    }
    for start in warm_browser {
        // Only warm at the POP is a figure of its own; the rest are cold
        // at the POP but warm in the overlay.
        let kind = if pop_of(&start.pop) == background_pop {
            "A WebRTC warm at the POP (browser)"
        } else {
            "B WebRTC warm in the overlay (browser)"
        };
        by_kind.entry(kind).or_default().push(start);
    }
    Ok(by_kind)
}

/// A browser on `host` opens the player page of `pop`; its first frame,
/// counted by the page from the start of its WHEP request (the browser's
/// own start-up is not counted).
fn watch_browser(st: &LabState, host: &str, pop: &str, base: &Path) -> Result<Start> {
    let ns = netlab::plan::ns_name(&st.prefix, host);
    let url = format!("http://{pop}:8889/{STREAM}");
    let mut b = netlab::browser::Browser::open(Some(&ns), &url, &base.join("profile"), &base.with_extension("log"))?;
    let started = std::time::Instant::now();
    let ms = loop {
        let r: Value = b
            .eval("JSON.stringify(report)")
            .ok()
            .and_then(|v| v.as_str().and_then(|t| serde_json::from_str(t).ok()))
            .unwrap_or(Value::Null);
        if let Some(ms) = r["first_frame_ms"].as_f64() {
            break ms;
        }
        if started.elapsed() > Duration::from_secs(15) {
            eprintln!("browser on {host} for {url}: no frame in 15 s ({r})");
            break f64::NAN;
        }
        netlab::sys::sleep(Duration::from_millis(100))?;
    };
    b.close();
    let _ = std::fs::remove_dir_all(base.join("profile"));
    Ok(Start::player(host, pop, ms))
}

/// An RTSP player (rtspwatch: GStreamer's rtspsrc) on `host` watches
/// rtsp://POP:8554/test for a few seconds; its first frame, counted from
/// before its first request (the request and the client's start are one).
fn watch_rtsp(st: &LabState, bins: &Bins, host: &str, pop: &str, tcp: bool) -> Result<Start> {
    let tool = bins.oclient.with_file_name("rtspwatch");
    anyhow::ensure!(tool.is_file(), "no rtspwatch binary at {} (cargo build --workspace)", tool.display());
    let url = format!("rtsp://{pop}:8554/{STREAM}");
    let ns = netlab::plan::ns_name(&st.prefix, host);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns]).arg(&tool).arg(&url).args(["--duration", &WATCH_S.to_string()]);
    if tcp {
        cmd.arg("--tcp");
    }
    let out = cmd.output().with_context(|| format!("starting rtspwatch in {ns}"))?;
    let s: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("rtspwatch on {host} for {url} printed no report: {}", String::from_utf8_lossy(&out.stderr))
    })?;
    let ms = s["first_frame_ms"].as_f64().unwrap_or(f64::NAN);
    if !ms.is_finite() {
        eprintln!("rtspwatch on {host} for {url}: no frame ({})", s["error"]);
    }
    Ok(Start::player(host, pop, ms))
}

/// A viewer that runs until stopped.
struct Background(Child);

impl Background {
    /// SIGTERM, so that the client tears its session down.
    fn stop(&mut self) {
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// One viewer on `host` watches for a few seconds; its start-up figures.
fn watch(st: &LabState, bins: &Bins, host: &str, base: &Path) -> Result<Start> {
    let c = ClientRun {
        host: host.to_string(),
        stream: STREAM.into(),
        duration_s: Some(WATCH_S),
        headless: true,
        stats: base.with_extension("json"),
        log: Some(base.with_extension("log")),
    };
    let status = run::start_client(st, bins, &c)?.wait()?;
    let text = std::fs::read_to_string(&c.stats).with_context(|| {
        format!("client on {host} wrote no stats ({status}): {}", run::log_tail(&base.with_extension("log"), 5))
    })?;
    let s: Value = serde_json::from_str(&text)?;
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let startup = &s["startup"];
    Ok(Start {
        host: host.to_string(),
        pop: s["pop_name"].as_str().unwrap_or_default().to_string(),
        first_frame_ms: f(&s["first_frame_ms"]),
        from_request_ms: f(&s["request_to_first_frame_ms"]),
        login_ms: f(&startup["login_ms"]),
        pop_choice_ms: f(&startup["pop_chosen_ms"]) - f(&startup["login_ms"]),
        setup_ms: f(&startup["setup_ms"]) - f(&startup["pop_chosen_ms"]),
    })
}

fn print_kind(kind: &str, starts: &[Start]) {
    let stat = |pick: fn(&Start) -> f64| {
        let mut v: Vec<f64> = starts.iter().map(pick).filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => "-".to_string(),
            n => format!("{:.0} ({:.0}-{:.0})", v[n / 2], v[0], v[n - 1]),
        }
    };
    let hosts: Vec<String> = starts.iter().map(|s| format!("{}@{}", s.host, s.pop)).collect();
    println!("  {:24} {} starts: {}", &kind[2..], starts.len(), hosts.join(" "));
    if kind.contains("RTSP") || kind.contains("WebRTC") {
        println!("      first frame from the player's first request {}", stat(|s| s.first_frame_ms));
        return;
    }
    println!("      first frame from the client's start   {}", stat(|s| s.first_frame_ms));
    println!("      first frame from the request at the POP {}", stat(|s| s.from_request_ms));
    if kind.contains("RTSP") {
        return;
    }
    println!(
        "      phases: LOGIN {}, POP choice {}, CONNECT_POP+SETUP {}",
        stat(|s| s.login_ms),
        stat(|s| s.pop_choice_ms),
        stat(|s| s.setup_ms)
    );
}
