//! Faults injected into a running lab while clients watch: a relay killed,
//! a tree link set down and up, a POP killed, the server at a tree's root
//! killed, the bootstrapper restarted, a relay killed and restarted. Each
//! run reports, per client, the longest media gap and whether it was still
//! decoding at the end; the lab tests assert on it and the failover
//! benchmark prints medians.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::lab::{Lab, RoleKind};
use crate::plan::ns_name;
use crate::run::{self, Bins, ClientRun};
use crate::state::LabState;
use crate::sys;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillRelay,
    LinkDown,
    KillPop,
    KillRootServer,
    RestartBootstrapper,
    RestartRelay,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillRelay,
        Fault::LinkDown,
        Fault::KillPop,
        Fault::KillRootServer,
        Fault::RestartBootstrapper,
        Fault::RestartRelay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillRelay => "kill -9 a relay on a tree",
            Fault::LinkDown => "tree link down, then up",
            Fault::KillPop => "kill -9 a POP",
            Fault::KillRootServer => "kill -9 the root server",
            Fault::RestartBootstrapper => "restart the bootstrapper",
            Fault::RestartRelay => "kill and restart a relay",
        }
    }
}

/// What one client saw during a fault run.
#[derive(Debug, Clone)]
pub struct ClientResult {
    pub host: String,
    pub stats: Value,
    pub longest_gap_ms: f64,
    /// Frames per second over the last seconds of the run.
    pub final_fps: Vec<u64>,
    /// Whether the fault hit this client's path (its POP or an ancestor).
    pub affected: bool,
}

/// The outcome of one fault run.
#[derive(Debug, Clone)]
pub struct FaultRun {
    pub fault: Fault,
    /// What was hit (a node, or a link "a-b").
    pub target: String,
    pub clients: Vec<ClientResult>,
    pub notes: Vec<String>,
    /// What the bootstrapper's view should show after the fault but does not.
    pub membership: Option<String>,
}

impl FaultRun {
    /// The longest gap among the clients the fault hit.
    pub fn gap_ms(&self) -> f64 {
        self.clients.iter().filter(|c| c.affected).map(|c| c.longest_gap_ms).fold(0.0, f64::max)
    }

    /// Problems: clients not decoding at the end of the run (see
    /// [`decoding_problem`]), and what the bootstrapper should show but
    /// does not.
    pub fn problems(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter_map(|c| decoding_problem(&c.final_fps, c.longest_gap_ms).map(|p| format!("{}: {p}", c.host)))
            .chain(self.membership.clone())
            .collect()
    }
}

/// The test stream's frame rate.
pub const STREAM_FPS: u64 = 30;
/// Longest media gap a fault may cause a viewer before the run fails (ms):
/// repair takes well under a second; this bound is for the verdict, the
/// gap itself is a benchmark figure (`faultbench`).
pub const MAX_GAP_MS: f64 = 5000.0;

/// What is wrong with a viewer after a fault, judged so that a busy
/// machine does not change the verdict: new frames must be decoded in
/// every one of the last seconds, at no less than a third of the stream's
/// pace on average (a decoder starved of CPU catches up later, or drops
/// late frames), and no media gap may exceed [`MAX_GAP_MS`].
pub fn decoding_problem(final_fps: &[u64], longest_gap_ms: f64) -> Option<String> {
    if final_fps.len() < 2 {
        return Some(format!("watched too briefly to judge (last seconds: {final_fps:?} fps)"));
    }
    if final_fps.contains(&0) {
        return Some(format!("stopped decoding after the fault (last seconds: {final_fps:?} fps)"));
    }
    let total: u64 = final_fps.iter().sum();
    if total * 3 < STREAM_FPS * final_fps.len() as u64 {
        return Some(format!(
            "decodes under a third of the stream's {STREAM_FPS} fps after the fault (last seconds: {final_fps:?} fps)"
        ));
    }
    if longest_gap_ms.is_nan() || longest_gap_ms > MAX_GAP_MS {
        return Some(format!("a media gap of {longest_gap_ms:.0} ms, over the {MAX_GAP_MS:.0} ms limit"));
    }
    None
}

/// A node of the overlay as the lab runs it.
struct NodeRef {
    host: String,
    addr: String,
}

fn inspect(st: &LabState, bins: &Bins, from_host: &str, addr: &str) -> Result<Value> {
    let ns = ns_name(&st.prefix, from_host);
    let onode = bins.onode.display().to_string();
    let out = sys::output(&["ip", "netns", "exec", &ns, &onode, "inspect", addr], None)?;
    serde_json::from_str(&out).with_context(|| format!("inspect {addr} from {from_host}"))
}

/// Overlay nodes by name, with the host they run on and an address.
fn nodes(lab: &Lab) -> BTreeMap<String, NodeRef> {
    let mut out = BTreeMap::new();
    for role in &lab.roles {
        if role.kind.is_overlay_node() {
            let host = &lab.hosts[role.host];
            let addr = host.ifaces.first().map(|i| i.addr.addr.to_string()).unwrap_or_default();
            out.insert(role.name.clone(), NodeRef { host: host.name.clone(), addr });
        }
    }
    out
}

/// `onode inspect` of the overlay node `name`, from its own host.
pub fn inspect_node(lab: &Lab, st: &LabState, bins: &Bins, name: &str) -> Result<Value> {
    let nodes = nodes(lab);
    let n = nodes.get(name).with_context(|| format!("the lab has no overlay node {name}"))?;
    inspect(st, bins, &n.host, &n.addr)
}

/// Overlay nodes that carry at least one stream now (by `onode inspect`).
pub fn carrying_nodes(lab: &Lab, st: &LabState, bins: &Bins) -> Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    for (name, n) in nodes(lab) {
        let state = inspect(st, bins, &n.host, &n.addr)?;
        if state["streams"].as_array().is_some_and(|s| !s.is_empty()) {
            out.insert(name);
        }
    }
    Ok(out)
}

/// Tree edges (upstream, downstream) of `stream`, walked up from every POP.
pub fn tree(lab: &Lab, st: &LabState, bins: &Bins, stream: &str) -> Result<Vec<(String, String)>> {
    let nodes = nodes(lab);
    let mut edges = Vec::new();
    let pops: Vec<String> = lab.roles.iter().filter(|r| r.kind == RoleKind::Pop).map(|r| r.name.clone()).collect();
    for pop in pops {
        let mut cur = pop;
        for _ in 0..16 {
            let n = &nodes[&cur];
            let state = inspect(st, bins, &n.host, &n.addr)?;
            let branch = state["streams"].as_array().and_then(|s| s.iter().find(|b| b["stream"] == stream)).cloned();
            let Some(up) = branch.and_then(|b| b["upstream"].as_str().map(str::to_string)) else { break };
            if edges.contains(&(up.clone(), cur.clone())) {
                break;
            }
            edges.push((up.clone(), cur.clone()));
            cur = up;
        }
    }
    Ok(edges)
}

fn overlay_degree(lab: &Lab, node: &str) -> usize {
    lab.overlay.as_ref().and_then(|o| o.node(node)).map_or(0, |n| n.neighbours.len())
}

fn role_kind(lab: &Lab, node: &str) -> Option<RoleKind> {
    lab.roles.iter().find(|r| r.name == node).map(|r| r.kind)
}

/// Kills every process on `host` (SIGKILL): a crash.
pub fn kill_node(st: &LabState, host: &str) -> Result<()> {
    let pids = sys::ns_pids(&ns_name(&st.prefix, host));
    if pids.is_empty() {
        bail!("no process runs on {host}");
    }
    for pid in pids {
        sys::signal(pid, libc::SIGKILL);
    }
    Ok(())
}

fn restart_node(lab: &Lab, st: &mut LabState, bins: &Bins, node: &str) -> Result<()> {
    let role = lab.roles.iter().find(|r| r.name == node).ok_or_else(|| anyhow!("no role {node}"))?;
    let host = &lab.hosts[role.host].name;
    let argv = run::role_argv(lab, role, bins, st.media_dir.as_deref());
    let log = st.dir().join("logs").join(format!("{node}-restarted.log"));
    run::spawn_in(&ns_name(&st.prefix, host), &argv, &log)?;
    Ok(())
}

/// The interface of `host` that holds the address it has on the link to `peer`.
fn link_iface(lab: &Lab, host: &str, peer: &str) -> Result<(String, String)> {
    let hi = lab.hosts.iter().position(|h| h.name == host).ok_or_else(|| anyhow!("no host {host}"))?;
    let pi = lab.hosts.iter().position(|h| h.name == peer).ok_or_else(|| anyhow!("no host {peer}"))?;
    for seg in &lab.segments {
        let mine = seg.members.iter().find(|m| m.host == hi);
        let theirs = seg.members.iter().any(|m| m.host == pi);
        if let (Some(m), true) = (mine, theirs) {
            return Ok((m.iface.clone(), m.addr.to_string()));
        }
    }
    bail!("{host} and {peer} share no link")
}

/// Runs one fault on a lab that is up with its roles: clients on every
/// client host watch `stream` for `watch` seconds; the fault comes after
/// `settle` seconds.
pub fn run_fault(lab: &Lab, st: &mut LabState, bins: &Bins, fault: Fault, stream: &str) -> Result<FaultRun> {
    let settle = Duration::from_secs(5);
    let watch_s = 16.0;
    let clients: Vec<String> =
        lab.roles.iter().filter(|r| r.kind == RoleKind::Client).map(|r| lab.hosts[r.host].name.clone()).collect();
    let tag = format!("{:?}", fault).to_lowercase();
    let mut children = Vec::new();
    for host in &clients {
        let c = ClientRun {
            host: host.clone(),
            stream: stream.to_string(),
            duration_s: Some(watch_s),
            headless: true,
            stats: st.dir().join("clients").join(format!("{tag}-{host}.json")),
            log: Some(st.dir().join("logs").join(format!("{tag}-{host}-client.log"))),
        };
        children.push((c.clone(), run::start_client(st, bins, &c)?));
    }
    sys::sleep(settle)?;

    let edges = tree(lab, st, bins, stream)?;
    let nodes = nodes(lab);
    let on_tree = |n: &str| edges.iter().any(|(u, d)| u == n || d == n);
    let downstream = |n: &str| edges.iter().filter(|(u, _)| u == n).map(|(_, d)| d.clone()).collect::<Vec<_>>();
    // A relay whose loss the tree can route around: every downstream of it
    // has another neighbour.
    let repairable_relay = || {
        nodes.keys().find(|n| {
            role_kind(lab, n) == Some(RoleKind::Node)
                && on_tree(n)
                && downstream(n).iter().all(|d| overlay_degree(lab, d) >= 2)
        })
    };
    let mut notes = vec![format!("tree of {stream}: {edges:?}")];
    let target: String = match fault {
        Fault::KillRelay | Fault::RestartRelay => {
            let relay = repairable_relay().ok_or_else(|| anyhow!("no relay on the tree can be routed around"))?.clone();
            kill_node(st, &nodes[&relay].host)?;
            if fault == Fault::RestartRelay {
                sys::sleep(Duration::from_secs(2))?;
                restart_node(lab, st, bins, &relay)?;
            }
            relay
        }
        Fault::LinkDown => {
            let (up, down) = edges
                .iter()
                .find(|(u, d)| {
                    role_kind(lab, d) == Some(RoleKind::Node) && overlay_degree(lab, d) >= 2 && {
                        role_kind(lab, u) != Some(RoleKind::Pop)
                    }
                })
                .cloned()
                .ok_or_else(|| anyhow!("no tree link between relays"))?;
            let host = nodes[&down].host.clone();
            let peer = nodes[&up].host.clone();
            let (iface, _) = link_iface(lab, &host, &peer)?;
            let ns = ns_name(&st.prefix, &host);
            sys::output(&["ip", "-n", &ns, "link", "set", "dev", &iface, "down"], None)?;
            sys::sleep(Duration::from_secs(4))?;
            sys::output(&["ip", "-n", &ns, "link", "set", "dev", &iface, "up"], None)?;
            // Static routes through the interface went with it: put them back.
            let hi = lab.hosts.iter().position(|h| h.name == host).expect("host");
            for r in lab.routes[hi].iter().filter(|r| r.dev == iface) {
                let (dest, via) = (r.dest.to_string(), r.via.to_string());
                sys::output(&["ip", "-n", &ns, "route", "replace", &dest, "via", &via, "dev", &iface], None)?;
            }
            format!("{up}-{down}")
        }
        Fault::KillPop => {
            let pop = edges
                .iter()
                .map(|(_, d)| d.clone())
                .find(|d| role_kind(lab, d) == Some(RoleKind::Pop))
                .ok_or_else(|| anyhow!("no POP on the tree"))?;
            kill_node(st, &nodes[&pop].host)?;
            pop
        }
        Fault::KillRootServer => {
            let root = edges
                .iter()
                .map(|(u, _)| u.clone())
                .find(|u| role_kind(lab, u).is_some_and(|k| k.is_server()))
                .ok_or_else(|| anyhow!("no root server found"))?;
            kill_node(st, &nodes[&root].host)?;
            root
        }
        Fault::RestartBootstrapper => {
            let boot = lab
                .roles
                .iter()
                .find(|r| r.kind == RoleKind::Bootstrapper)
                .map(|r| r.name.clone())
                .ok_or_else(|| anyhow!("no bootstrapper"))?;
            kill_node(st, &nodes[&boot].host)?;
            sys::sleep(Duration::from_secs(1))?;
            restart_node(lab, st, bins, &boot)?;
            boot
        }
    };
    notes.push(format!("fault: {} on {target}", fault.name()));

    // Which clients the fault hit: the target is on their POP's way up.
    let mut results = Vec::new();
    for (c, child) in children {
        let mut child = child;
        let status = child.wait().context("waiting for a client")?;
        let text = std::fs::read_to_string(&c.stats)
            .with_context(|| format!("client {} wrote no stats ({status})", c.host))?;
        let stats: Value = serde_json::from_str(&text)?;
        let pop_name = stats["pop_switches"]
            .as_array()
            .and_then(|s| s.first())
            .and_then(|s| s["from"].as_str())
            .or(stats["pop_name"].as_str())
            .unwrap_or_default()
            .to_string();
        let mut path = vec![pop_name.clone()];
        let mut cur = pop_name;
        while let Some((u, _)) = edges.iter().find(|(_, d)| *d == cur) {
            path.push(u.clone());
            cur = u.clone();
        }
        let affected = fault == Fault::RestartBootstrapper
            || path.contains(&target)
            || target.split('-').all(|n| path.iter().any(|p| p == n));
        let timeline: Vec<u64> =
            stats["fps_timeline"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        // The last full seconds, not the one cut short by the end.
        let n = timeline.len();
        let final_fps = if n >= 5 { timeline[n - 5..n - 1].to_vec() } else { timeline.clone() };
        results.push(ClientResult {
            host: c.host.clone(),
            longest_gap_ms: stats["longest_gap_ms"].as_f64().unwrap_or(f64::INFINITY),
            stats,
            final_fps,
            affected,
        });
    }
    let boot_killed = fault != Fault::RestartBootstrapper
        && lab.roles.iter().any(|r| r.kind == RoleKind::Bootstrapper && r.name == target);
    let membership = match run::overview(st, lab, bins) {
        _ if boot_killed => None,
        Err(e) => Some(format!("no overview from the bootstrapper after the fault: {e:#}")),
        Ok(o) => {
            let registered = o.registered.contains(&target);
            let failed = o.failed.contains(&target);
            match fault {
                Fault::RestartBootstrapper if !o.ready || o.registered.len() < nodes.len() => Some(format!(
                    "restarted bootstrapper: ready {} with {} of {} nodes registered again",
                    o.ready,
                    o.registered.len(),
                    nodes.len()
                )),
                Fault::RestartRelay if !registered || failed => {
                    Some(format!("restarted relay {target} is not registered again: {o:?}"))
                }
                Fault::KillRelay | Fault::KillPop | Fault::KillRootServer if !failed => {
                    Some(format!("the bootstrapper did not report {target} failed: {o:?}"))
                }
                _ => None,
            }
        }
    };
    Ok(FaultRun { fault, target, clients: results, notes, membership })
}

/// Brings `lab` up under `prefix`, runs one fault, and tears the lab down
/// (also on error).
pub fn run_in_fresh_lab(lab: &Lab, bins: &Bins, fault: Fault, prefix: &str, media: Option<&Path>) -> Result<FaultRun> {
    let opts =
        run::UpOptions { media_dir: media.map(Path::to_path_buf), ..run::UpOptions::new(prefix, Some(bins.dir())) };
    let result = run::up(lab, &opts).and_then(|mut st| run_fault(lab, &mut st, bins, fault, "test"));
    let down = run::down(prefix);
    let out = result?;
    down?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_are_judged_by_frames_still_coming_and_the_longest_gap() {
        assert_eq!(decoding_problem(&[30, 29, 31, 30], 700.0), None);
        // A busy machine: slow but steady decoding is not a failure.
        assert_eq!(decoding_problem(&[13, 18, 14, 15], 900.0), None);
        assert!(decoding_problem(&[30, 30, 0, 0], 700.0).unwrap().starts_with("stopped decoding"));
        assert!(decoding_problem(&[5, 6, 4, 5], 700.0).unwrap().contains("under a third"));
        assert!(decoding_problem(&[30, 30, 30, 30], 6000.0).unwrap().contains("6000 ms"));
        assert!(decoding_problem(&[30, 30, 30, 30], f64::INFINITY).is_some());
        assert!(decoding_problem(&[30], 100.0).is_some());
    }
}
