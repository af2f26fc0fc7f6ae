//! Bringing a lab up (network, then roles in dependency order) and down,
//! and the commands that act on a running lab: status, exec, client.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::{Impairment, Lab, Role, RoleKind};
use crate::plan::{self, ns_name};
use crate::state::{self, Emulator, LabState, Phase, Process};
use crate::sys;

/// The product binaries a lab runs.
#[derive(Debug, Clone)]
pub struct Bins {
    pub onode: PathBuf,
    pub oclient: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, or in the first usual place that has `onode`:
    /// $NETLAB_BIN_DIR, this program's folder, the workspace's
    /// target/debug and target/release.
    pub fn find(dir: Option<&Path>) -> Result<Bins> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(d) = dir {
            candidates.push(d.to_path_buf());
        } else {
            if let Some(d) = std::env::var_os("NETLAB_BIN_DIR") {
                candidates.push(PathBuf::from(d));
            }
            if let Ok(exe) = std::env::current_exe() {
                if let Some(d) = exe.parent() {
                    candidates.push(d.to_path_buf());
                    if let Some(up) = d.parent() {
                        candidates.push(up.to_path_buf()); // tests run from target/*/deps
                    }
                }
            }
            let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            candidates.push(ws.join("target/debug"));
            candidates.push(ws.join("target/release"));
        }
        for d in &candidates {
            if d.join("onode").is_file() {
                let d = d.canonicalize().unwrap_or_else(|_| d.clone());
                return Ok(Bins { onode: d.join("onode"), oclient: d.join("oclient") });
            }
        }
        bail!(
            "no onode binary in {} (build it with `cargo build`, or give --bin-dir)",
            candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    }

    pub fn dir(&self) -> PathBuf {
        self.onode.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// The linkem binary: $NETLAB_LINKEM, or `linkem` in `dir`, next to this
/// program (or one folder up, for tests), in the workspace's target/debug
/// or target/release.
pub fn find_linkem(dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NETLAB_LINKEM") {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = dir.map(Path::to_path_buf).into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.parent() {
            candidates.push(d.to_path_buf());
            if let Some(up) = d.parent() {
                candidates.push(up.to_path_buf());
            }
        }
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    candidates.push(ws.join("target/debug"));
    candidates.push(ws.join("target/release"));
    for d in &candidates {
        let p = d.join("linkem");
        if p.is_file() {
            return Ok(p.canonicalize().unwrap_or(p));
        }
    }
    bail!(
        "the lab has impaired links, but there is no linkem binary in {} (build it with `cargo build -p linkem`, or set NETLAB_LINKEM)",
        candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// What `up` should do besides building the network.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub prefix: String,
    /// Where onode and oclient are; `None`: look in the usual places.
    pub bin_dir: Option<PathBuf>,
    /// Given to every server as `--media`.
    pub media_dir: Option<PathBuf>,
    /// Build the network only; start no role.
    pub network_only: bool,
    /// How long to wait for the overlay to say it is ready.
    pub ready_timeout: Duration,
    /// Run the control plane over plain TCP, nobody authenticated (to
    /// measure what TLS costs); by default it is mutual TLS.
    pub plain_control: bool,
}

impl UpOptions {
    /// A whole lab (network and roles) under `prefix` with the binaries in
    /// `bin_dir`: no media folder, TLS on, a minute to get ready.
    pub fn new(prefix: &str, bin_dir: Option<PathBuf>) -> UpOptions {
        UpOptions {
            prefix: prefix.to_string(),
            bin_dir,
            media_dir: None,
            network_only: false,
            ready_timeout: Duration::from_secs(60),
            plain_control: false,
        }
    }
}

/// Builds the lab's network and starts its roles. On error the lab is left
/// as it is (the caller tears it down); the state file always tells what
/// exists.
pub fn up(lab: &Lab, opts: &UpOptions) -> Result<LabState> {
    if !sys::is_root() {
        bail!("netlab needs root (network namespaces, veths, nftables)");
    }
    plan::check_prefix(&opts.prefix).map_err(|e| anyhow!(e))?;
    let existing = sys::lab_namespaces(&opts.prefix)?;
    if !existing.is_empty() {
        bail!(
            "lab {} exists already ({} namespaces, like {}): run `netlab down --prefix {}` first",
            opts.prefix,
            existing.len(),
            existing[0],
            opts.prefix
        );
    }
    let bins =
        if opts.network_only || lab.roles.is_empty() { None } else { Some(Bins::find(opts.bin_dir.as_deref())?) };
    let emulators = plan::emulators(lab, &opts.prefix, &state::lab_dir(&opts.prefix));
    let linkem = if emulators.is_empty() { None } else { Some(find_linkem(opts.bin_dir.as_deref())?) };
    let namespaces = plan::namespaces(lab, &opts.prefix);
    let mut st = LabState::new(&opts.prefix, lab, namespaces);
    st.bin_dir = bins.as_ref().map(Bins::dir);
    st.media_dir = opts.media_dir.clone();
    std::fs::create_dir_all(st.dir().join("logs"))?;
    std::fs::create_dir_all(st.dir().join("links"))?;
    st.save()?;

    let steps = plan::build(lab, &opts.prefix);
    let started = Instant::now();
    for step in &steps {
        sys::check_interrupt()?;
        sys::run_step(step)?;
    }
    eprintln!(
        "netlab: lab {}: network up ({} namespaces, {} steps, {:.1} s)",
        opts.prefix,
        st.namespaces.len(),
        steps.len(),
        started.elapsed().as_secs_f64()
    );
    for w in &lab.warnings {
        eprintln!("netlab: warning: {w}");
    }
    if let Some(linkem) = &linkem {
        start_emulators(&mut st, linkem, &emulators)?;
    }
    st.phase = Phase::Network;
    st.save()?;
    let Some(bins) = bins else {
        return Ok(st);
    };
    if opts.plain_control {
        // Nothing of another lab's TLS folder may leak into this one.
        std::env::remove_var("OVERLAY_TLS_DIR");
        eprintln!("netlab: lab {}: control plane over plain TCP, nobody authenticated", opts.prefix);
    } else {
        issue_certificates(lab, &st, &bins)?;
    }
    start_roles(lab, &mut st, &bins, opts)?;
    Ok(st)
}

/// The lab's control plane runs over TLS: a CA of its own and a
/// certificate for every node and for the operator, made with `onode
/// certs` in the lab's folder. Every process netlab starts (nodes, clients,
/// the tools) finds the folder in `OVERLAY_TLS_DIR`.
fn issue_certificates(lab: &Lab, st: &LabState, bins: &Bins) -> Result<()> {
    let Some(topology) = &lab.overlay_path else { return Ok(()) };
    let dir = tls_dir(&st.prefix);
    let topology = topology.display().to_string();
    let out = sys::output(
        &[
            &bins.onode.display().to_string(),
            "certs",
            "--topology",
            &topology,
            "--out",
            &dir.display().to_string(),
            "--new-ca",
        ],
        None,
    )
    .context("onode certs")?;
    eprintln!("netlab: lab {}: {}", st.prefix, out.trim());
    use_tls_dir(&st.prefix);
    Ok(())
}

/// The TLS folder of lab `prefix`.
pub fn tls_dir(prefix: &str) -> PathBuf {
    state::lab_dir(prefix).join("tls")
}

/// Points this process and its children at the lab's TLS folder, when the
/// lab has one.
pub fn use_tls_dir(prefix: &str) {
    let dir = tls_dir(prefix);
    if dir.join("ca.pem").exists() {
        std::env::set_var("OVERLAY_TLS_DIR", &dir);
    }
}

/// The command line of an overlay role.
pub fn role_argv(lab: &Lab, role: &Role, bins: &Bins, media: Option<&Path>) -> Vec<String> {
    let mut argv = vec![bins.onode.display().to_string()];
    let bootstrap = lab.bootstrap.map(|b| format!("{b}:{}", lab.spec.control_port)).unwrap_or_default();
    match role.kind {
        RoleKind::Bootstrapper => {
            argv.push("server".into());
            argv.push("--topology".into());
            argv.push(lab.overlay_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
        }
        RoleKind::Server => {
            argv.extend(["server".into(), "--bootstrap".into(), bootstrap]);
        }
        RoleKind::Node => argv.extend(["node".into(), "--bootstrap".into(), bootstrap]),
        RoleKind::Pop => argv.extend(["pop".into(), "--bootstrap".into(), bootstrap]),
        RoleKind::Client => unreachable!("clients are not overlay roles"),
    }
    argv.push("--name".into());
    argv.push(role.name.clone());
    if role.kind.is_server() {
        if let Some(m) = media {
            argv.push("--media".into());
            argv.push(m.display().to_string());
        }
    }
    if lab.spec.control_port != 7070 {
        argv.push("--control-port".into());
        argv.push(lab.spec.control_port.to_string());
    }
    if lab.spec.data_port != 7071 {
        argv.push("--data-port".into());
        argv.push(lab.spec.data_port.to_string());
    }
    argv.extend(role.args.iter().cloned());
    argv
}

/// Starts `argv` inside namespace `ns` in a session of its own, output to
/// `log`.
pub fn spawn_in(ns: &str, argv: &[String], log: &Path) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; a new session keeps the
    // terminal's Ctrl-C away from the lab's processes (netlab stops them).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {} in {ns}", argv.join(" ")))
}

/// The last lines of a log, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        "(log empty)".into()
    } else {
        tail.iter().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
    }
}

fn died(p: &Process) -> anyhow::Error {
    anyhow!("{} {} on host {} exited; {}:\n{}", p.role, p.name, p.host, p.log.display(), log_tail(&p.log, 8))
}

fn check_alive(st: &LabState) -> Result<()> {
    let pids: Vec<i32> = st.processes.iter().map(|p| p.pid).chain(st.emulators.iter().map(|e| e.pid)).collect();
    sys::reap(&pids);
    if let Some(e) = st.emulators.iter().find(|e| !sys::alive(e.pid)) {
        return Err(anyhow!("the emulator of link {} exited; {}:\n{}", e.link, e.log.display(), log_tail(&e.log, 8)));
    }
    match st.processes.iter().find(|p| !sys::alive(p.pid)) {
        Some(p) => Err(died(p)),
        None => Ok(()),
    }
}

/// Starts one linkem per impaired link, in its link namespace, and waits
/// until each answers on its control socket (so no frame of the roles
/// meets a link that is not bridged yet).
fn start_emulators(st: &mut LabState, linkem: &Path, plans: &[plan::EmulatorPlan]) -> Result<()> {
    let started = Instant::now();
    for p in plans {
        sys::check_interrupt()?;
        let mut argv = vec![linkem.display().to_string()];
        argv.extend(p.args());
        let child = spawn_in(&p.ns, &argv, &p.log)?;
        st.emulators.push(Emulator {
            link: p.link.clone(),
            a: p.a.clone(),
            b: p.b.clone(),
            ns: p.ns.clone(),
            pid: child.id() as i32,
            control: p.control.clone(),
            stats: p.stats.clone(),
            log: p.log.clone(),
            argv,
        });
        st.save()?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for e in &st.emulators {
        while let Err(err) = linkem::control::request(&e.control, &linkem::Request::Stats, Duration::from_secs(1)) {
            sys::check_interrupt()?;
            check_alive(st)?;
            if Instant::now() > deadline {
                bail!(
                    "the emulator of link {} does not answer after 10 s: {err}; {}:\n{}",
                    e.link,
                    e.log.display(),
                    log_tail(&e.log, 8)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "netlab: lab {}: {} link emulators running ({:.1} s)",
        st.prefix,
        st.emulators.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn start_role(lab: &Lab, st: &mut LabState, role: &Role, bins: &Bins) -> Result<()> {
    let host = &lab.hosts[role.host].name;
    let argv = role_argv(lab, role, bins, st.media_dir.as_deref());
    let log = st.dir().join("logs").join(format!("{host}-{}.log", role.kind));
    let child = spawn_in(&ns_name(&st.prefix, host), &argv, &log)?;
    st.processes.push(Process {
        host: host.clone(),
        role: role.kind,
        name: role.name.clone(),
        pid: child.id() as i32,
        log,
        argv,
    });
    st.save()
}

/// Overlay readiness as `onode overview` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub ready: bool,
    pub registered: Vec<String>,
    pub failed: Vec<String>,
}

impl Overview {
    pub fn parse(text: &str) -> Result<Overview> {
        let v: serde_json::Value = serde_json::from_str(text.trim()).context("onode overview printed no JSON")?;
        let names = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(|a| a.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        Ok(Overview {
            ready: v.get("ready").and_then(|r| r.as_bool()).unwrap_or(false),
            registered: names("registered"),
            failed: names("failed"),
        })
    }
}

/// Asks the bootstrapper for the overview, from inside its namespace.
pub fn overview(st: &LabState, lab: &Lab, bins: &Bins) -> Result<Overview> {
    let boot = lab
        .roles
        .iter()
        .find(|r| r.kind == RoleKind::Bootstrapper)
        .ok_or_else(|| anyhow!("the lab has no bootstrapper"))?;
    let ns = ns_name(&st.prefix, &lab.hosts[boot.host].name);
    let addr = st.bootstrap.clone().unwrap_or_default();
    let onode = bins.onode.display().to_string();
    let out = sys::output(&["ip", "netns", "exec", &ns, &onode, "overview", &addr], None)?;
    Overview::parse(&out)
}

fn start_roles(lab: &Lab, st: &mut LabState, bins: &Bins, opts: &UpOptions) -> Result<()> {
    st.phase = Phase::Starting;
    st.save()?;
    let boot =
        lab.roles.iter().find(|r| r.kind == RoleKind::Bootstrapper).expect("a lab with roles has a bootstrapper");
    start_role(lab, st, boot, bins)?;

    // Wait until the bootstrapper accepts connections on its control port.
    let boot_ns = ns_name(&st.prefix, &lab.hosts[boot.host].name);
    let addr: SocketAddr = st.bootstrap.as_deref().unwrap_or_default().parse().context("bootstrap address")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sys::check_interrupt()?;
        check_alive(st)?;
        let listening =
            sys::in_netns(&boot_ns, move || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())?;
        if listening {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the bootstrapper does not listen on {addr} after 20 s; {}:\n{}",
                st.processes[0].log.display(),
                log_tail(&st.processes[0].log, 8)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("netlab: bootstrapper {} listens on {addr}", boot.name);

    // Then every other overlay node: servers, relays, POPs.
    for kind in [RoleKind::Server, RoleKind::Node, RoleKind::Pop] {
        for role in lab.roles.iter().filter(|r| r.kind == kind) {
            sys::check_interrupt()?;
            start_role(lab, st, role, bins)?;
        }
    }

    // Wait for the overlay to be ready.
    let deadline = Instant::now() + opts.ready_timeout;
    let mut last = Overview::default();
    let mut last_err = None;
    loop {
        sys::check_interrupt()?;
        check_alive(st)?;
        match overview(st, lab, bins) {
            Ok(o) if o.ready => break,
            Ok(o) => last = o,
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            let declared: Vec<String> =
                lab.roles.iter().filter(|r| r.kind.is_overlay_node()).map(|r| r.name.clone()).collect();
            let missing: Vec<&String> = declared.iter().filter(|n| !last.registered.contains(n)).collect();
            let mut msg = format!(
                "the overlay is not ready after {} s: registered [{}], failed [{}], missing [{}]",
                opts.ready_timeout.as_secs(),
                last.registered.join(", "),
                last.failed.join(", "),
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
            if let Some(e) = last_err {
                let _ = write!(msg, "; last overview error: {e:#}");
            }
            for p in st.processes.iter().filter(|p| missing.contains(&&p.name)) {
                let _ = write!(msg, "\n  {} ({}):\n{}", p.name, p.log.display(), log_tail(&p.log, 4));
            }
            bail!(msg);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    st.phase = Phase::Ready;
    st.save()?;
    eprintln!("netlab: lab {}: overlay ready ({} roles)", st.prefix, st.processes.len());
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    pub processes: usize,
    pub namespaces: usize,
    pub leftovers: usize,
}

/// Stops every process in the lab's namespaces, deletes the namespaces and
/// any root-namespace interface named after the prefix. Needs only the
/// prefix; safe to run twice.
pub fn down(prefix: &str) -> Result<DownReport> {
    plan::check_prefix(prefix).map_err(|e| anyhow!(e))?;
    let mut namespaces = sys::lab_namespaces(prefix)?;
    let recorded = LabState::load(prefix).ok();
    // The lab's CA key and certificates go with it.
    let _ = std::fs::remove_dir_all(tls_dir(prefix));
    if let Some(st) = &recorded {
        for ns in &st.namespaces {
            if !namespaces.contains(ns) && Path::new("/run/netns").join(ns).exists() {
                namespaces.push(ns.clone());
            }
        }
    }
    let mut pids: Vec<i32> = namespaces.iter().flat_map(|ns| sys::ns_pids(ns)).collect();
    if let Some(st) = &recorded {
        // Processes of the lab that live on after their namespace was
        // deleted by hand: only those whose command line still matches and
        // that are in a network namespace other than ours (a recycled pid
        // of another program is left alone).
        let root_ns = std::fs::read_link("/proc/self/ns/net").ok();
        let recorded =
            st.processes.iter().map(|p| (p.pid, &p.argv)).chain(st.emulators.iter().map(|e| (e.pid, &e.argv)));
        for (pid, argv) in recorded {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            if argv.first().is_some_and(|a| a.as_bytes() == first)
                && ns.is_some()
                && ns != root_ns
                && !pids.contains(&pid)
            {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let mut report = DownReport { processes: sys::stop_processes(&pids, Duration::from_secs(5)), ..Default::default() };
    for ns in &namespaces {
        match sys::output(&["ip", "netns", "del", ns], None) {
            Ok(_) => report.namespaces += 1,
            Err(e) if Path::new("/run/netns").join(ns).exists() => return Err(e),
            Err(_) => {}
        }
    }
    // The lab creates nothing in the root namespace, but a lab from a
    // crashed or older netlab might have.
    let head = format!("{prefix}-");
    let links = sys::output(&["ip", "-o", "link", "show"], None).unwrap_or_default();
    for line in links.lines() {
        let name =
            line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string()).unwrap_or_default();
        if name.starts_with(&head) && sys::output(&["ip", "link", "del", &name], None).is_ok() {
            report.leftovers += 1;
        }
    }
    LabState::forget(prefix);
    Ok(report)
}

/// A human-readable status of lab `prefix`.
pub fn status(prefix: &str) -> Result<String> {
    let st = LabState::load(prefix)?;
    let lab = st.lab()?;
    let present = sys::lab_namespaces(prefix)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lab {} ({}), phase {:?}, folder {}",
        st.prefix,
        st.lab_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        st.phase,
        st.dir().display()
    );
    if !st.spec.description.is_empty() {
        let _ = writeln!(out, "  {}", st.spec.description);
    }
    let _ = writeln!(
        out,
        "namespaces: {} of {} present",
        st.namespaces.iter().filter(|n| present.contains(n)).count(),
        st.namespaces.len()
    );
    let _ = writeln!(
        out,
        "{:<6} {:<7} {:<14} {:<16} {:>7} {:<8} addresses",
        "host", "kind", "namespace", "role", "pid", "state"
    );
    for h in &lab.hosts {
        let ns = ns_name(prefix, &h.name);
        let addrs: Vec<String> = h.ifaces.iter().map(|i| i.addr.to_string()).collect();
        let procs: Vec<&Process> = st.processes.iter().filter(|p| p.host == h.name).collect();
        let kind = format!("{:?}", h.kind).to_lowercase();
        let ns_shown = if present.contains(&ns) { ns.clone() } else { format!("{ns} (gone)") };
        let rows: Vec<(String, String, String)> = if procs.is_empty() {
            vec![("-".into(), "-".into(), "-".into())]
        } else {
            procs
                .iter()
                .map(|p| {
                    (
                        format!("{} {}", p.role, p.name),
                        p.pid.to_string(),
                        if sys::alive(p.pid) { "running" } else { "exited" }.to_string(),
                    )
                })
                .collect()
        };
        for (role, pid, state) in rows {
            let _ = writeln!(
                out,
                "{:<6} {:<7} {:<14} {:<16} {:>7} {:<8} {}",
                h.name,
                kind,
                ns_shown,
                role,
                pid,
                state,
                addrs.join(" ")
            );
        }
    }
    if let Some(b) = &st.bootstrap {
        let _ = writeln!(out, "bootstrap: {b}");
    }
    if st.phase == Phase::Ready {
        if let Some(bins) = st.bin_dir.as_deref().and_then(|d| Bins::find(Some(d)).ok()) {
            match overview(&st, &lab, &bins) {
                Ok(o) => {
                    let _ = writeln!(
                        out,
                        "overlay: ready={} registered=[{}] failed=[{}]",
                        o.ready,
                        o.registered.join(", "),
                        o.failed.join(", ")
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "overlay: overview failed: {e:#}");
                }
            }
        }
    }
    if !st.emulators.is_empty() {
        let _ = write!(out, "{}", emulator_table(&st));
    }
    let _ = writeln!(out, "logs: {}", st.dir().join("logs").display());
    Ok(out)
}

/// A running emulator's snapshot: live from its control socket, else its
/// last stats file.
pub fn emulator_stats(e: &Emulator) -> Result<linkem::Snapshot> {
    match linkem::control::request(&e.control, &linkem::Request::Stats, Duration::from_secs(2)) {
        Ok(s) => Ok(s),
        Err(live) => linkem::control::read_stats_file(&e.stats)
            .with_context(|| format!("link {}: {live}; no stats file either", e.link)),
    }
}

/// Per emulated link and direction: settings and counters.
pub fn emulator_table(st: &LabState) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "link emulators (linkem; packets in, out, lost, queue drops, queued now):\n{:<16} {:<7} {:>9} {:>9} {:>7} {:>7} {:>6}  settings",
        "link", "pid", "in", "out", "lost", "qdrop", "queued"
    );
    for e in &st.emulators {
        match emulator_stats(e) {
            Ok(s) => {
                for (dir, d) in [(format!("{}>{}", e.a, e.b), &s.a2b), (format!("{}>{}", e.b, e.a), &s.b2a)] {
                    let _ = writeln!(
                        out,
                        "{:<16} {:<7} {:>9} {:>9} {:>7} {:>7} {:>6}  {}",
                        dir,
                        if sys::alive(e.pid) { e.pid.to_string() } else { "exited".into() },
                        d.packets,
                        d.sent_packets,
                        d.dropped_loss,
                        d.dropped_queue + d.dropped_kernel,
                        d.queued_packets,
                        linkem::driver::describe(&d.settings)
                    );
                }
            }
            Err(err) => {
                let _ = writeln!(out, "{:<16} {:<7} {err:#}", e.link, e.pid);
            }
        }
    }
    out
}

/// Changes an emulated link's settings while the lab runs: `link` is
/// `a-b` in either order, `from` limits the change to what that host
/// sends. Records the new settings in the state file and returns the
/// link's snapshot.
pub fn link_set(prefix: &str, link: &str, from: Option<&str>, change: &Impairment) -> Result<linkem::Snapshot> {
    let mut st = LabState::load(prefix)?;
    let (x, y) = link.split_once('-').ok_or_else(|| anyhow!("link {link:?}: give it as HOST-HOST, like o3-o4"))?;
    let e = st
        .emulators
        .iter()
        .find(|e| (e.a == x && e.b == y) || (e.a == y && e.b == x))
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = st.emulators.iter().map(|e| e.link.as_str()).collect();
            anyhow!(
                "lab {prefix} has no emulated link {link} (emulated: {}); a link gets an emulator when the lab file gives it an impairment (even {{\"delay_ms\": 0}})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )
        })?;
    let dir = match from {
        None => linkem::Dir::Both,
        Some(h) if h == e.a => linkem::Dir::A2b,
        Some(h) if h == e.b => linkem::Dir::B2a,
        Some(h) => bail!("link {}: host {h} is not one of its ends", e.link),
    };
    let update = change.to_update();
    if update.is_empty() {
        bail!("nothing to change: give --delay-ms, --jitter-ms, --loss-pct, --rate-kbit, --queue-ms or --reorder");
    }
    let snap = linkem::control::request(&e.control, &linkem::Request::Set { dir, update }, Duration::from_secs(3))
        .with_context(|| format!("link {}", e.link))?;
    // Keep the state's lab in step, so later commands see the new delays.
    if let Some(l) = st.spec.links.iter_mut().find(|l| l.a.host == e.a && l.b.host == e.b) {
        for (end, chosen) in [(&mut l.a, dir.includes(true)), (&mut l.b, dir.includes(false))] {
            if chosen {
                end.impair_out = change.over(&end.impair_out);
            }
        }
    }
    st.save()?;
    Ok(snap)
}

/// Runs a command inside a host's namespace, attached to this terminal.
pub fn exec(prefix: &str, host: &str, cmd: &[String]) -> Result<ExitStatus> {
    let ns = ns_name(prefix, host);
    if !Path::new("/run/netns").join(&ns).exists() {
        let hosts = LabState::load(prefix)
            .ok()
            .map(|s| s.spec.hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        bail!("lab {prefix} has no host {host} (hosts: {hosts})");
    }
    if cmd.is_empty() {
        bail!("no command given");
    }
    Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(cmd)
        .status()
        .with_context(|| format!("running {} in {ns}", cmd.join(" ")))
}

/// A client run: what to watch and where its files go.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub host: String,
    pub stream: String,
    pub duration_s: Option<f64>,
    pub headless: bool,
    pub stats: PathBuf,
    /// `None`: attached to this terminal.
    pub log: Option<PathBuf>,
}

/// The oclient command line of a client run.
pub fn client_argv(st: &LabState, bins: &Bins, c: &ClientRun) -> Result<Vec<String>> {
    let boot = st.bootstrap.clone().ok_or_else(|| anyhow!("lab {} has no bootstrapper", st.prefix))?;
    let mut argv = vec![bins.oclient.display().to_string(), "--bootstrap".into(), boot, c.stream.clone()];
    if c.headless {
        argv.push("--headless".into());
    }
    if let Some(d) = c.duration_s {
        argv.push("--duration".into());
        argv.push(format!("{d}"));
    }
    argv.push("--stats-json".into());
    argv.push(c.stats.display().to_string());
    Ok(argv)
}

/// Starts a client in its host's namespace.
pub fn start_client(st: &LabState, bins: &Bins, c: &ClientRun) -> Result<Child> {
    let ns = ns_name(&st.prefix, &c.host);
    if !Path::new("/run/netns").join(&ns).exists() {
        bail!("lab {} has no host {}", st.prefix, c.host);
    }
    if !bins.oclient.is_file() {
        bail!("no oclient binary at {}", bins.oclient.display());
    }
    let argv = client_argv(st, bins, c)?;
    if let Some(parent) = c.stats.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match &c.log {
        Some(log) => spawn_in(&ns, &argv, log),
        None => Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&argv)
            .spawn()
            .with_context(|| format!("starting oclient in {ns}")),
    }
}

/// The binaries recorded for a running lab (or found in the usual places).
pub fn lab_bins(st: &LabState, given: Option<&Path>) -> Result<Bins> {
    Bins::find(given.or(st.bin_dir.as_deref()))
}

/// Picks the prefix of the lab a command acts on.
pub fn pick_prefix(given: Option<&str>) -> Result<String> {
    state::resolve_prefix(given)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overview_parses() {
        let o = Overview::parse(r#"{"ready": false, "registered": ["s1", "o2"], "failed": []}"#).unwrap();
        assert!(!o.ready);
        assert_eq!(o.registered, ["s1", "o2"]);
        assert!(Overview::parse("error").is_err());
    }

    #[test]
    fn role_command_lines() {
        let lab = crate::lab::shipped("seed.json");
        let bins = Bins { onode: "/b/onode".into(), oclient: "/b/oclient".into() };
        let boot = &lab.roles[0];
        let argv = role_argv(&lab, boot, &bins, Some(Path::new("/m")));
        assert_eq!(argv[..3], ["/b/onode", "server", "--topology"]);
        assert!(argv[3].ends_with("seed-overlay.json"));
        assert_eq!(argv[4..], ["--name", "s1", "--media", "/m"]);
        let pop = lab.roles.iter().find(|r| r.name == "o6").unwrap();
        assert_eq!(
            role_argv(&lab, pop, &bins, Some(Path::new("/m"))).join(" "),
            "/b/onode pop --bootstrap 10.0.25.10:7070 --name o6"
        );
    }
}
