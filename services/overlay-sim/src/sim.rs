//! Many node engines (routes and trees) on one virtual clock.
//!
//! Each node of a [`Graph`] runs overlay-core's [`Engine`], the object
//! onode runs: servers originate a STATUS probe every probe interval,
//! nodes forward the copies the route table returns, heartbeats measure
//! link round trips, and a neighbour is declared down when [`MISS_LIMIT`]
//! heartbeats in a row go unanswered. Viewers at POPs ask for streams; the
//! engines' stream requests, answers, prunes and reroot notices travel
//! the links, and their timers run on the virtual clock. Probes and
//! heartbeats travel with the link's delay, a random queueing jitter and
//! a random loss; tree messages ride on gRPC in onode, so the links only
//! delay them (TCP retransmits), unless a link or node is down. An
//! unanswered stream request watches its upstream as onode does (pings
//! after 250 ms). Everything random comes from one seed, and events at the
//! same instant run in the order they were scheduled, so a seed replays
//! exactly. (No media flows: the quiet-stream checks, onode's last resort
//! for a branch fed by nobody, are off, so the judge sees such a branch.)

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use overlay_core::engine::{Effect, Engine, EngineConfig};
use overlay_core::liveness::MISS_LIMIT;
use overlay_core::routing::{tie_band, LinkNotice, Probe, RouteTable, RoutingConfig, NOTICE_REPEAT};
use overlay_core::tree::{Nak, NakReason, Requester, Source, StreamDesc};
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
    /// The tree protocol's timing (onode's, without the quiet-stream
    /// checks: no media flows here).
    pub engine: EngineConfig,
    /// Share of the POPs with a viewer (each watches one stream).
    pub watching: f64,
    /// Every node's log lines (the engine's notes) go into the trace.
    pub notes: bool,
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
            // The periodic heartbeats are modelled, not sent: a node sees
            // a neighbour gone MISS_LIMIT beats after it went silent, and
            // back at its next beat. One-off checks are sent.
            engine: EngineConfig { silence: None, heartbeat: None, ..EngineConfig::default() },
            watching: 0.5,
            notes: false,
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
    /// A stream request from `from` (its ask `id`) reaches `to`.
    Ask {
        to: usize,
        from: usize,
        life: u64,
        link: usize,
        id: u64,
        stream: String,
        path: Vec<String>,
    },
    /// The answer to `node`'s ask `id` comes back.
    Reply {
        node: usize,
        life: u64,
        link: usize,
        id: u64,
        result: Result<StreamDesc, Nak>,
    },
    /// `node`'s ask `id` to `peer`: while unanswered, the peer is checked
    /// (onode pings it); gone, or the timeout over, the ask fails.
    Watch {
        node: usize,
        life: u64,
        id: u64,
        peer: usize,
        until: u64,
    },
    /// A prune of `stream` from `from` reaches `to`.
    Leave {
        to: usize,
        from: usize,
        link: usize,
        stream: String,
    },
    /// A reroot notice from `from` reaches `to`.
    Reroot {
        to: usize,
        from: usize,
        link: usize,
        desc: StreamDesc,
    },
    /// News from `from` that its branch of `stream` repairs reaches `to`.
    Repairing {
        to: usize,
        from: usize,
        link: usize,
        stream: String,
    },
    /// The answer to `node`'s heartbeat `seq` from `from` arrives.
    BeatAnswer {
        node: usize,
        life: u64,
        from: usize,
        link: usize,
        seq: u64,
    },
    /// `node`'s engine has a timer due.
    Timer {
        node: usize,
        life: u64,
    },
    /// The viewer at POP `node` asks for its stream (again).
    View {
        node: usize,
        life: u64,
    },
}

/// Who waits for a stream request's answer.
#[derive(Debug, Clone, Copy)]
enum Ticket {
    /// A neighbour's ask, over `link`.
    Ask { node: usize, life: u64, link: usize, id: u64 },
    /// A POP's viewer.
    Viewer { node: usize, life: u64 },
}

/// How long onode's stream request waits before it pings the upstream,
/// and again while the wait goes on (node/trees.rs JOIN_WATCH).
const JOIN_WATCH_US: u64 = 250_000;
/// A viewer refused (or whose POP restarted) asks again after this long.
const VIEW_AGAIN_US: u64 = 1_000_000;

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
    engine: Engine,
    alive: bool,
    /// Bumped at every crash and restart: timers of an earlier life are void.
    life: u64,
    seq: u64,
    /// When its engine's timer event is scheduled.
    timer_at: Option<u64>,
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
    /// (`path`: the way the route was told, server first.)
    Phantom { node: String, server: String, path: Vec<String> },
}

/// What is wrong with the trees at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeViolation {
    /// Following upstreams over live links from `nodes[0]` comes back to
    /// a node already passed: the stream would circle.
    Loop { stream: String, nodes: Vec<String> },
    /// `a` and `b` each send the stream to the other.
    BothWays { stream: String, a: String, b: String },
    /// The tree above `node` is rooted at `root`, which is no live server
    /// offering the stream.
    BadRoot { stream: String, node: String, root: String },
}

/// The trees, judged at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TreeJudgement {
    pub broken: Vec<TreeViolation>,
    /// Viewers' POPs (and their streams) that a live server offering the
    /// stream could reach, but that no tree feeds now.
    pub unfed: Vec<(String, String)>,
    /// Where the walk from the first unfed POPs stopped, and why.
    pub unfed_why: Vec<String>,
    pub fed: usize,
    /// Branches sent to a neighbour that takes the stream from another
    /// (a prune on its way): copies the link carries for nothing.
    pub strays: usize,
    /// The first few of them: stream, sender, receiver.
    pub stray_examples: Vec<(String, String, String)>,
    /// Tree delay from the root to each fed POP over the shortest path
    /// from that root (the relative delay penalty): summed and at most.
    pub penalty_sum: f64,
    pub penalty_max: f64,
    /// Tree delay to each fed POP over the shortest path from the nearest
    /// live server offering the stream (the tree may be rooted at
    /// another: a POP joins the tree where its request first meets it).
    pub nearest_sum: f64,
}

/// How a walk up a tree from one node ended.
enum Walk {
    /// At `root`, a live server offering the stream, after `delay` µs of
    /// links.
    Fed {
        delay: u64,
        root: usize,
    },
    /// The walk stopped here: the node, and why.
    Unfed(String),
    Broken(TreeViolation),
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

/// How the overlay came back after a fault.
#[derive(Debug, Clone)]
pub struct Convergence {
    /// Probe intervals until the routes passed, or the last violations.
    pub routes: Result<u32, Vec<Violation>>,
    /// Time until every viewer's POP a server reaches was fed (and stayed
    /// fed to the end): 0 when none lost its feed; None if some still
    /// were not at the end (those are `unfed`).
    pub fed_after_us: Option<u64>,
    pub unfed: Vec<(String, String)>,
    pub unfed_why: Vec<String>,
    /// Trees broken on the way, as first seen.
    pub broken: Vec<TreeViolation>,
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
    /// What was done to the overlay and when, for replay.
    pub trace: Vec<String>,
    /// Each server's stream (servers share them: two per stream).
    streams: HashMap<usize, String>,
    /// The POPs with a viewer, and the stream each watches.
    pub viewers: Vec<(usize, String)>,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    /// Stream requests, answers, prunes and reroot notices sent.
    pub tree_messages: u64,
    /// Repairs completed, since the start.
    pub repairs: u64,
    /// Trees found broken by the checks after each event, not yet taken by
    /// [`World::converge_all`].
    broken_seen: Vec<TreeViolation>,
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
            trace: Vec::new(),
            streams: HashMap::new(),
            viewers: Vec::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            tree_messages: 0,
            repairs: 0,
            broken_seen: Vec::new(),
        };
        let servers: Vec<usize> = w.graph.servers().collect();
        let channels = servers.len().div_ceil(2).max(1);
        for (k, &s) in servers.iter().enumerate() {
            w.streams.insert(s, format!("ch{}", k % channels));
        }
        for i in 0..w.graph.names.len() {
            let engine = w.fresh_engine(i);
            let seq = w.unix_us();
            w.nodes.push(SimNode { engine, alive: true, life: 0, seq, timer_at: None });
            // The first measurements come with the first heartbeats.
            for (j, k) in w.graph.adjacent[i].clone() {
                let rtt = w.rtt(k);
                let name = w.graph.names[j].clone();
                w.nodes[i].engine.routes.on_link_rtt(&name, rtt);
            }
        }
        for s in w.graph.servers().collect::<Vec<_>>() {
            let phase = w.rng.random_range(0..w.config.probe_interval_us);
            w.schedule(phase, Event::Originate { server: s, life: 0 });
        }
        w.schedule(w.config.heartbeat_us, Event::Heartbeats);
        w
    }

    fn fresh_engine(&self, i: usize) -> Engine {
        let neighbours = self.graph.adjacent[i].iter().map(|&(j, _)| self.graph.names[j].clone()).collect();
        let routes = RouteTable::new(self.graph.names[i].clone(), neighbours, self.config.routing);
        let offered = self.streams.get(&i).cloned();
        // As onode: link notices numbered from the wall clock, so that a
        // restarted node's are not taken for its last life's.
        Engine::new(routes, offered, self.config.engine, self.instant()).numbering_from(self.unix_us())
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
        2 * self.graph.links[k].delay_us + self.jitter()
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
            let touched = self.tree_nodes(&s.event);
            self.handle(s.event);
            for i in touched {
                self.check_trees_at(i);
            }
        }
        self.now = until;
    }

    /// Trees found broken by the checks after each event, since
    /// [`World::converge_all`] last took them.
    pub fn broken_seen(&self) -> &[TreeViolation] {
        &self.broken_seen
    }

    /// The nodes whose trees an event may change.
    fn tree_nodes(&self, event: &Event) -> Vec<usize> {
        match event {
            Event::Notice { node, .. }
            | Event::BeatAnswer { node, .. }
            | Event::Reply { node, .. }
            | Event::Watch { node, .. }
            | Event::Timer { node, .. }
            | Event::View { node, .. } => vec![*node],
            Event::Ask { to, .. }
            | Event::Leave { to, .. }
            | Event::Reroot { to, .. }
            | Event::Repairing { to, .. } => vec![*to],
            Event::Failed { about } => self.graph.adjacent[*about].iter().map(|&(j, _)| j).collect(),
            Event::Originate { .. } | Event::Heartbeats | Event::Deliver { .. } | Event::Tell { .. } => Vec::new(),
        }
    }

    /// Whether `y`, which `x` sends `stream` to over a live link, sends it
    /// back to `x`: the link carries it both ways.
    fn sends_back(&self, x: usize, y: usize, stream: &str) -> bool {
        let live = self.graph.link_between(x, y).is_some_and(|k| self.usable(k));
        let x_name = &self.graph.names[x];
        live && self.nodes[y].engine.trees.branch(stream).is_some_and(|yb| yb.downstream.contains(x_name))
    }

    /// The invariants a change at node `i` could break, checked right
    /// after the event: no link between `i` and a neighbour carries a
    /// stream both ways, and the walk up from `i` meets no loop and ends at
    /// no bad root. (A loop or a bad root is always made by a change at a
    /// node on it, so checking each changed node catches every one, however
    /// short-lived.)
    pub fn check_trees_at(&mut self, i: usize) {
        if !self.nodes[i].alive || self.broken_seen.len() >= 8 {
            return;
        }
        let me = &self.graph.names[i];
        let mut found = Vec::new();
        for stream in self.nodes[i].engine.trees.carrying() {
            let Some(b) = self.nodes[i].engine.trees.branch(&stream) else { continue };
            for d in &b.downstream {
                if self.sends_back(i, self.index[d], &stream) {
                    found.push(TreeViolation::BothWays { stream: stream.clone(), a: me.clone(), b: d.clone() });
                }
            }
            if let Walk::Broken(v) = self.walk(i, &stream) {
                found.push(v);
            }
        }
        for v in found {
            self.note(format!("tree broken: {v:?}"));
            self.broken_seen.push(v);
        }
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
                let streams = self.streams.get(&server).cloned().into_iter().collect();
                let effects = node.engine.originate(node.seq, unix_us, streams);
                self.carry_out(server, effects);
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
                        // The answer says which streams the other carries.
                        let carrying = self.nodes[other].engine.trees.carrying();
                        let routes = &mut self.nodes[me].engine.routes;
                        routes.on_link_rtt(&name, rtt);
                        routes.set_carrying(&name, carrying);
                    }
                }
                self.schedule(self.config.heartbeat_us, Event::Heartbeats);
            }
            Event::Deliver { to, link, probe } => {
                if !self.usable(link) {
                    return;
                }
                let effects = self.nodes[to].engine.on_probe(&probe, now, unix_us);
                self.carry_out(to, effects);
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
                    let carrying = self.nodes[about].engine.trees.carrying();
                    let effects = self.nodes[node].engine.link_measured(&name, rtt, carrying);
                    self.carry_out(node, effects);
                } else {
                    let effects = self.nodes[node].engine.neighbour_lost(&name, false, now);
                    self.carry_out(node, effects);
                }
            }
            Event::Tell { to, link, notice } => {
                if !self.usable(link) {
                    return;
                }
                let effects = self.nodes[to].engine.on_link_notice(&notice, now);
                self.carry_out(to, effects);
            }
            Event::Failed { about } => {
                if self.nodes[about].alive {
                    return;
                }
                let name = self.graph.names[about].clone();
                // Every node believes it (its neighbours would check it once
                // more, and find it silent), and its neighbours drop it for
                // good.
                for i in 0..self.nodes.len() {
                    if self.nodes[i].alive {
                        let effects = self.nodes[i].engine.node_failed(&name, now);
                        self.carry_out(i, effects);
                    }
                }
            }
            Event::Ask { to, from, life, link, id, stream, path } => {
                if !self.usable(link) {
                    return;
                }
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.tickets.insert(ticket, Ticket::Ask { node: from, life, link, id });
                let requester = Requester::Neighbour(self.graph.names[from].clone());
                let effects = self.nodes[to].engine.request(&stream, requester, path, ticket, now);
                self.carry_out(to, effects);
            }
            Event::Reply { node, life, link, id, result } => {
                if !self.usable(link) || self.nodes[node].life != life {
                    return;
                }
                let effects = self.nodes[node].engine.answered(id, result, now);
                self.carry_out(node, effects);
            }
            Event::Watch { node, life, id, peer, until } => {
                if !self.nodes[node].alive || self.nodes[node].life != life {
                    return;
                }
                let reachable = self.graph.link_between(node, peer).is_some_and(|k| self.usable(k));
                let nak = |why: &str| Err(Nak { reason: NakReason::Timeout, detail: why.to_string() });
                let result = if !reachable {
                    nak("the upstream does not answer pings")
                } else if self.now >= until {
                    nak("no answer in time")
                } else {
                    let limit = self.ping_limit_us(node, peer);
                    self.schedule((2 * limit).min(until - self.now), Event::Watch { node, life, id, peer, until });
                    return;
                };
                // Answered already: the engine knows the id no more.
                let effects = self.nodes[node].engine.answered(id, result, now);
                self.carry_out(node, effects);
            }
            Event::Leave { to, from, link, stream } => {
                if self.usable(link) {
                    let requester = Requester::Neighbour(self.graph.names[from].clone());
                    let effects = self.nodes[to].engine.leave(&stream, requester);
                    self.carry_out(to, effects);
                }
            }
            Event::Reroot { to, from, link, desc } => {
                if self.usable(link) {
                    let from = self.graph.names[from].clone();
                    let effects = self.nodes[to].engine.rerooted(
                        &desc.stream,
                        &from,
                        &desc.server,
                        &desc.route,
                        desc.delay_us,
                        now,
                    );
                    self.carry_out(to, effects);
                }
            }
            Event::Repairing { to, from, link, stream } => {
                if self.usable(link) {
                    let from = self.graph.names[from].clone();
                    let effects = self.nodes[to].engine.upstream_repairing(&stream, &from, now);
                    self.carry_out(to, effects);
                }
            }
            Event::BeatAnswer { node, life, from, link, seq } => {
                let n = &self.nodes[node];
                if !n.alive || n.life != life || !self.usable(link) {
                    return;
                }
                let carrying = self.nodes[from].engine.trees.carrying();
                let name = self.graph.names[from].clone();
                let effects = self.nodes[node].engine.heartbeat_answered(&name, seq, carrying, now).unwrap_or_default();
                self.carry_out(node, effects);
            }
            Event::Timer { node, life } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.life != life || n.timer_at != Some(self.now) {
                    return;
                }
                n.timer_at = None;
                let effects = n.engine.tick(now, |_| None);
                self.carry_out(node, effects);
            }
            Event::View { node, life } => {
                let n = &self.nodes[node];
                if !n.alive || n.life != life {
                    return;
                }
                let Some(stream) = self.viewers.iter().find(|(p, _)| *p == node).map(|(_, s)| s.clone()) else {
                    return;
                };
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.tickets.insert(ticket, Ticket::Viewer { node, life });
                let effects = self.nodes[node].engine.request(&stream, Requester::Local, Vec::new(), ticket, now);
                self.carry_out(node, effects);
            }
        }
    }

    /// How long onode waits for a ping of `peer` from `node`: three link
    /// round trips, at least 100 ms.
    fn ping_limit_us(&self, node: usize, peer: usize) -> u64 {
        let k = self.graph.link_between(node, peer).expect("neighbours");
        (6 * self.graph.links[k].delay_us).max(100_000)
    }

    /// Carries out what node `i`'s engine asked for: messages go over the
    /// links (a stream request and its answer, prunes, reroot notices),
    /// a server's own source starts at once, viewers are answered; then
    /// its next timer is set.
    fn carry_out(&mut self, i: usize, effects: Vec<Effect>) {
        let mut queue = std::collections::VecDeque::from(effects);
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Ask { id, to, stream, path, timeout } => {
                    let life = self.nodes[i].life;
                    let until = self.now + timeout.as_micros() as u64;
                    let Some(j) = self.index.get(&to).copied() else { continue };
                    if let Some((link, delay)) = self.carry(i, j, false) {
                        self.schedule(delay, Event::Ask { to: j, from: i, life, link, id, stream, path });
                    }
                    let first = JOIN_WATCH_US.min(until - self.now);
                    self.schedule(first, Event::Watch { node: i, life, id, peer: j, until });
                }
                Effect::Answer { ticket, result } => self.answer(ticket, result),
                Effect::Refresh { tickets, desc, .. } => {
                    for t in tickets {
                        self.answer(t, Ok(desc.clone()));
                    }
                }
                Effect::Leave { to, stream } => {
                    let Some(j) = self.index.get(&to).copied() else { continue };
                    if let Some((link, delay)) = self.carry(i, j, false) {
                        self.schedule(delay, Event::Leave { to: j, from: i, link, stream });
                    }
                }
                Effect::Reroot { to, desc } => {
                    let Some(j) = self.index.get(&to).copied() else { continue };
                    if let Some((link, delay)) = self.carry(i, j, false) {
                        self.schedule(delay, Event::Reroot { to: j, from: i, link, desc });
                    }
                }
                Effect::Repairing { to, stream } => {
                    let Some(j) = self.index.get(&to).copied() else { continue };
                    if let Some((link, delay)) = self.carry(i, j, false) {
                        self.schedule(delay, Event::Repairing { to: j, from: i, link, stream });
                    }
                }
                Effect::StartLocal { stream } => {
                    let desc = StreamDesc {
                        stream: stream.clone(),
                        server: self.graph.names[i].clone(),
                        ssrcs: vec![1, 2],
                        depth: 0,
                        route: Vec::new(),
                        delay_us: 0,
                    };
                    queue.extend(self.nodes[i].engine.local_started(&stream, Ok(desc)));
                }
                Effect::Repaired { .. } => self.repairs += 1,
                Effect::Probe { to, probe } => self.send(i, vec![(to, probe)]),
                Effect::Beat { to, seq } => {
                    // The beat there and its answer back, each with the
                    // link's chance of loss; a dead node answers nothing.
                    let Some(j) = self.index.get(&to).copied() else { continue };
                    let Some(link) = self.graph.link_between(i, j) else { continue };
                    let lost = |w: &mut Self| w.config.loss > 0.0 && w.rng.random::<f64>() < w.config.loss;
                    if self.usable(link) && !lost(self) && !lost(self) {
                        let (rtt, life) = (self.rtt(link), self.nodes[i].life);
                        self.schedule(rtt, Event::BeatAnswer { node: i, life, from: j, link, seq });
                    }
                }
                Effect::Notice { to, notice } => self.send_notices(i, vec![(to, notice)]),
                Effect::Note(n) if self.config.notes && n.level > overlay_core::engine::Level::Debug => {
                    let line = format!("{}: {}: {}", self.graph.names[i], n.stream, n.what);
                    self.note(line);
                }
                Effect::StopLocal { .. }
                | Effect::Checked { .. }
                | Effect::RepairStarted { .. }
                | Effect::Republish
                | Effect::Note(_) => {}
            }
        }
        if let Some(at) = self.nodes[i].engine.poll_timeout() {
            let at_us = (at.saturating_duration_since(self.base).as_micros() as u64).max(self.now);
            if self.nodes[i].timer_at.is_none_or(|t| at_us < t) {
                self.nodes[i].timer_at = Some(at_us);
                let life = self.nodes[i].life;
                self.schedule(at_us - self.now, Event::Timer { node: i, life });
            }
        }
    }

    /// A stream request's answer goes to whoever waits for it.
    fn answer(&mut self, ticket: u64, result: Result<StreamDesc, Nak>) {
        match self.tickets.remove(&ticket) {
            Some(Ticket::Ask { node, life, link, id }) => {
                let l = self.graph.links[link];
                let me = if l.a == node { l.b } else { l.a };
                if let Some((link, delay)) = self.carry(me, node, false) {
                    self.schedule(delay, Event::Reply { node, life, link, id, result });
                }
            }
            Some(Ticket::Viewer { node, life }) if result.is_err() => {
                self.schedule(VIEW_AGAIN_US, Event::View { node, life });
            }
            Some(Ticket::Viewer { .. }) | None => {}
        }
    }

    /// A tree message from `from` to its neighbour `to`, counted: the
    /// link and its delay, unless the link is down. (They ride on gRPC:
    /// TCP retransmits what the link loses.)
    fn send(&mut self, from: usize, out: Vec<(String, Probe)>) {
        for (to, mut probe) in out {
            probe.sender = self.graph.names[from].clone();
            let Some(to) = self.index.get(&to).copied() else { continue };
            if let Some((link, delay)) = self.carry(from, to, true) {
                self.schedule(delay, Event::Deliver { to, link, probe });
            }
        }
    }

    /// Link notices, each copy sent twice (as onode does, see
    /// [`NOTICE_REPEAT`]), each time with its own chance of loss.
    fn send_notices(&mut self, from: usize, out: Vec<(String, LinkNotice)>) {
        let repeat = NOTICE_REPEAT.as_micros() as u64;
        for (to, notice) in out {
            let Some(to) = self.index.get(&to).copied() else { continue };
            for after in [0, repeat] {
                if let Some((link, delay)) = self.carry(from, to, true) {
                    self.schedule(after + delay, Event::Tell { to, link, notice: notice.clone() });
                }
            }
        }
    }

    /// One control message from `from` to its neighbour `to`, counted:
    /// its link and delay, unless the link is down or (`lossy`: probes
    /// and link notices, which ride on UDP) loses it. Tree messages ride
    /// on gRPC in onode: TCP retransmits what the link loses.
    fn carry(&mut self, from: usize, to: usize, lossy: bool) -> Option<(usize, u64)> {
        let k = self.graph.link_between(from, to)?;
        if lossy {
            self.probes_sent += 1;
        } else {
            self.tree_messages += 1;
        }
        if !self.usable(k) || (lossy && self.config.loss > 0.0 && self.rng.random::<f64>() < self.config.loss) {
            return None;
        }
        Some((k, self.graph.links[k].delay_us + self.jitter()))
    }

    /// A random queueing delay for one message.
    fn jitter(&mut self) -> u64 {
        if self.config.jitter_us == 0 {
            0
        } else {
            self.rng.random_range(0..self.config.jitter_us)
        }
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!("{:>9.3} s  {what}", self.now as f64 / 1e6));
    }

    /// Adds a line to the trace.
    pub fn remark(&mut self, what: String) {
        self.note(what);
    }

    /// Node `i`'s engine, for scenarios that set a state up by hand.
    pub fn engine_mut(&mut self, i: usize) -> &mut Engine {
        &mut self.nodes[i].engine
    }

    /// The virtual clock as the engines see it.
    pub fn clock(&self) -> Instant {
        self.instant()
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
        let engine = self.fresh_engine(i);
        let life = self.nodes[i].life + 1;
        // onode starts its probe sequence at its wall clock, so a restarted
        // server's probes are newer than any of its earlier life.
        let seq = self.unix_us();
        self.nodes[i] = SimNode { engine, alive: true, life, seq, timer_at: None };
        // Its viewer comes back to it.
        if self.viewers.iter().any(|(p, _)| *p == i) {
            self.schedule(VIEW_AGAIN_US, Event::View { node: i, life });
        }
        for (j, k) in self.graph.adjacent[i].clone() {
            if self.usable(k) {
                let rtt = self.rtt(k);
                let name = self.graph.names[j].clone();
                self.nodes[i].engine.routes.on_link_rtt(&name, rtt);
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

    /// Gives a share of the POPs (`config.watching`) a viewer, each of
    /// one stream, who asks for it now.
    pub fn start_viewers(&mut self) {
        let mut channels: Vec<String> = self.streams.values().cloned().collect();
        channels.sort_unstable();
        channels.dedup();
        for i in 0..self.graph.names.len() {
            if self.graph.roles[i] != Role::Pop || self.rng.random::<f64>() >= self.config.watching {
                continue;
            }
            let stream = channels[self.rng.random_range(0..channels.len())].clone();
            self.viewers.push((i, stream));
            let life = self.nodes[i].life;
            self.schedule(0, Event::View { node: i, life });
        }
    }

    /// Walks from `x` up the tree of `stream`: each node's upstream must
    /// be alive, over a live link, and send to it.
    fn walk(&self, x: usize, stream: &str) -> Walk {
        let (mut at, mut delay) = (x, 0u64);
        let mut seen = vec![x];
        loop {
            let name = &self.graph.names[at];
            let Some(b) = self.nodes[at].engine.trees.branch(stream) else {
                let joining = self.nodes[at].engine.trees.joining().into_iter().any(|(s, _)| s == stream);
                return Walk::Unfed(format!("{name} has no branch{}", if joining { " (joining)" } else { "" }));
            };
            let up = match &b.source {
                Source::Local => {
                    let offers = self.streams.get(&at).is_some_and(|s| s == stream);
                    return if offers && self.nodes[at].alive {
                        Walk::Fed { delay, root: at }
                    } else {
                        Walk::Broken(TreeViolation::BadRoot {
                            stream: stream.to_string(),
                            node: self.graph.names[x].clone(),
                            root: self.graph.names[at].clone(),
                        })
                    };
                }
                Source::Neighbour(up) => self.index[up],
            };
            let state = if b.orphaned {
                ", orphaned"
            } else if b.repairing {
                ", repairing"
            } else {
                ""
            };
            let Some(k) = self.graph.link_between(at, up).filter(|&k| self.usable(k)) else {
                return Walk::Unfed(format!("{name}'s upstream {} is dead or cut off{state}", self.graph.names[up]));
            };
            let sends = self.nodes[up]
                .engine
                .trees
                .branch(stream)
                .is_some_and(|ub| ub.downstream.contains(&self.graph.names[at]));
            if !sends {
                return Walk::Unfed(format!("{name}'s upstream {} does not send to it{state}", self.graph.names[up]));
            }
            if seen.contains(&up) {
                seen.push(up);
                let nodes = seen.iter().map(|&n| self.graph.names[n].clone()).collect();
                return Walk::Broken(TreeViolation::Loop { stream: stream.to_string(), nodes });
            }
            delay += self.graph.links[k].delay_us;
            seen.push(up);
            at = up;
        }
    }

    /// Every tree now: no loop, no link carrying a stream both ways, every
    /// tree rooted at a live server offering its stream, and which
    /// viewers' POPs are fed.
    pub fn judge_trees(&self) -> TreeJudgement {
        let mut j = TreeJudgement::default();
        let n = self.graph.names.len();
        let mut streams: Vec<&String> = self.streams.values().collect();
        streams.sort_unstable();
        streams.dedup();
        let mut seen_loops = BTreeSet::new();
        for stream in streams {
            for x in (0..n).filter(|&x| self.nodes[x].alive) {
                let Some(b) = self.nodes[x].engine.trees.branch(stream) else { continue };
                for d in &b.downstream {
                    let y = self.index[d];
                    if !self.graph.link_between(x, y).is_some_and(|k| self.usable(k)) {
                        continue;
                    }
                    let yb = self.nodes[y].engine.trees.branch(stream);
                    if self.sends_back(x, y, stream) {
                        if x < y {
                            j.broken.push(TreeViolation::BothWays {
                                stream: stream.clone(),
                                a: self.graph.names[x].clone(),
                                b: d.clone(),
                            });
                        }
                    } else if yb.is_none_or(|yb| yb.source != Source::Neighbour(self.graph.names[x].clone())) {
                        j.strays += 1;
                        if j.stray_examples.len() < 3 {
                            j.stray_examples.push((stream.clone(), self.graph.names[x].clone(), d.clone()));
                        }
                    }
                }
                if let Walk::Broken(v) = self.walk(x, stream) {
                    let key = match &v {
                        TreeViolation::Loop { nodes, .. } => {
                            let mut k: Vec<String> = nodes.clone();
                            k.sort_unstable();
                            k.dedup();
                            format!("{stream} {k:?}")
                        }
                        other => format!("{other:?}"),
                    };
                    if seen_loops.insert(key) {
                        j.broken.push(v);
                    }
                }
            }
        }
        // Which viewers' POPs must be fed: those some live server offering
        // their stream reaches.
        let mut from: HashMap<usize, Vec<Option<u64>>> = HashMap::new();
        for (pop, stream) in &self.viewers {
            if !self.nodes[*pop].alive {
                continue;
            }
            let mut nearest: Option<u64> = None;
            for (&s, offered) in &self.streams {
                if offered != stream || !self.nodes[s].alive {
                    continue;
                }
                let d = from.entry(s).or_insert_with(|| self.graph.shortest(s, |k| self.usable(k)));
                if let Some(x) = d[*pop] {
                    nearest = Some(nearest.map_or(x, |y| y.min(x)));
                }
            }
            let Some(nearest_us) = nearest else { continue };
            match self.walk(*pop, stream) {
                Walk::Fed { delay, root } => {
                    j.fed += 1;
                    let ratio = |best: u64| if best == 0 { 1.0 } else { delay as f64 / best as f64 };
                    let root_us = from.get(&root).and_then(|d| d[*pop]).unwrap_or(delay);
                    let p = ratio(root_us);
                    j.penalty_sum += p;
                    j.penalty_max = j.penalty_max.max(p);
                    j.nearest_sum += ratio(nearest_us);
                }
                Walk::Unfed(why) => {
                    j.unfed.push((self.graph.names[*pop].clone(), stream.clone()));
                    j.unfed_why.push(why);
                }
                Walk::Broken(_) => j.unfed.push((self.graph.names[*pop].clone(), stream.clone())),
            }
        }
        j
    }

    /// Runs after a fault until the routes pass the oracle (as
    /// [`World::converge`]) and every viewer's POP a server can reach is
    /// fed, judging the trees every `step_us`: how long the trees took,
    /// and any tree broken on the way (a loop, a link both ways, a bad
    /// root), first seen.
    pub fn converge_all(&mut self, limit: u32, tolerated: usize, step_us: u64) -> Convergence {
        let start = self.now;
        let mut c = Convergence {
            routes: Err(Vec::new()),
            fed_after_us: None,
            unfed: Vec::new(),
            unfed_why: Vec::new(),
            broken: Vec::new(),
        };
        let mut affected = false;
        let steps = self.config.probe_interval_us.div_ceil(step_us);
        for k in 1..=limit {
            let interval_end = self.now + self.config.probe_interval_us;
            for _ in 0..steps {
                self.run_until((self.now + step_us).min(interval_end));
                let t = self.judge_trees();
                let mut broken = std::mem::take(&mut self.broken_seen);
                broken.extend(t.broken.iter().cloned());
                if c.broken.is_empty() && !broken.is_empty() {
                    let shown: Vec<String> = broken.iter().take(3).map(|v| format!("{v:?}")).collect();
                    c.broken = broken;
                    self.note(format!("trees broken: {}", shown.join("; ")));
                }
                if t.unfed.is_empty() {
                    if c.fed_after_us.is_none() {
                        c.fed_after_us = Some(if affected { self.now - start } else { 0 });
                    }
                } else {
                    affected = true;
                    c.fed_after_us = None;
                }
                c.unfed = t.unfed;
                c.unfed_why = t.unfed_why;
            }
            if k > 4 && !c.unfed.is_empty() && self.config.notes {
                let shown: Vec<String> =
                    c.unfed.iter().zip(&c.unfed_why).take(4).map(|((p, s), why)| format!("{p} ({s}): {why}")).collect();
                self.note(format!("interval {k}: {} viewers' POPs unfed, e.g. {}", c.unfed.len(), shown.join(", ")));
            }
            if c.routes.is_err() {
                let j = self.judge();
                if j.violations.len() <= tolerated {
                    c.routes = Ok(k);
                } else {
                    self.explain(k, &j.violations);
                    c.routes = Err(j.violations);
                }
            }
            if c.routes.is_ok() && c.fed_after_us.is_some() {
                break;
            }
        }
        c
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
            let best: Vec<Option<(u64, u32)>> =
                if self.nodes[s].alive { self.graph.shortest_with_hops(s, |k| self.usable(k)) } else { vec![None; n] };
            // Every live node's next hop toward s, asked once.
            let next: Vec<Option<usize>> = (0..n)
                .map(|i| {
                    if i == s || !self.nodes[i].alive {
                        return None;
                    }
                    self.nodes[i].engine.routes.best_next_hop(server, now, &[]).map(|r| self.index[&r.via])
                })
                .collect();
            // A chain broken at one node is reported once, for that node.
            let mut broken = std::collections::HashSet::new();
            for i in (0..n).filter(|&i| i != s && self.nodes[i].alive) {
                let node = &self.graph.names[i];
                let Some((best_us, best_hops)) = best[i] else {
                    if next[i].is_some() {
                        let r = &self.nodes[i].engine.routes;
                        let via = next[i].map(|h| self.graph.names[h].clone()).unwrap_or_default();
                        let path = r
                            .entries(now)
                            .remove(server)
                            .and_then(|e| e.into_iter().find(|(v, _)| *v == via))
                            .map(|(_, e)| e.path)
                            .unwrap_or_default();
                        j.violations.push(Violation::Phantom { node: node.clone(), server: server.clone(), path });
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
                            self.nodes[at]
                                .engine
                                .routes
                                .best_next_hop(server, now, &exclude)
                                .map(|r| self.index[&r.via])
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
                // fewer hops, over measured delays. A link's measurement
                // (half its lowest recent round trip) carries up to half
                // the jitter on top of its real delay, on the best path as
                // on the one taken: a long best path can look as long as a
                // shorter one that is really slower.
                let noise = self.config.jitter_us / 2 * hops.max(best_hops as usize) as u64;
                let band = tie_band(&cfg, best_us + noise);
                if delay_us > best_us + noise + band {
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

    /// Traces the routes still failing `k` intervals after a fault, once
    /// past [`Config::explain_after`].
    fn explain(&mut self, k: u32, violations: &[Violation]) {
        if self.config.explain_after.is_some_and(|after| k > after) {
            let shown: Vec<String> = violations.iter().take(3).map(|v| format!("{v:?}")).collect();
            self.note(format!("interval {k}: {} routes fail, e.g. {}", violations.len(), shown.join("; ")));
            // What the first failing node holds toward that server: every
            // way its neighbours told it, and how old each is.
            let first = violations.first().and_then(|v| match v {
                Violation::Longer { node, server, .. } | Violation::Loop { node, server, .. } => {
                    Some((node.clone(), server.clone()))
                }
                _ => None,
            });
            if let Some((node, server)) = first {
                let now = self.instant();
                let engine = &self.nodes[self.index[&node]].engine;
                let ways: Vec<String> = engine
                    .routes
                    .entries(now)
                    .remove(&server)
                    .unwrap_or_default()
                    .iter()
                    .map(|(via, e)| {
                        format!(
                            "via {via}: {:.1} ms (floor {:.1}), {} hops, round {}, {} ms old",
                            e.delay_us as f64 / 1000.0,
                            e.floor_us as f64 / 1000.0,
                            e.hops,
                            e.seq,
                            now.saturating_duration_since(e.received).as_millis()
                        )
                    })
                    .collect();
                let best = engine.routes.best_next_hop(&server, now, &[]).map(|r| r.via);
                self.note(format!("  {node} toward {server}: picks {best:?} of [{}]", ways.join("; ")));
                self.explain_path(&node, &server);
                self.explain_way(&node, &server);
            }
        }
    }

    /// The path of the way `node` picks toward `server`, each link with its
    /// real delay and the delay its lower end measures.
    fn explain_way(&mut self, node: &str, server: &str) {
        let now = self.instant();
        let routes = &self.nodes[self.index[node]].engine.routes;
        let Some(r) = routes.best_next_hop(server, now, &[]) else { return };
        let Some((_, e)) = routes.entries(now).remove(server).and_then(|e| e.into_iter().find(|(v, _)| *v == r.via))
        else {
            return;
        };
        let mut path = e.path.clone();
        path.push(node.to_string());
        let links: Vec<String> = path
            .windows(2)
            .map(|w| {
                let (a, b) = (self.index[&w[0]], self.index[&w[1]]);
                let real = self.graph.link_between(a, b).map(|k| (self.graph.links[k].delay_us, self.usable(k)));
                let measured = self.nodes[b].engine.routes.link_delay_us(&w[0]);
                format!("{}-{} {real:?}/{measured:?}", w[0], w[1])
            })
            .collect();
        self.note(format!("  its way: {}", links.join(" ")));
    }

    /// Along the oracle's shortest path from `server` to `node`: what each
    /// node on it picks and how far that is from its own best, so that the
    /// trace shows where good news stopped travelling.
    fn explain_path(&mut self, node: &str, server: &str) {
        let (s, mut at) = (self.index[server], self.index[node]);
        let best = self.graph.shortest_with_hops(s, |k| self.usable(k));
        let now = self.instant();
        let mut hops = Vec::new();
        while at != s {
            let Some((d, _)) = best[at] else { break };
            let picked = self.nodes[at].engine.routes.best_next_hop(server, now, &[]);
            let shown = match &picked {
                Some(r) => format!("{:.1} via {}", r.delay_us as f64 / 1000.0, r.via),
                None => "none".to_string(),
            };
            // The neighbour before it on the shortest path.
            let prev = self.graph.adjacent[at].iter().find(|&&(j, k)| {
                self.usable(k) && best[j].is_some_and(|(dj, _)| dj + self.graph.links[k].delay_us == d)
            });
            let Some(&(j, _)) = prev else { break };
            let (name, prev) = (&self.graph.names[at], &self.graph.names[j]);
            let routes = &self.nodes[at].engine.routes;
            let heard = routes.entries(now).remove(server).and_then(|e| e.into_iter().find(|(v, _)| v == prev));
            let heard = heard.map_or("nothing".to_string(), |(_, e)| {
                format!("{:.1} of round {}", e.delay_us as f64 / 1000.0, e.seq % 1000)
            });
            let newest = routes.newest_round(server).map_or(0, |q| q % 1000);
            let told = self.nodes[j].engine.routes.told(server, name);
            hops.push(format!(
                "{name} best {:.1} (newest round {newest}) picks {shown}, hears {heard} from {prev}, which told {told:?}",
                d as f64 / 1000.0,
            ));
            at = j;
        }
        self.note(format!("  shortest path back to {server}: {}", hops.join("; ")));
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
            self.explain(k, &j.violations);
            last = j.violations;
        }
        Err(last)
    }
}
