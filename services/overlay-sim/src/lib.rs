//! A deterministic simulator of the overlay's routing at scale.
//!
//! Every node runs overlay-core's route table on a virtual clock (see
//! [`sim`]); a seed draws the topology ([`graph`]) and a schedule of faults
//! (link cuts and restores, crashes and restarts of relays, POPs and
//! servers, partitions and their healing, links getting slower, the
//! bootstrapper's notices lost). After each fault the routes of every live
//! node are judged against an oracle (lowest summed real delay, within the
//! tie band fewer hops), walking them as a stream request would, until no
//! more fail than did at rest: how many probe intervals that takes is the
//! figure. A run that does not converge names its seed and
//! prints what happened, so that it can be replayed.
//!
//! Every node runs overlay-core's [`Engine`](overlay_core::engine::Engine),
//! the same object onode runs: with the routes come the stream trees. A
//! share of the POPs have a viewer, each watching one of the streams
//! (every stream is offered by two servers). After every event that can
//! change a node's trees, that node's trees are checked: no loop, no link
//! carrying a stream both ways, every tree rooted at a live server offering
//! its stream. Every 50 ms of virtual time all trees are judged again, and
//! after a fault, how long until every viewer's POP that a server can still
//! reach is fed again. A broken tree, or a POP left unfed, fails the seed.

pub mod graph;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use graph::{Graph, Role, Shape};
use sim::{Config, Violation, World};

/// A fault the schedule may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    LinkCut,
    LinkRestore,
    NodeCrash,
    NodeRestart,
    ServerCrash,
    ServerRestart,
    /// A link's delay grows (x3 to x6).
    SlowerLink,
    /// A region (a ball of about an eighth of the nodes) is cut off.
    Partition,
    Heal,
    /// A relay crashes while the bootstrapper is down: no notice.
    SilentCrash,
}

impl FaultKind {
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::LinkCut => "link cut",
            FaultKind::LinkRestore => "link restored",
            FaultKind::NodeCrash => "relay/POP crash",
            FaultKind::NodeRestart => "relay/POP restart",
            FaultKind::ServerCrash => "server crash",
            FaultKind::ServerRestart => "server restart",
            FaultKind::SlowerLink => "slower link",
            FaultKind::Partition => "partition",
            FaultKind::Heal => "partition healed",
            FaultKind::SilentCrash => "crash, no bootstrapper",
        }
    }
}

/// What one seed gave.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub servers: usize,
    pub mean_degree: f64,
    /// Probe intervals from a cold start to routes that pass the oracle.
    pub start: Result<u32, String>,
    /// Per fault applied: its kind and the intervals until the routes
    /// passed again (or why they did not).
    pub faults: Vec<(FaultKind, Result<u32, String>)>,
    /// Probe copies each node sent per probe interval at rest.
    pub messages_per_node_interval: f64,
    /// Share of (node, server) routes failing the oracle at rest.
    pub rest_failing: f64,
    /// Routes failing at one instant at rest: the median and the most of
    /// ten looks. After a fault, the routes count as converged when no
    /// more fail than the median.
    pub rest_typical: usize,
    pub rest_most: usize,
    /// Relative delay penalty of the routes after the last convergence.
    pub penalty_mean: f64,
    pub penalty_max: f64,
    /// Viewers' POPs.
    pub viewers: usize,
    /// From the viewers' first requests until every one was fed, µs.
    pub trees_start: Result<u64, String>,
    /// Per fault: its kind and how long until every viewer's POP was fed
    /// again (µs; 0 when none lost its feed), or why not.
    pub repairs: Vec<(FaultKind, Result<u64, String>)>,
    /// Trees broken at some instant (loops, links both ways, bad roots).
    pub broken: Vec<String>,
    /// Tree messages (requests, answers, prunes, reroots) per node per
    /// probe interval at rest.
    pub tree_messages_per_node_interval: f64,
    /// Tree delay to each fed POP over the shortest path from its root,
    /// after the last fault; and over that from the nearest server.
    pub tree_penalty_mean: f64,
    pub tree_penalty_max: f64,
    pub tree_nearest_mean: f64,
    /// The same right after the last fault, before the trees' moves.
    pub tree_penalty_before_moves: f64,
    /// Viewers' POPs unfed at the end.
    pub unfed_late: usize,
    /// Branches sent to a neighbour fed by another, after the last fault.
    pub strays: usize,
    pub trace: Vec<String>,
}

impl Report {
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.start {
            out.push(format!("cold start: {e}"));
        }
        for (i, (kind, r)) in self.faults.iter().enumerate() {
            if let Err(e) = r {
                out.push(format!("fault {} ({}): {e}", i + 1, kind.label()));
            }
        }
        if let Err(e) = &self.trees_start {
            out.push(format!("trees at cold start: {e}"));
        }
        for (i, (kind, r)) in self.repairs.iter().enumerate() {
            if let Err(e) = r {
                out.push(format!("trees after fault {} ({}): {e}", i + 1, kind.label()));
            }
        }
        out.extend(self.broken.iter().cloned());
        if self.unfed_late > 0 {
            out.push(format!("{} viewers' POPs unfed after the moves", self.unfed_late));
        }
        out
    }
}

/// How long routes may take after a fault before the run counts as not
/// converged, in probe intervals.
pub const LIMIT: u32 = 40;

fn shown(v: &[Violation]) -> String {
    let mut s = format!("{} violations, e.g. ", v.len());
    for x in v.iter().take(3) {
        s.push_str(&format!("{x:?}; "));
    }
    s
}

/// Runs one seed: a topology of `shape`, a cold start, then `faults`
/// random faults, each followed by convergence.
pub fn run(shape: Shape, config: Config, seed: u64, faults: usize) -> Report {
    let graph = Graph::generate(shape, seed);
    let mean_degree = graph.mean_degree();
    let mut w = World::new(graph, config, seed);
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let start = w.converge(LIMIT, 0).map_err(|v| shown(&v));
    w.start_viewers();
    let mut broken = Vec::new();
    let trees_start = trees_outcome(w.converge_all(LIMIT, usize::MAX, STEP_US), &mut broken, "cold start");

    // At rest, over ten intervals: probes sent, and how often a route
    // fails the oracle (lost probes making a route look gone, a loop
    // between rounds), judged in the middle of each interval.
    let before = w.probes_sent;
    let tree_before = w.tree_messages;
    let (mut checked, mut failing) = (0u64, 0u64);
    let mut counts = Vec::new();
    for _ in 0..10 {
        w.run_until(w.now + config.probe_interval_us / 2);
        let j = w.judge();
        checked += j.routes + j.violations.len() as u64;
        failing += j.violations.len() as u64;
        counts.push(j.violations.len());
        w.run_until(w.now + config.probe_interval_us - config.probe_interval_us / 2);
    }
    counts.sort_unstable();
    let rest_typical = counts[counts.len() / 2];
    let rest_most = counts.last().copied().unwrap_or(0);
    let messages_per_node_interval = (w.probes_sent - before) as f64 / (10.0 * shape.nodes as f64);
    let tree_messages_per_node_interval = (w.tree_messages - tree_before) as f64 / (10.0 * shape.nodes as f64);
    let rest_failing = if checked == 0 { 0.0 } else { failing as f64 / checked as f64 };

    let n = shape.nodes;
    let mut cut: Vec<usize> = Vec::new();
    let mut down: Vec<usize> = Vec::new();
    let mut servers_down: Vec<usize> = Vec::new();
    let mut partition: Vec<usize> = Vec::new();
    let mut results = Vec::new();
    let mut repairs = Vec::new();
    for f in 0..faults {
        let kind = loop {
            let k = match rng.random_range(0..10) {
                0 | 1 => FaultKind::LinkCut,
                2 => FaultKind::LinkRestore,
                3 => FaultKind::NodeCrash,
                4 => FaultKind::NodeRestart,
                5 => FaultKind::ServerCrash,
                6 => FaultKind::ServerRestart,
                7 => FaultKind::SlowerLink,
                8 if partition.is_empty() => FaultKind::Partition,
                8 => FaultKind::Heal,
                _ => FaultKind::SilentCrash,
            };
            let possible = match k {
                FaultKind::LinkRestore => !cut.is_empty(),
                FaultKind::NodeRestart => !down.is_empty(),
                // Keep at least one server up.
                FaultKind::ServerCrash => servers_down.len() + 1 < shape.servers,
                FaultKind::ServerRestart => !servers_down.is_empty(),
                _ => true,
            };
            if possible {
                break k;
            }
        };
        let live_link = |w: &World, rng: &mut StdRng| loop {
            let k = rng.random_range(0..w.graph.links.len());
            if w.is_link_up(k) {
                break k;
            }
        };
        let live_node = |w: &World, rng: &mut StdRng, role: Option<Role>| loop {
            let i = rng.random_range(0..n);
            let ok = match role {
                Some(r) => w.graph.roles[i] == r,
                None => w.graph.roles[i] != Role::Server,
            };
            if ok && w.is_alive(i) {
                break i;
            }
        };
        match kind {
            FaultKind::LinkCut => {
                let k = live_link(&w, &mut rng);
                w.cut(k);
                cut.push(k);
            }
            FaultKind::LinkRestore => {
                let k = cut.swap_remove(rng.random_range(0..cut.len()));
                w.restore(k);
            }
            FaultKind::NodeCrash => {
                let i = live_node(&w, &mut rng, None);
                w.crash(i);
                down.push(i);
            }
            FaultKind::SilentCrash => {
                let i = live_node(&w, &mut rng, None);
                w.config.notices = false;
                w.crash(i);
                w.config.notices = config.notices;
                down.push(i);
            }
            FaultKind::NodeRestart => {
                let i = down.swap_remove(rng.random_range(0..down.len()));
                w.restart(i);
            }
            FaultKind::ServerCrash => {
                let i = live_node(&w, &mut rng, Some(Role::Server));
                w.crash(i);
                servers_down.push(i);
            }
            FaultKind::ServerRestart => {
                let i = servers_down.swap_remove(rng.random_range(0..servers_down.len()));
                w.restart(i);
            }
            FaultKind::SlowerLink => {
                let k = live_link(&w, &mut rng);
                let slower = w.graph.links[k].delay_us * rng.random_range(3..=6);
                w.set_delay(k, slower);
            }
            FaultKind::Partition => {
                let centre = rng.random_range(0..n);
                partition = region_border(&w.graph, centre, n / 8);
                for &k in &partition {
                    if w.is_link_up(k) {
                        w.cut(k);
                    }
                }
            }
            FaultKind::Heal => {
                for k in std::mem::take(&mut partition) {
                    if !w.is_link_up(k) && !cut.contains(&k) {
                        w.restore(k);
                    }
                }
            }
        }
        // Converged: back to no more failing routes than typically at rest,
        // and every viewer's POP a server reaches fed.
        let c = w.converge_all(LIMIT, rest_typical, STEP_US);
        results.push((kind, c.routes.clone().map_err(|v| shown(&v))));
        let outcome = trees_outcome(c, &mut broken, &format!("fault {}", f + 1));
        if let Ok(us) = &outcome {
            if *us > 0 {
                w.remark(format!("fault {}: viewers' POPs all fed again after {} ms", f + 1, us / 1000));
            }
        }
        repairs.push((kind, outcome));
    }
    let j = w.judge();
    let t_before = w.judge_trees();
    // Trees move to clearly better upstreams once they have been still
    // for the settle time: a while after the last fault, judge them again.
    if let Some(settle) = config.engine.settle {
        w.run_until(w.now + settle.as_micros() as u64 + 5_000_000);
    }
    let t = w.judge_trees();
    if !t.stray_examples.is_empty() {
        w.remark(format!(
            "at the end, {} branches sent to a neighbour fed by another, e.g. {:?}",
            t.strays, t.stray_examples
        ));
    }
    let broken_late = t.broken.iter().take(3).map(|v| format!("after the moves: broken tree: {v:?}"));
    broken.extend(broken_late);
    Report {
        seed,
        nodes: n,
        servers: shape.servers,
        mean_degree,
        start,
        faults: results,
        messages_per_node_interval,
        rest_failing,
        rest_typical,
        rest_most,
        penalty_mean: if j.routes == 0 { 1.0 } else { j.penalty_sum / j.routes as f64 },
        penalty_max: j.penalty_max,
        viewers: w.viewers.len(),
        trees_start,
        repairs,
        broken,
        tree_messages_per_node_interval,
        tree_penalty_mean: if t.fed == 0 { 1.0 } else { t.penalty_sum / t.fed as f64 },
        tree_penalty_max: t.penalty_max,
        tree_penalty_before_moves: if t_before.fed == 0 { 1.0 } else { t_before.penalty_sum / t_before.fed as f64 },
        unfed_late: t.unfed.len(),
        tree_nearest_mean: if t.fed == 0 { 1.0 } else { t.nearest_sum / t.fed as f64 },
        strays: t.strays,
        trace: w.trace,
    }
}

/// The trees are judged this often (virtual time).
pub const STEP_US: u64 = 50_000;

/// How long the viewers' POPs took to be fed, or which were not; broken
/// trees are added to `broken`.
fn trees_outcome(c: sim::Convergence, broken: &mut Vec<String>, when: &str) -> Result<u64, String> {
    for v in c.broken.iter().take(3) {
        broken.push(format!("{when}: broken tree: {v:?}"));
    }
    c.fed_after_us.ok_or_else(|| {
        let shown: Vec<String> = c.unfed.iter().take(5).map(|(p, s)| format!("{p} ({s})")).collect();
        format!("{} viewers' POPs not fed, e.g. {}", c.unfed.len(), shown.join(", "))
    })
}

/// Tree repair times of many reports, by fault kind, in ms: only faults
/// that took some POP's feed.
pub fn repairs_by_kind(reports: &[Report]) -> BTreeMap<FaultKind, Vec<u32>> {
    let mut out: BTreeMap<FaultKind, Vec<u32>> = BTreeMap::new();
    for r in reports {
        for (kind, res) in &r.repairs {
            if let Ok(us) = res {
                if *us > 0 {
                    out.entry(*kind).or_default().push((*us / 1000) as u32);
                }
            }
        }
    }
    out
}

/// The links leaving the ball of `size` nodes nearest `centre` in hops.
fn region_border(g: &Graph, centre: usize, size: usize) -> Vec<usize> {
    let mut inside = BTreeSet::from([centre]);
    let mut queue = VecDeque::from([centre]);
    while let Some(i) = queue.pop_front() {
        if inside.len() >= size {
            break;
        }
        for &(j, _) in &g.adjacent[i] {
            if inside.len() < size && inside.insert(j) {
                queue.push_back(j);
            }
        }
    }
    let mut border: Vec<usize> =
        (0..g.links.len()).filter(|&k| inside.contains(&g.links[k].a) != inside.contains(&g.links[k].b)).collect();
    border.sort_unstable();
    border
}

/// Convergence times of many reports, by fault kind.
pub fn by_kind(reports: &[Report]) -> BTreeMap<FaultKind, Vec<u32>> {
    let mut out: BTreeMap<FaultKind, Vec<u32>> = BTreeMap::new();
    for r in reports {
        for (kind, res) in &r.faults {
            if let Ok(k) = res {
                out.entry(*kind).or_default().push(*k);
            }
        }
    }
    out
}

/// The `q` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
