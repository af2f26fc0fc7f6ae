//! A throwaway test bed for the emulator: namespaces `<tag>-a` and
//! `<tag>-b` with one address each on one subnet, joined through
//! `<tag>-l`, where a linkem process bridges them. The tests and the bench
//! use it; it needs root. Dropping it stops linkem and deletes the
//! namespaces, also when a test panics.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::control::{self, Dir, Request, Snapshot};
use crate::schedule::Update;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A namespace prefix no other test bed uses: `lk` and six hex digits.
pub fn unique_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
    let x = std::process::id().wrapping_mul(2_654_435_761)
        ^ nanos.unwrap_or(0)
        ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9);
    format!("lk{:06x}", x & 0xFF_FFFF)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `f` on a thread that has joined namespace `ns`; sockets made there
/// stay in it.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file =
        std::fs::File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("namespace {ns} is missing"))?;
    std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd changes only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
}

/// Starts `f` on a thread that has joined namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let file =
        std::fs::File::open(Path::new("/run/netns").join(ns)).with_context(|| format!("namespace {ns} is missing"))?;
    Ok(std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd changes only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    }))
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", dev]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "link/ether");
    words.next().map(String::from).ok_or_else(|| anyhow!("no MAC address of {dev} in {ns}: {text}"))
}

/// Two hosts and a linkem between them.
pub struct Testbed {
    pub tag: String,
    pub ns_a: String,
    pub ns_link: String,
    pub ns_b: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
    pub control: PathBuf,
    pub stats: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
    made: Vec<String>,
    child: Option<Child>,
}

impl Testbed {
    /// Builds the namespaces and starts `linkem` (the binary) with these
    /// initial settings (`delay_ms=10,loss_pct=1`, see [`Update::parse`]).
    pub fn new(linkem: &Path, a2b: &str, b2a: &str) -> Result<Testbed> {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("linkem-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let mut tb = Testbed {
            ns_a: format!("{tag}-a"),
            ns_link: format!("{tag}-l"),
            ns_b: format!("{tag}-b"),
            addr_a: Ipv4Addr::new(10, 201, 0, 1),
            addr_b: Ipv4Addr::new(10, 201, 0, 2),
            control: dir.join("control.sock"),
            stats: dir.join("stats.json"),
            log: dir.join("linkem.log"),
            dir,
            tag,
            made: Vec::new(),
            child: None,
        };
        for ns in [tb.ns_a.clone(), tb.ns_link.clone(), tb.ns_b.clone()] {
            ip(&["netns", "add", &ns])?;
            tb.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let sysctl = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
                .args(["net.ipv6.conf.default.disable_ipv6=1"])
                .status()?;
            if !sysctl.success() {
                bail!("sysctl in {ns} failed");
            }
        }
        let (na, nl, nb) = (tb.ns_a.clone(), tb.ns_link.clone(), tb.ns_b.clone());
        ip(&["link", "add", "name", "v0", "netns", &na, "type", "veth", "peer", "name", "ea", "netns", &nl])?;
        ip(&["link", "add", "name", "v0", "netns", &nb, "type", "veth", "peer", "name", "eb", "netns", &nl])?;
        for (ns, addr) in [(&na, tb.addr_a), (&nb, tb.addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "v0"])?;
            ip(&["-n", ns, "link", "set", "v0", "up"])?;
            in_netns(ns, || crate::offload::disable("v0"))??;
        }
        ip(&["-n", &nl, "link", "set", "ea", "up"])?;
        ip(&["-n", &nl, "link", "set", "eb", "up"])?;
        let log = std::fs::File::create(&tb.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &nl])
            .arg(linkem)
            .args(["run", "--name", &tb.tag, "--iface-a", "ea", "--iface-b", "eb", "--seed", "1"])
            .arg("--control")
            .arg(&tb.control)
            .arg("--stats")
            .arg(&tb.stats)
            .args(["--a2b", a2b, "--b2a", b2a])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", linkem.display()))?;
        tb.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tb.stats().is_err() {
            if let Some(status) = tb.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("linkem exited ({status}): {}", std::fs::read_to_string(&tb.log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!("linkem does not answer on {}", tb.control.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(tb)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The emulator's counters and settings, from its control socket.
    pub fn stats(&self) -> Result<Snapshot> {
        Ok(control::request(&self.control, &Request::Stats, Duration::from_secs(2))?)
    }

    /// Changes settings while it runs (`delay_ms=30`).
    pub fn set(&self, dir: Dir, update: &str) -> Result<Snapshot> {
        let update = Update::parse(update)?;
        Ok(control::request(&self.control, &Request::Set { dir, update }, Duration::from_secs(2))?)
    }

    /// Stops linkem with SIGTERM and waits for it (10 s at most, then
    /// SIGKILL).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("linkem is not running"))?;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("linkem did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fixes each host's neighbour entry for the other, so lossy settings
    /// cannot stall a test on a lost ARP exchange.
    pub fn pin_neighbours(&self) -> Result<()> {
        let mac_a = mac_of(&self.ns_a, "v0")?;
        let mac_b = mac_of(&self.ns_b, "v0")?;
        for (ns, peer, mac) in [(&self.ns_a, self.addr_b, &mac_b), (&self.ns_b, self.addr_a, &mac_a)] {
            ip(&["-n", ns, "neigh", "replace", &peer.to_string(), "lladdr", mac, "dev", "v0", "nud", "permanent"])?;
        }
        Ok(())
    }

    /// The linkem log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        for ns in self.made.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
