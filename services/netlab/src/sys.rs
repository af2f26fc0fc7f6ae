//! The side effects: running ip/tc/nft, entering namespaces, finding and
//! signalling the processes inside them, and the Ctrl-C flag.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::plan::Step;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag that long operations poll, so they
/// stop and tear the lab down instead of dying half-way.
pub fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails when interrupted; call between steps.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early (with an error) on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// Runs a command, returning its stdout; the error carries its stderr.
pub fn output(argv: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", argv[0]))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).with_context(|| format!("writing to {}", argv[0]))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", argv.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Carries out one build step.
pub fn run_step(step: &Step) -> Result<()> {
    let res = match step {
        Step::Run { argv, .. } => {
            let v: Vec<&str> = argv.iter().map(String::as_str).collect();
            output(&v, None).map(|_| ())
        }
        Step::IpBatch { ns, lines, .. } => {
            let input = lines.join("\n") + "\n";
            output(&["ip", "-n", ns, "-batch", "-"], Some(&input))
                .map_err(|e| {
                    // ip names the failing line as "-:N".
                    let msg = e.to_string();
                    let line = msg
                        .split("-:")
                        .nth(1)
                        .and_then(|s| {
                            s.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<usize>().ok()
                        })
                        .and_then(|n| lines.get(n.wrapping_sub(1)));
                    match line {
                        Some(l) => anyhow!("{msg} (line: {l})"),
                        None => e,
                    }
                })
                .map(|_| ())
        }
        Step::Nft { ns, script, .. } => {
            output(&["ip", "netns", "exec", ns, "nft", "-f", "-"], Some(script)).map(|_| ())
        }
        Step::Offloads { ns, ifaces, .. } => {
            let ifaces = ifaces.clone();
            in_netns(ns, move || ifaces.iter().try_for_each(|i| linkem::offload::disable(i)))
                .and_then(|r| r.map_err(anyhow::Error::from))
        }
    };
    res.with_context(|| step.what().to_string())
}

/// Names of all network namespaces.
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = output(&["ip", "netns", "list"], None)?;
    Ok(out.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect())
}

/// Namespaces whose names start with `<prefix>-`.
pub fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    let head = format!("{prefix}-");
    Ok(list_namespaces()?.into_iter().filter(|n| n.starts_with(&head)).collect())
}

/// Processes inside a namespace.
pub fn ns_pids(ns: &str) -> Vec<i32> {
    output(&["ip", "netns", "pids", ns], None)
        .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z') | None)
        }
        Err(_) => false,
    }
}

/// Sends a signal; a process that is gone already is not an error.
pub fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGTERM, then SIGKILL what is left after `grace`. Returns how many
/// processes were signalled.
pub fn stop_processes(pids: &[i32], grace: Duration) -> usize {
    let live: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &live {
        signal(*p, libc::SIGTERM);
    }
    let end = Instant::now() + grace;
    while Instant::now() < end && live.iter().any(|p| alive(*p)) {
        reap(&live);
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in live.iter().filter(|p| alive(**p)) {
        signal(*p, libc::SIGKILL);
    }
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end && live.iter().any(|p| alive(*p)) {
        reap(&live);
        std::thread::sleep(Duration::from_millis(20));
    }
    live.len()
}

/// Collects those of `pids` that are exited children of this process, so
/// they do not linger as zombies (others are left to their parents).
pub fn reap(pids: &[i32]) {
    for &pid in pids {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on one pid; status is a valid out
        // pointer. It fails harmlessly for a pid that is not our child.
        unsafe {
            libc::waitpid(pid, &mut status, libc::WNOHANG);
        }
    }
}

/// Runs `f` on a fresh thread that has joined namespace `ns`; sockets made
/// there stay in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("namespace {ns} does not exist"))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd affects only this thread,
        // which ends after f.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
        .with_context(|| format!("entering namespace {ns}"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
