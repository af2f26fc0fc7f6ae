//! Many route tables on one virtual clock.
//!
//! Each node of a [`Graph`] runs overlay-core's [`RouteTable`], the same
//! code onode runs: servers originate a STATUS probe every probe interval,
//! nodes forward the copies the table returns, heartbeats measure link
//! round trips, and a neighbour is declared down when [`MISS_LIMIT`]
//! heartbeats in a row go unanswered. Messages travel the links with their
//! delay, a random queueing jitter and a random loss. Everything random
//! comes from one seed, and events at the same instant run in the order
//! they were scheduled, so a seed replays exactly.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use overlay_core::liveness::MISS_LIMIT;
use overlay_core::routing::{LinkNotice, Probe, RouteTable, RoutingConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::graph::{Graph, Role};

/// The protocol's timing and the network's imperfections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub probe_interval_us: u64,
    pub heartbeat_us: u64,
    /// Up to this much queueing delay is added to each message.
    pub jitter_us: u64,
    /// Chance that a message is lost.
    pub loss: f64,
    /// Whether the bootstrapper tells every node of a failed node (it
    /// does while it is up).
    pub notices: bool,
    pub routing: RoutingConfig,
    /// Convergence slower than this many intervals is explained in the
    /// trace: the violations left at each further interval.
    pub explain_after: Option<u32>,
}

impl Default for Config {
    /// onode's defaults: probes every 500 ms, heartbeats every 100 ms,
    /// routes stale after three probe intervals and 200 ms.
    fn default() -> Self {
        Config {
            probe_interval_us: 500_000,
            heartbeat_us: 100_000,
            jitter_us: 2_000,
            loss: 0.01,
            notices: true,
            explain_after: None,
            routing: RoutingConfig { stale_after: Duration::from_millis(1700), ..RoutingConfig::default() },
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    /// A server's probe timer (ignored if the server restarted since).
    Originate {
        server: usize,
        life: u64,
    },
    /// Every node measures the round trip of each link that answers.
    Heartbeats,
    Deliver {
        to: usize,
        link: usize,
        probe: Probe,
    },
    /// A link notice arrives.
    Tell {
        to: usize,
        link: usize,
        notice: LinkNotice,
    },
    /// `node` sees `about` down (heartbeats missed) or up (answering).
    Notice {
        node: usize,
        life: u64,
        about: usize,
        up: bool,
    },
    /// The bootstrapper's notice that `about` failed, to every node.
    Failed {
        about: usize,
    },
}

struct Scheduled {
    at: u64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

struct SimNode {
    table: RouteTable,
    alive: bool,
    /// Bumped at every crash and restart: timers of an earlier life are void.
    life: u64,
    seq: u64,
}

/// What went wrong with the routes at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A live node has no route to a live server it can reach.
    NoRoute { node: String, server: String },
    /// A request walking from node to best next hop (never back onto its
    /// own path, as stream requests go) reaches `node`, whose every way to
    /// `server` leads back into `path`.
    Loop { node: String, server: String, path: Vec<String> },
    /// A next hop is over a link that is down or to a dead node.
    DeadHop { node: String, server: String, via: String },
    /// The route's real delay is over the oracle's best by more than the
    /// selection rule's tie band.
    Longer { node: String, server: String, delay_us: u64, best_us: u64 },
    /// A route to a server that is dead or cut off.
    Phantom { node: String, server: String },
}

/// Routes of every node, judged against the oracle at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgement {
    pub violations: Vec<Violation>,
    /// Real delay of each (node, live server) route over the best, summed
    /// and at most, for the relative delay penalty.
    pub penalty_sum: f64,
    pub penalty_max: f64,
    pub routes: u64,
}

pub struct World {
    pub graph: Graph,
    pub config: Config,
    /// Virtual time, µs since the start.
    pub now: u64,
    base: Instant,
    queue: BinaryHeap<Reverse<Scheduled>>,
    order: u64,
    nodes: Vec<SimNode>,
    link_up: Vec<bool>,
    index: HashMap<String, usize>,
    rng: StdRng,
    /// Probe copies sent, since the start.
    pub probes_sent: u64,
    /// Link-down notices announced so far (their ids).
    notices: u64,
    /// What was done to the overlay and when, for replay.
    pub trace: Vec<String>,
}

impl World {
    pub fn new(graph: Graph, config: Config, seed: u64) -> World {
        let index = graph.names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        let mut w = World {
            nodes: Vec::with_capacity(graph.names.len()),
            link_up: vec![true; graph.links.len()],
            graph,
            config,
            now: 0,
            base: Instant::now(),
            queue: BinaryHeap::new(),
            order: 0,
            index,
            rng: StdRng::seed_from_u64(seed ^ 0x005e_ed0f_517e),
            probes_sent: 0,
            notices: 0,
            trace: Vec::new(),
        };
        for i in 0..w.graph.names.len() {
            let table = w.fresh_table(i);
            let seq = w.unix_us();
            w.nodes.push(SimNode { table, alive: true, life: 0, seq });
            // The first measurements come with the first heartbeats.
            for (j, k) in w.graph.adjacent[i].clone() {
                let rtt = w.rtt(k);
                let name = w.graph.names[j].clone();
                w.nodes[i].table.on_link_rtt(&name, rtt);
            }
        }
        for s in w.graph.servers().collect::<Vec<_>>() {
            let phase = w.rng.random_range(0..w.config.probe_interval_us);
            w.schedule(phase, Event::Originate { server: s, life: 0 });
        }
        w.schedule(w.config.heartbeat_us, Event::Heartbeats);
        w
    }

    fn fresh_table(&self, i: usize) -> RouteTable {
        let neighbours = self.graph.adjacent[i].iter().map(|&(j, _)| self.graph.names[j].clone()).collect();
        RouteTable::new(self.graph.names[i].clone(), neighbours, self.config.routing)
    }

    fn schedule(&mut self, after_us: u64, event: Event) {
        self.order += 1;
        self.queue.push(Reverse(Scheduled { at: self.now + after_us, order: self.order, event }));
    }

    /// The nodes' wall clock (all agree).
    fn unix_us(&self) -> u64 {
        1_800_000_000_000_000 + self.now
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    /// A measured round trip of link `k`: twice its delay plus queueing.
    fn rtt(&mut self, k: usize) -> u64 {
        let jitter = if self.config.jitter_us == 0 { 0 } else { self.rng.random_range(0..self.config.jitter_us) };
        2 * self.graph.links[k].delay_us + jitter
    }

    fn usable(&self, k: usize) -> bool {
        let l = self.graph.links[k];
        self.link_up[k] && self.nodes[l.a].alive && self.nodes[l.b].alive
    }

    /// How long a node takes to see a neighbour gone: MISS_LIMIT beats
    /// missed, the first somewhere in the current beat.
    fn detection_us(&mut self) -> u64 {
        let hb = self.config.heartbeat_us;
        u64::from(MISS_LIMIT) * hb + self.rng.random_range(0..hb)
    }

    /// Runs every event up to `until` (µs since the start).
    pub fn run_until(&mut self, until: u64) {
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Reverse(s) = self.queue.pop().expect("peeked");
            self.now = s.at;
            self.handle(s.event);
        }
        self.now = until;
    }

    fn handle(&mut self, event: Event) {
        let now = self.instant();
        let unix_us = self.unix_us();
        match event {
            Event::Originate { server, life } => {
                let node = &mut self.nodes[server];
                if !node.alive || node.life != life {
                    return;
                }
                node.seq += 1;
                let name = self.graph.names[server].clone();
                let out = node.table.originate(node.seq, unix_us, vec![format!("{name}-live")]);
                self.send(server, out);
                self.schedule(self.config.probe_interval_us, Event::Originate { server, life });
            }
            Event::Heartbeats => {
                for k in 0..self.graph.links.len() {
                    if !self.usable(k) {
                        continue;
                    }
                    let l = self.graph.links[k];
                    for (me, other) in [(l.a, l.b), (l.b, l.a)] {
                        if self.config.loss > 0.0 && self.rng.random::<f64>() < self.config.loss {
                            continue;
                        }
                        let rtt = self.rtt(k);
                        let name = self.graph.names[other].clone();
                        self.nodes[me].table.on_link_rtt(&name, rtt);
                    }
                }
                self.schedule(self.config.heartbeat_us, Event::Heartbeats);
            }
            Event::Deliver { to, link, probe } => {
                if !self.usable(link) {
                    return;
                }
                let out = self.nodes[to].table.on_probe(&probe, now, unix_us);
                self.send(to, out);
            }
            Event::Notice { node, life, about, up } => {
                let n = &self.nodes[node];
                if !n.alive || n.life != life {
                    return;
                }
                let name = self.graph.names[about].clone();
                if up {
                    let Some(k) = self.graph.link_between(node, about) else { return };
                    if !self.usable(k) {
                        return;
                    }
                    let rtt = self.rtt(k);
                    let table = &mut self.nodes[node].table;
                    table.on_link_rtt(&name, rtt);
                    if table.is_down(&name) {
                        table.neighbour_up(&name);
                        self.notices += 1;
                        let notices = self.nodes[node].table.announce_link(&name, true, self.notices);
                        self.send_notices(node, notices);
                    }
                } else {
                    self.nodes[node].table.neighbour_down(&name);
                    self.notices += 1;
                    let notices = self.nodes[node].table.announce_link(&name, false, self.notices);
                    self.send_notices(node, notices);
                    let out = self.nodes[node].table.tell_changes(now);
                    self.send(node, out);
                }
            }
            Event::Tell { to, link, notice } => {
                if !self.usable(link) {
                    return;
                }
                let notices = self.nodes[to].table.on_link_notice(&notice, now);
                if !notices.is_empty() {
                    self.send_notices(to, notices);
                    let out = self.nodes[to].table.tell_changes(now);
                    self.send(to, out);
                }
            }
            Event::Failed { about } => {
                if self.nodes[about].alive {
                    return;
                }
                let name = self.graph.names[about].clone();
                for i in 0..self.nodes.len() {
                    if self.nodes[i].alive {
                        self.nodes[i].table.node_failed(&name, now);
                        let out = self.nodes[i].table.tell_changes(now);
                        self.send(i, out);
                    }
                }
            }
        }
    }

    fn send(&mut self, from: usize, out: Vec<(String, Probe)>) {
        for (to, mut probe) in out {
            probe.sender = self.graph.names[from].clone();
            if let Some((to, link, delay)) = self.carry(from, &to) {
                self.schedule(delay, Event::Deliver { to, link, probe });
            }
        }
    }

    fn send_notices(&mut self, from: usize, out: Vec<(String, LinkNotice)>) {
        for (to, notice) in out {
            if let Some((to, link, delay)) = self.carry(from, &to) {
                self.schedule(delay, Event::Tell { to, link, notice });
            }
        }
    }

    /// One control message from `from` to its neighbour `to`, counted: the
    /// receiver, the link and the delay, unless the link is down or loses
    /// it.
    fn carry(&mut self, from: usize, to: &str) -> Option<(usize, usize, u64)> {
        let j = *self.index.get(to)?;
        let k = self.graph.link_between(from, j)?;
        self.probes_sent += 1;
        if !self.usable(k) || (self.config.loss > 0.0 && self.rng.random::<f64>() < self.config.loss) {
            return None;
        }
        let jitter = if self.config.jitter_us == 0 { 0 } else { self.rng.random_range(0..self.config.jitter_us) };
        Some((j, k, self.graph.links[k].delay_us + jitter))
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("{:>9.3} s  {what}", self.now as f64 / 1e6));
    }

    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive
    }

    pub fn is_link_up(&self, k: usize) -> bool {
        self.link_up[k]
    }

    /// Both ends of link `k` see it go silent.
    pub fn cut(&mut self, k: usize) {
        let l = self.graph.links[k];
        self.note(format!("cut {}-{}", self.graph.names[l.a], self.graph.names[l.b]));
        self.link_up[k] = false;
        for (me, other) in [(l.a, l.b), (l.b, l.a)] {
            let (after, life) = (self.detection_us(), self.nodes[me].life);
            self.schedule(after, Event::Notice { node: me, life, about: other, up: false });
        }
    }

    /// Link `k` carries again: each end hears the other's next heartbeat.
    pub fn restore(&mut self, k: usize) {
        let l = self.graph.links[k];
        self.note(format!("restore {}-{}", self.graph.names[l.a], self.graph.names[l.b]));
        self.link_up[k] = true;
        for (me, other) in [(l.a, l.b), (l.b, l.a)] {
            let (after, life) = (self.rng.random_range(0..self.config.heartbeat_us), self.nodes[me].life);
            self.schedule(after, Event::Notice { node: me, life, about: other, up: true });
        }
    }

    /// Node `i` stops: its neighbours see it silent, and the bootstrapper
    /// (if notices are on) tells everyone a little later.
    pub fn crash(&mut self, i: usize) {
        self.note(format!("crash {}", self.graph.names[i]));
        self.nodes[i].alive = false;
        self.nodes[i].life += 1;
        for (j, _) in self.graph.adjacent[i].clone() {
            let (after, life) = (self.detection_us(), self.nodes[j].life);
            self.schedule(after, Event::Notice { node: j, life, about: i, up: false });
        }
        if self.config.notices {
            let after = self.detection_us() + self.config.heartbeat_us;
            self.schedule(after, Event::Failed { about: i });
        }
    }

    /// Node `i` starts again with empty state; neighbours hear it at their
    /// next heartbeat, and it finds its dead neighbours as anyone would.
    pub fn restart(&mut self, i: usize) {
        self.note(format!("restart {}", self.graph.names[i]));
        let table = self.fresh_table(i);
        let life = self.nodes[i].life + 1;
        // onode starts its probe sequence at its wall clock, so a restarted
        // server's probes are newer than any of its earlier life.
        let seq = self.unix_us();
        self.nodes[i] = SimNode { table, alive: true, life, seq };
        for (j, k) in self.graph.adjacent[i].clone() {
            if self.usable(k) {
                let rtt = self.rtt(k);
                let name = self.graph.names[j].clone();
                self.nodes[i].table.on_link_rtt(&name, rtt);
                let (after, life_j) = (self.rng.random_range(0..self.config.heartbeat_us), self.nodes[j].life);
                self.schedule(after, Event::Notice { node: j, life: life_j, about: i, up: true });
            } else {
                let after = self.detection_us();
                self.schedule(after, Event::Notice { node: i, life, about: j, up: false });
            }
        }
        if self.graph.roles[i] == Role::Server {
            let phase = self.rng.random_range(0..self.config.probe_interval_us);
            self.schedule(phase, Event::Originate { server: i, life });
        }
    }

    /// Link `k`'s delay becomes `delay_us` (a congested or rerouted path).
    pub fn set_delay(&mut self, k: usize, delay_us: u64) {
        let l = self.graph.links[k];
        self.note(format!(
            "delay of {}-{} {} -> {} µs",
            self.graph.names[l.a], self.graph.names[l.b], l.delay_us, delay_us
        ));
        self.graph.links[k].delay_us = delay_us;
    }

    /// Every node's routes against the oracle, now.
    pub fn judge(&self) -> Judgement {
        let mut j = Judgement::default();
        let now = self.instant();
        let n = self.graph.names.len();
        let cfg = self.config.routing;
        for s in 0..n {
            if self.graph.roles[s] != Role::Server {
                continue;
            }
            let server = &self.graph.names[s];
            let best: Vec<Option<u64>> =
                if self.nodes[s].alive { self.graph.shortest(s, |k| self.usable(k)) } else { vec![None; n] };
            // Every live node's next hop toward s, asked once.
            let next: Vec<Option<usize>> = (0..n)
                .map(|i| {
                    if i == s || !self.nodes[i].alive {
                        return None;
                    }
                    self.nodes[i].table.best_next_hop(server, now, &[]).map(|r| self.index[&r.via])
                })
                .collect();
            // A chain broken at one node is reported once, for that node.
            let mut broken = std::collections::HashSet::new();
            for i in (0..n).filter(|&i| i != s && self.nodes[i].alive) {
                let node = &self.graph.names[i];
                let Some(best_us) = best[i] else {
                    if next[i].is_some() {
                        j.violations.push(Violation::Phantom { node: node.clone(), server: server.clone() });
                    }
                    continue;
                };
                // Walk as a stream request does: from each node to its best
                // next hop that is not already on the request's path, adding
                // real delays.
                let (mut at, mut delay_us, mut hops) = (i, 0u64, 0usize);
                let mut path: Vec<usize> = vec![i];
                let outcome = loop {
                    if at == s {
                        break Ok(());
                    }
                    let hop = match next[at] {
                        Some(h) if !path.contains(&h) => Some(h),
                        Some(_) => {
                            let exclude: Vec<&str> = path.iter().map(|&x| self.graph.names[x].as_str()).collect();
                            self.nodes[at].table.best_next_hop(server, now, &exclude).map(|r| self.index[&r.via])
                        }
                        None => None,
                    };
                    let Some(hop) = hop else {
                        let v = if next[at].is_some() {
                            // Every way it knows leads back into the path.
                            let names = path.iter().map(|&x| self.graph.names[x].clone()).collect();
                            Violation::Loop { node: self.graph.names[at].clone(), server: server.clone(), path: names }
                        } else {
                            Violation::NoRoute { node: self.graph.names[at].clone(), server: server.clone() }
                        };
                        break Err((at, v));
                    };
                    let k = self.graph.link_between(at, hop).expect("routes go to neighbours");
                    if !self.usable(k) {
                        let v = Violation::DeadHop {
                            node: self.graph.names[at].clone(),
                            server: server.clone(),
                            via: self.graph.names[hop].clone(),
                        };
                        break Err((at, v));
                    }
                    delay_us += self.graph.links[k].delay_us;
                    hops += 1;
                    path.push(hop);
                    at = hop;
                };
                if let Err((at, v)) = outcome {
                    if broken.insert(at) {
                        j.violations.push(v);
                    }
                    continue;
                }
                // The selection rule may take up to the tie band more for
                // fewer hops; measured delays carry up to half the jitter
                // per link on top.
                let band = ((best_us as f64 * cfg.tie_ratio) as u64).max(cfg.tie_floor_us);
                let noise = self.config.jitter_us / 2 * hops as u64;
                if delay_us > best_us + band + noise {
                    j.violations.push(Violation::Longer {
                        node: node.clone(),
                        server: server.clone(),
                        delay_us,
                        best_us,
                    });
                }
                let penalty = if best_us == 0 { 1.0 } else { delay_us as f64 / best_us as f64 };
                j.penalty_sum += penalty;
                j.penalty_max = j.penalty_max.max(penalty);
                j.routes += 1;
            }
        }
        j
    }

    /// Runs probe interval by probe interval until at most `tolerated`
    /// routes fail the oracle (0: all pass; at scale, with loss and
    /// jitter, a few always fail for a moment at rest), for at most
    /// `limit` intervals: the intervals it took, or the last judgement's
    /// violations.
    pub fn converge(&mut self, limit: u32, tolerated: usize) -> Result<u32, Vec<Violation>> {
        let mut last = Vec::new();
        for k in 1..=limit {
            self.run_until(self.now + self.config.probe_interval_us);
            let j = self.judge();
            if j.violations.len() <= tolerated {
                return Ok(k);
            }
            if self.config.explain_after.is_some_and(|after| k > after) {
                let shown: Vec<String> = j.violations.iter().take(3).map(|v| format!("{v:?}")).collect();
                self.note(format!("interval {k}: {} routes fail, e.g. {}", j.violations.len(), shown.join("; ")));
            }
            last = j.violations;
        }
        Err(last)
    }
}
