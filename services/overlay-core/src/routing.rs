//! STATUS probes and the route table built from them.
//!
//! Every server floods a probe each period (a round, numbered by `seq`). A
//! node records, per server and per neighbour, what the neighbour last told
//! it: the accumulated path delay (the sum of measured one-way link delays,
//! so it stays right when clocks differ), the hop count, the path and the
//! send time (the original's clock-based metric, kept for display).
//!
//! What a node tells a neighbour is its best way that avoids that
//! neighbour, from the current and the previous round only (an older
//! round's route is never passed on, so bad news is never hidden behind
//! it), and the copy carries the way's path, so no told route ever loops:
//! - at the first copy of a round, every neighbour not on that copy's path
//!   hears its way (the round's refresh);
//! - later, a neighbour whose way changed (another path, hop count, or a
//!   delay beyond the tie band) hears the change at once: bad news always,
//!   good news a few times a round (the next round carries the rest);
//! - a neighbour left with no way is told so (a withdrawal);
//! - near-equal ways do not swap: the way told stays until another is a
//!   clear gain.
//!
//! A node that finds a link dead floods a link-down notice (each copy sent
//! twice, [`NOTICE_REPEAT`] apart), and every node forgets the routes
//! through the link at once; the bootstrapper's notice
//! of a failed node does the same for routes through the node. Copies that
//! crossed a dead link are ignored until a notice says it is back (or for
//! the stale time, should that notice be lost).
//!
//! The best next hop toward a server has the lowest delay; when delays are
//! within 10% of each other, fewer hops wins. The 10% is counted from the
//! lowest delay known through any neighbour, which every copy carries
//! beside the delay of the way it tells (a way that won on hops may be up
//! to 10% longer than its sender's lowest): counted from the ways told, the
//! bands would add up hop by hop, and a route 20 hops long could end up a
//! fifth longer than the best. Routes of the two newest
//! rounds are preferred over older ones. A stream request never goes to a
//! neighbour whose way runs through a node already on the request's path.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// A STATUS probe as it travels the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Server that originated it.
    pub server: String,
    /// Per-server sequence number, increasing.
    pub seq: u64,
    /// Server's wall clock at sending (µs since the Unix epoch).
    pub send_time_unix_us: u64,
    /// Hops from the server to the receiver of this copy.
    pub hops: u32,
    /// Nodes the copy went through, server first.
    pub visited: Vec<String>,
    /// Summed one-way link delay from the server to the sender of this copy.
    pub path_delay_us: u64,
    /// The lowest delay the sender knows to the server over ways that
    /// avoid the receiver: the way told may be up to the tie band longer
    /// (fewer hops won), and the receiver's tie band is measured from the
    /// true lowest, so that the band never compounds hop by hop.
    pub best_delay_us: u64,
    /// Streams the server offers.
    pub streams: Vec<String>,
    /// The neighbour that sent this copy.
    pub sender: String,
    /// The sender withdraws the way it advertised earlier: it has none
    /// left that avoids the receiver.
    pub withdrawn: bool,
}

/// A node's notice that its link to neighbour `b` died (or came back),
/// flooded once over the overlay: every route through a dead link dies at
/// once, not when its round goes stale, and copies still travelling that
/// crossed it are ignored until it is back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkNotice {
    pub a: String,
    pub b: String,
    /// Unique per notice from `a` (its clock at detection).
    pub id: u64,
    /// The link is back (else dead).
    pub up: bool,
    /// The neighbour that passed this copy on.
    pub sender: String,
}

/// Something known dead that routes must not run through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cut {
    Link(String, String),
    Node(String),
}

impl Cut {
    fn crossed_by(&self, path: &[String]) -> bool {
        match self {
            // A failed server's own rounds are judged by their sequence
            // numbers: a restarted one starts higher.
            Cut::Node(x) => path.iter().skip(1).any(|p| p == x),
            Cut::Link(..) => path.windows(2).any(|w| self.is_link(&w[0], &w[1])),
        }
    }

    /// Whether the link between `a` and `b` comes back with this cut gone:
    /// the link itself, or either end.
    fn healed_by(&self, a: &str, b: &str) -> bool {
        match self {
            Cut::Node(x) => x == a || x == b,
            Cut::Link(..) => self.is_link(a, b),
        }
    }

    fn is_link(&self, a: &str, b: &str) -> bool {
        matches!(self, Cut::Link(x, y) if (x == a && y == b) || (x == b && y == a))
    }
}

/// A cut and when it was learnt: copies that crossed it are ignored until
/// a notice says it is back, or for the stale time at most (a lost notice).
#[derive(Debug, Clone)]
struct Dead {
    cut: Cut,
    since: Instant,
}

/// What a route table has told its neighbours and heard from them since it
/// was made: the protocol's own traffic, for a node's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounters {
    /// Copies of a round passed on as its refresh.
    pub refreshes: u64,
    /// Changes told between refreshes.
    pub updates: u64,
    /// Ways withdrawn from a neighbour.
    pub withdrawals: u64,
    /// Link notices this node started: a link of its own found dead or back.
    pub notices_started: u64,
    /// Link notices heard for the first time from a neighbour.
    pub notices_heard: u64,
    /// Nodes the bootstrapper reported failed. A node's neighbours flood no
    /// link notice for it when this report comes before they miss its
    /// heartbeats: the report has told every node already.
    pub failures_heard: u64,
    /// Copies not learnt: they came over a link whose delay was not
    /// measured yet.
    pub unmeasured: u64,
}

/// Link notices remembered to pass each on once, and cuts remembered.
const NOTICES_KEPT: usize = 4096;

/// Link notices ride on UDP, as probes do, and every node passes each on
/// once: a lost copy to a node with one live link left would keep that
/// node's routes through the dead link (and its neighbours', from it) alive
/// until they go stale, several probe intervals. So the driver sends every
/// copy a second time after this pause; the copy that comes second is
/// recognised and ignored.
pub const NOTICE_REPEAT: Duration = Duration::from_millis(50);

/// Knobs of route selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingConfig {
    /// Two delays within this fraction of the lower one are a tie, decided
    /// by hop count (the original's 10%).
    pub tie_ratio: f64,
    /// Delays closer than this are also a tie: below it, measurement noise
    /// would decide, not the network.
    pub tie_floor_us: u64,
    /// A route not refreshed by a probe for this long is forgotten.
    pub stale_after: Duration,
    /// A route learnt from a probe more than this many rounds older than
    /// the newest one seen from its server is used only when no newer one
    /// is left: its neighbour did not pass the newer rounds on (it lost its
    /// own way to the server, or its way now runs through this node). One
    /// round of slack covers a copy lost on the way and the moments when a
    /// round's copies are still arriving.
    pub rounds_kept: u64,
    /// Updates a node may send each neighbour per round after its first
    /// copy, when later copies change what it advertises.
    pub updates_per_round: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            tie_ratio: 0.10,
            tie_floor_us: 500,
            stale_after: Duration::from_millis(1500),
            rounds_kept: 1,
            updates_per_round: 2,
        }
    }
}

/// What a node knows of one path toward a server, via one neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub delay_us: u64,
    /// The lowest delay known to the server through this neighbour (its
    /// own lowest plus the link): at most `delay_us`.
    pub floor_us: u64,
    pub hops: u32,
    pub seq: u64,
    pub received: Instant,
    /// Receive wall time minus send wall time: the original's delay metric.
    pub clock_delay_us: i64,
    /// The nodes the route runs through, server first, the neighbour last.
    pub path: Vec<String>,
}

/// A chosen next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub via: String,
    pub delay_us: u64,
    pub hops: u32,
    /// The lowest delay known through `via` (its way told may be longer).
    pub floor_us: u64,
}

impl Route {
    fn from_entry(via: &str, e: &RouteEntry) -> Route {
        Route { via: via.to_string(), delay_us: e.delay_us, hops: e.hops, floor_us: e.floor_us }
    }
}

/// Where a stream request should go, with what the choice is based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A neighbour that already carries the stream.
    Carrier { via: String, delay_us: u64 },
    /// The best next hop toward a server that offers the stream.
    Server { server: String, route: Route },
}

impl Upstream {
    pub fn via(&self) -> &str {
        match self {
            Upstream::Carrier { via, .. } => via,
            Upstream::Server { route, .. } => &route.via,
        }
    }
}

/// Why no upstream exists for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoUpstream {
    /// No server offers it, and no neighbour carries it.
    UnknownStream,
    /// Servers offer it, but no usable neighbour leads to one.
    NoRoute,
}

const LINK_SAMPLES: usize = 8;

/// What a node last told a neighbour of its way to a server.
#[derive(Debug, Clone)]
struct Sent {
    /// The round it was told in.
    seq: u64,
    delay_us: u64,
    /// The lowest delay told with it.
    floor_us: u64,
    hops: u32,
    /// The route's path, or None: a withdrawal (no way that avoids it).
    path: Option<Vec<String>>,
    /// Updates sent in this round after the round's first copy.
    updates: u32,
}

/// Per-node route state: probe dedup, routes per (server, neighbour), link
/// delays, and which neighbours carry which streams.
#[derive(Debug, Clone)]
pub struct RouteTable {
    me: String,
    neighbours: Vec<String>,
    config: RoutingConfig,
    entries: BTreeMap<String, BTreeMap<String, RouteEntry>>,
    last_seq: BTreeMap<String, u64>,
    /// (server, neighbour) → what the neighbour was last told.
    sent: BTreeMap<(String, String), Sent>,
    /// Per server: the send time of its newest round, for updates sent
    /// between rounds.
    send_times: BTreeMap<String, u64>,
    /// Per server: when this node saw the first copy of its newest round.
    round_seen: BTreeMap<String, Instant>,
    dead: Vec<Dead>,
    notices_seen: VecDeque<(String, String, u64, bool)>,
    /// Servers reported failed: probes of theirs up to this sequence
    /// number (copies still on their way) are ignored.
    failed: BTreeMap<String, u64>,
    offers: BTreeMap<String, BTreeSet<String>>,
    link_rtt: BTreeMap<String, VecDeque<u64>>,
    carrying: BTreeMap<String, BTreeSet<String>>,
    down: BTreeSet<String>,
    counters: RouteCounters,
}

impl RouteTable {
    pub fn new(me: impl Into<String>, neighbours: Vec<String>, config: RoutingConfig) -> Self {
        RouteTable {
            me: me.into(),
            neighbours,
            config,
            entries: BTreeMap::new(),
            last_seq: BTreeMap::new(),
            sent: BTreeMap::new(),
            send_times: BTreeMap::new(),
            round_seen: BTreeMap::new(),
            dead: Vec::new(),
            notices_seen: VecDeque::new(),
            failed: BTreeMap::new(),
            offers: BTreeMap::new(),
            link_rtt: BTreeMap::new(),
            carrying: BTreeMap::new(),
            down: BTreeSet::new(),
            counters: RouteCounters::default(),
        }
    }

    /// What this table has told and heard so far.
    pub fn counters(&self) -> RouteCounters {
        self.counters
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn neighbours(&self) -> &[String] {
        &self.neighbours
    }

    /// The probe a server sends to each neighbour (the same copy for all;
    /// the driver sets `sender`).
    pub fn originate(&self, seq: u64, send_time_unix_us: u64, streams: Vec<String>) -> Vec<(String, Probe)> {
        self.live_neighbours()
            .map(|n| {
                let probe = Probe {
                    server: self.me.clone(),
                    seq,
                    send_time_unix_us,
                    hops: 1,
                    visited: vec![self.me.clone()],
                    path_delay_us: 0,
                    best_delay_us: 0,
                    streams: streams.clone(),
                    sender: self.me.clone(),
                    withdrawn: false,
                };
                (n.clone(), probe)
            })
            .collect()
    }

    fn live_neighbours(&self) -> impl Iterator<Item = &String> {
        self.neighbours.iter().filter(|n| !self.down.contains(*n))
    }

    /// Records a probe copy (or a withdrawal) and returns what to tell
    /// neighbours: at the first copy of a round, every neighbour its way
    /// (its refresh); later, a neighbour whose way changed (another path,
    /// hop count, or delay beyond the tie band) hears the change, and one
    /// that has no way left hears a withdrawal.
    pub fn on_probe(&mut self, probe: &Probe, now: Instant, now_unix_us: u64) -> Vec<(String, Probe)> {
        if probe.server == self.me || !self.neighbours.contains(&probe.sender) {
            return Vec::new();
        }
        if self.failed.get(&probe.server).is_some_and(|&floor| probe.seq <= floor) {
            return Vec::new();
        }
        if probe.visited.contains(&self.me) && !probe.withdrawn {
            return Vec::new();
        }
        let stale_after = self.config.stale_after;
        self.dead.retain(|d| now.saturating_duration_since(d.since) <= stale_after);
        if !probe.withdrawn && self.dead.iter().any(|d| d.cut.crossed_by(&probe.visited)) {
            return Vec::new();
        }
        // A way over a link not measured yet (it just came back, or the
        // node just started) has no known delay: taken as 0, it would look
        // shorter than any real way, and spread so. The next round, after
        // the first heartbeat answer, brings it again.
        let link_us = match self.link_delay_us(&probe.sender) {
            Some(us) => us,
            None if probe.withdrawn => 0,
            None => {
                self.counters.unmeasured += 1;
                return Vec::new();
            }
        };
        let delay_us = probe.path_delay_us + link_us;
        let floor_us = probe.best_delay_us.min(probe.path_delay_us) + link_us;
        // A copy of a round already seen is no fresher than that round's
        // first copy here: an update, or a copy that comes after its route
        // was dropped, must not keep a way to a server cut off alive past
        // the stale time.
        let newest = self.last_seq.get(&probe.server).copied().unwrap_or(0);
        let received = match self.round_seen.get(&probe.server) {
            Some(&seen) if probe.seq <= newest => seen.min(now),
            _ => now,
        };
        let per_server = self.entries.entry(probe.server.clone()).or_default();
        if probe.withdrawn {
            if per_server.get(&probe.sender).is_some_and(|old| old.seq <= probe.seq) {
                per_server.remove(&probe.sender);
            }
        } else {
            let entry = RouteEntry {
                delay_us,
                floor_us,
                hops: probe.hops,
                seq: probe.seq,
                received,
                clock_delay_us: now_unix_us as i64 - probe.send_time_unix_us as i64,
                path: probe.visited.clone(),
            };
            match per_server.get(&probe.sender) {
                Some(old) if old.seq > probe.seq => {}
                // An update within a round does not make the round any
                // younger: a route is as fresh as its round's first copy.
                Some(old) if old.seq == probe.seq => {
                    let received = old.received;
                    per_server.insert(probe.sender.clone(), RouteEntry { received, ..entry });
                }
                _ => {
                    per_server.insert(probe.sender.clone(), entry);
                }
            }
            self.offers.insert(probe.server.clone(), probe.streams.iter().cloned().collect());
        }

        let last = self.last_seq.entry(probe.server.clone()).or_insert(0);
        let new_round = probe.seq > *last && !probe.withdrawn;
        if new_round {
            *last = probe.seq;
            self.send_times.insert(probe.server.clone(), probe.send_time_unix_us);
            self.round_seen.insert(probe.server.clone(), now);
        }
        let round = self.last_seq[&probe.server];
        // The copy's path needs no refresh: it knows the way it just sent.
        let refresh: &[String] = if new_round { &probe.visited } else { &[] };
        self.tell(&probe.server, round, new_round, refresh, probe.send_time_unix_us, &probe.streams, now)
    }

    /// After a neighbour went down or a node failed: the updates and
    /// withdrawals that the lost routes call for, so that bad news travels
    /// at once rather than with the next round (or the stale timer).
    pub fn tell_changes(&mut self, now: Instant) -> Vec<(String, Probe)> {
        let servers: Vec<(String, u64)> = self.last_seq.iter().map(|(s, q)| (s.clone(), *q)).collect();
        let mut out = Vec::new();
        for (server, round) in servers {
            if self.failed.get(&server).is_some_and(|&floor| round < floor) {
                continue;
            }
            let streams: Vec<String> =
                self.offers.get(&server).map(|s| s.iter().cloned().collect()).unwrap_or_default();
            let sent_at = self.send_times.get(&server).copied().unwrap_or(0);
            out.extend(self.tell(&server, round, false, &[], sent_at, &streams, now));
        }
        out
    }

    /// What each live neighbour should hear of this node's way to `server`
    /// now (see [`RouteTable::on_probe`]).
    #[allow(clippy::too_many_arguments)]
    fn tell(
        &mut self,
        server: &str,
        round: u64,
        new_round: bool,
        known: &[String],
        send_time_unix_us: u64,
        streams: &[String],
        now: Instant,
    ) -> Vec<(String, Probe)> {
        let mut out = Vec::new();
        let live: Vec<String> = self.live_neighbours().cloned().collect();
        for n in live {
            let refresh = new_round && !known.contains(&n);
            let best = self.advertised(server, round, &n, now);
            let floor_us = best.as_ref().map_or(0, |(_, floor)| *floor);
            let best = best.map(|(entry, _)| entry);
            let key = (server.to_string(), n.clone());
            let prev = self.sent.get(&key);
            let updates = match prev {
                Some(p) if p.seq == round => p.updates,
                _ => 0,
            };
            let send = match (prev, &best) {
                (None, Some(_)) => true,
                (Some(_), Some(_)) if refresh => true,
                // Bad news always goes (a route believed where it no longer
                // runs makes requests loop); good news a few times a round,
                // the next round carries the rest.
                (Some(p), Some(b)) => {
                    changes(&self.config, p, b, floor_us)
                        && (updates < self.config.updates_per_round
                            || !improves(&self.config, (b.delay_us, b.hops), (p.delay_us, p.hops))
                            || floor_us > p.floor_us)
                }
                (Some(p), None) => p.path.is_some(),
                (None, None) => false,
            };
            if !send {
                continue;
            }
            let counted = if refresh { 0 } else { updates + 1 };
            let told = Sent {
                seq: round,
                delay_us: best.as_ref().map_or(0, |b| b.delay_us),
                floor_us,
                hops: best.as_ref().map_or(0, |b| b.hops),
                path: best.map(|b| b.path),
                updates: counted,
            };
            // A withdrawal names only its sender.
            let mut visited = told.path.clone().unwrap_or_default();
            visited.push(self.me.clone());
            let probe = Probe {
                server: server.to_string(),
                seq: round,
                send_time_unix_us,
                hops: if told.path.is_some() { told.hops + 1 } else { 0 },
                visited,
                path_delay_us: told.delay_us,
                best_delay_us: told.floor_us,
                streams: streams.to_vec(),
                sender: self.me.clone(),
                withdrawn: told.path.is_none(),
            };
            self.sent.insert(key, told);
            let counter = match (probe.withdrawn, refresh) {
                (true, _) => &mut self.counters.withdrawals,
                (false, true) => &mut self.counters.refreshes,
                (false, false) => &mut self.counters.updates,
            };
            *counter += 1;
            out.push((n, probe));
        }
        out
    }

    /// The route this node advertises to `to` in round `seq`: the best of
    /// the round's copies that did not come through `to`, and the lowest
    /// delay among them.
    fn advertised(&self, server: &str, seq: u64, to: &str, now: Instant) -> Option<(RouteEntry, u64)> {
        let candidates: Vec<Route> = self
            .fresh(server, now)
            .filter(|(_, e)| e.seq >= seq.saturating_sub(self.config.rounds_kept) && !e.path.iter().any(|p| p == to))
            .map(|(via, e)| Route::from_entry(via, e))
            .collect();
        let mut route = pick(&candidates, &self.config)?;
        let floor_us = candidates.iter().map(|c| c.floor_us).min().unwrap_or(route.floor_us);
        // Keep telling the way told before while the new pick is no clear
        // gain and the old one is still within the tie band of the lowest:
        // near-equal routes would otherwise swap with every measurement,
        // and every swap is an update.
        let before = self.sent.get(&(server.to_string(), to.to_string())).and_then(|s| s.path.as_ref()?.last());
        if let Some(kept) = before.and_then(|v| candidates.iter().find(|c| &c.via == v)) {
            let key = |r: &Route| (r.delay_us, r.hops);
            let eligible = kept.delay_us <= floor_us + tie_band(&self.config, floor_us);
            if eligible && !improves(&self.config, key(&route), key(kept)) {
                route = kept.clone();
            }
        }
        Some((self.entries.get(server)?.get(&route.via).cloned()?, floor_us))
    }

    /// Records one measured round trip to a neighbour.
    pub fn on_link_rtt(&mut self, neighbour: &str, rtt_us: u64) {
        let samples = self.link_rtt.entry(neighbour.to_string()).or_default();
        if samples.len() == LINK_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(rtt_us);
    }

    /// One-way link delay: half the lowest recent round trip (queueing
    /// only ever adds to a sample, so the minimum is the link).
    pub fn link_delay_us(&self, neighbour: &str) -> Option<u64> {
        self.link_rtt.get(neighbour)?.iter().min().map(|rtt| rtt / 2)
    }

    /// Records which streams a neighbour says it carries.
    pub fn set_carrying(&mut self, neighbour: &str, streams: impl IntoIterator<Item = String>) {
        self.carrying.insert(neighbour.to_string(), streams.into_iter().collect());
    }

    /// Whether `neighbour`'s last heartbeat answer said it carries
    /// `stream` (None: no answer since it came up).
    pub fn carries(&self, neighbour: &str, stream: &str) -> Option<bool> {
        self.carrying.get(neighbour).map(|s| s.contains(stream))
    }

    /// `neighbour` pruned its branch of `stream` here: it is taken as not
    /// carrying the stream until its next heartbeat answer says otherwise.
    /// (Otherwise a join just after the prune could be sent to it on its
    /// last answer's word, while its own new join comes here: each would
    /// wait for the other.)
    pub fn stopped_carrying(&mut self, neighbour: &str, stream: &str) {
        if let Some(streams) = self.carrying.get_mut(neighbour) {
            streams.remove(stream);
        }
    }

    /// A neighbour (or the link to it) is dead: forget every route through it.
    pub fn neighbour_down(&mut self, neighbour: &str) {
        self.down.insert(neighbour.to_string());
        for per_server in self.entries.values_mut() {
            per_server.remove(neighbour);
        }
        self.carrying.remove(neighbour);
        self.link_rtt.remove(neighbour);
        self.sent.retain(|(_, n), _| n != neighbour);
    }

    /// A neighbour answers again.
    pub fn neighbour_up(&mut self, neighbour: &str) {
        self.down.remove(neighbour);
    }

    pub fn is_down(&self, neighbour: &str) -> bool {
        self.down.contains(neighbour)
    }

    /// A node failed somewhere (the bootstrapper's notice): forget it as a
    /// server; if it is a neighbour, as a next hop too.
    pub fn node_failed(&mut self, node: &str, now: Instant) {
        // Copies of its last round may still be travelling, and a node
        // that comes back starts a new, higher sequence.
        let floor = self.last_seq.get(node).map_or(0, |s| s + 1);
        self.failed.insert(node.to_string(), floor);
        self.counters.failures_heard += 1;
        self.entries.remove(node);
        self.offers.remove(node);
        self.sent.retain(|(server, _), _| server != node);
        if self.neighbours.iter().any(|n| n == node) {
            self.neighbour_down(node);
        }
        self.learn_cut(Cut::Node(node.to_string()), now);
    }

    /// This node found its link to `neighbour` dead (after
    /// [`RouteTable::neighbour_down`]) or back (after
    /// [`RouteTable::neighbour_up`]): the notice to flood, one copy per
    /// live neighbour.
    pub fn announce_link(&mut self, neighbour: &str, up: bool, id: u64) -> Vec<(String, LinkNotice)> {
        let notice = LinkNotice { a: self.me.clone(), b: neighbour.to_string(), id, up, sender: self.me.clone() };
        self.remember_notice(&notice);
        self.counters.notices_started += 1;
        self.pass_on(&notice)
    }

    /// A link notice from a neighbour: the first copy is passed on to the
    /// other neighbours; a dead link takes every route through it along.
    /// The caller then sends what [`RouteTable::tell_changes`] returns.
    pub fn on_link_notice(&mut self, notice: &LinkNotice, now: Instant) -> Vec<(String, LinkNotice)> {
        if !self.neighbours.contains(&notice.sender) || !self.remember_notice(notice) {
            return Vec::new();
        }
        self.counters.notices_heard += 1;
        if notice.up {
            // Both ends live, and the link between them carries.
            self.dead.retain(|d| !d.cut.healed_by(&notice.a, &notice.b));
        } else {
            self.learn_cut(Cut::Link(notice.a.clone(), notice.b.clone()), now);
        }
        self.pass_on(notice)
    }

    /// Whether the notice is new (and now remembered).
    fn remember_notice(&mut self, notice: &LinkNotice) -> bool {
        let key = (notice.a.clone(), notice.b.clone(), notice.id, notice.up);
        if self.notices_seen.contains(&key) {
            return false;
        }
        if self.notices_seen.len() == NOTICES_KEPT {
            self.notices_seen.pop_front();
        }
        self.notices_seen.push_back(key);
        true
    }

    fn pass_on(&self, notice: &LinkNotice) -> Vec<(String, LinkNotice)> {
        self.live_neighbours()
            .filter(|n| **n != notice.sender && **n != notice.a && **n != notice.b)
            .map(|n| (n.clone(), LinkNotice { sender: self.me.clone(), ..notice.clone() }))
            .collect()
    }

    /// Forgets every route through `cut`, and ignores copies that crossed
    /// it from now on.
    fn learn_cut(&mut self, cut: Cut, now: Instant) {
        for per_server in self.entries.values_mut() {
            per_server.retain(|_, e| !cut.crossed_by(&e.path));
        }
        if self.dead.len() == NOTICES_KEPT {
            self.dead.remove(0);
        }
        self.dead.push(Dead { cut, since: now });
    }

    fn fresh<'a>(&'a self, server: &str, now: Instant) -> impl Iterator<Item = (&'a String, &'a RouteEntry)> {
        let stale_after = self.config.stale_after;
        self.entries.get(server).into_iter().flat_map(|m| m.iter()).filter(move |(via, e)| {
            now.saturating_duration_since(e.received) <= stale_after && !self.down.contains(*via)
        })
    }

    /// The best neighbour toward `server`, never one of `exclude` nor one
    /// whose way runs through one of them. Routes of the last
    /// [`RoutingConfig::rounds_kept`] rounds are preferred: an older one is
    /// taken only when no recent one is left (its newer copies may just
    /// have been lost).
    pub fn best_next_hop(&self, server: &str, now: Instant, exclude: &[&str]) -> Option<Route> {
        self.best_next_hop_avoiding(server, now, exclude, exclude)
    }

    /// [`RouteTable::best_next_hop`] with the next hops to skip
    /// (`not_via`) apart from the nodes no way may run through
    /// (`not_through`).
    pub fn best_next_hop_avoiding(
        &self,
        server: &str,
        now: Instant,
        not_via: &[&str],
        not_through: &[&str],
    ) -> Option<Route> {
        let oldest = self.last_seq.get(server).map_or(0, |s| s.saturating_sub(self.config.rounds_kept));
        let candidates = |recent_only: bool| -> Vec<Route> {
            self.fresh(server, now)
                .filter(|(via, e)| {
                    // A way's path ends with its neighbour.
                    !not_via.contains(&via.as_str())
                        && !e.path.iter().any(|p| not_through.contains(&p.as_str()))
                        && (!recent_only || e.seq >= oldest)
                })
                .map(|(via, e)| Route::from_entry(via, e))
                .collect()
        };
        pick(&candidates(true), &self.config).or_else(|| pick(&candidates(false), &self.config))
    }

    /// The route toward `server` through `via`, while fresh.
    pub fn route_via(&self, server: &str, via: &str, now: Instant) -> Option<Route> {
        self.fresh(server, now).find(|(v, _)| v.as_str() == via).map(|(v, e)| Route::from_entry(v, e))
    }

    /// Whether moving from `current` to `candidate` is worth it by the
    /// selection rule, with hysteresis so that noise never swings a tree
    /// back and forth: a lower delay by more than twice the tie band, or a
    /// delay within the band with fewer hops (hop counts are exact).
    pub fn clearly_better(&self, candidate: &Route, current: &Route) -> bool {
        let low = candidate.delay_us.min(current.delay_us);
        let band = tie_band(&self.config, low);
        if current.delay_us > candidate.delay_us + 2 * band {
            return true;
        }
        current.delay_us.abs_diff(candidate.delay_us) <= band && candidate.hops < current.hops
    }

    /// Whether `new` (delay, hops) is a clear gain over `old` by the
    /// selection rule: lower by more than the tie band, or fewer hops
    /// within it.
    pub fn improves_on(&self, new: (u64, u32), old: (u64, u32)) -> bool {
        improves(&self.config, new, old)
    }

    /// Whether any known server offers `stream`.
    pub fn offered(&self, stream: &str) -> bool {
        self.offers.values().any(|s| s.contains(stream))
    }

    /// Where to send a request for `stream`: the cheapest of a neighbour
    /// already carrying it and the best route toward a server offering it,
    /// never through a node in `exclude` (the request's path).
    pub fn upstream_for(&self, stream: &str, now: Instant, exclude: &[&str]) -> Result<Upstream, NoUpstream> {
        // Candidates are compared with the same rule as next hops: lowest
        // delay, fewer hops within the tie band.
        let mut options: Vec<Upstream> = Vec::new();
        for (via, streams) in &self.carrying {
            if streams.contains(stream) && !exclude.contains(&via.as_str()) && !self.down.contains(via) {
                let delay_us = self.link_delay_us(via).unwrap_or(0);
                options.push(Upstream::Carrier { via: via.clone(), delay_us });
            }
        }
        for (server, streams) in &self.offers {
            if !streams.contains(stream) {
                continue;
            }
            if let Some(route) = self.best_next_hop(server, now, exclude) {
                options.push(Upstream::Server { server: server.clone(), route });
            }
        }
        match choose(&options, upstream_key, &self.config) {
            Some(i) => Ok(options.swap_remove(i)),
            None if self.offered(stream) || self.carrying.values().any(|s| s.contains(stream)) => {
                Err(NoUpstream::NoRoute)
            }
            None => Err(NoUpstream::UnknownStream),
        }
    }

    /// What this node last told `to` of its way to `server`: the round, the
    /// delay (None: a withdrawal) and the updates sent in that round. For
    /// tracing.
    pub fn told(&self, server: &str, to: &str) -> Option<(u64, Option<u64>, u32)> {
        let s = self.sent.get(&(server.to_string(), to.to_string()))?;
        Some((s.seq, s.path.as_ref().map(|_| s.delay_us), s.updates))
    }

    /// The newest round seen from `server`.
    pub fn newest_round(&self, server: &str) -> Option<u64> {
        self.last_seq.get(server).copied()
    }

    /// Every fresh entry, for inspection: server → via → entry.
    pub fn entries(&self, now: Instant) -> BTreeMap<String, Vec<(String, RouteEntry)>> {
        self.entries
            .keys()
            .map(|s| (s.clone(), self.fresh(s, now).map(|(v, e)| (v.clone(), e.clone())).collect()))
            .collect()
    }
}

/// The route selection rule: lowest delay, but among routes whose delay is
/// within the tie tolerance of the lowest, fewest hops (then lowest delay,
/// then name, so the choice is deterministic).
pub fn pick(candidates: &[Route], config: &RoutingConfig) -> Option<Route> {
    choose(candidates, route_key, config).map(|i| candidates[i].clone())
}

/// How far above `low_us` a delay still ties with it.
pub fn tie_band(config: &RoutingConfig, low_us: u64) -> u64 {
    ((low_us as f64 * config.tie_ratio) as u64).max(config.tie_floor_us)
}

/// Whether `new` (delay, hops) is a clear gain over `old`: lower by more
/// than the tie band, or fewer hops within it.
fn improves(config: &RoutingConfig, new: (u64, u32), old: (u64, u32)) -> bool {
    let band = tie_band(config, new.0.min(old.0));
    new.0 + band < old.0 || (new.0.abs_diff(old.0) <= band && new.1 < old.1)
}

/// Whether a route differs from what was advertised enough to tell the
/// neighbour now rather than next round: another path (a route must never
/// be believed to run where it does not, or requests loop), another hop
/// count, or a delay beyond the tie band (smaller drifts are measurement
/// noise, and the next round carries them anyway).
fn changes(config: &RoutingConfig, sent: &Sent, now: &RouteEntry, floor_us: u64) -> bool {
    let band = tie_band(config, sent.delay_us.min(now.delay_us));
    let floor_band = tie_band(config, sent.floor_us.min(floor_us));
    sent.path.as_ref() != Some(&now.path)
        || sent.hops != now.hops
        || sent.delay_us.abs_diff(now.delay_us) > band
        || sent.floor_us.abs_diff(floor_us) > floor_band
}

/// What the selection rule reads of a candidate.
struct Key<'a> {
    delay_us: u64,
    /// The lowest delay known through it (≤ `delay_us`).
    floor_us: u64,
    hops: u32,
    via: &'a str,
}

fn upstream_key(o: &Upstream) -> Key<'_> {
    match o {
        Upstream::Carrier { via, delay_us } => Key { delay_us: *delay_us, floor_us: *delay_us, hops: 1, via },
        Upstream::Server { route, .. } => route_key(route),
    }
}

fn route_key(r: &Route) -> Key<'_> {
    Key { delay_us: r.delay_us, floor_us: r.floor_us.min(r.delay_us), hops: r.hops, via: &r.via }
}

/// The rule of [`pick`] over any candidates; returns the index of the
/// chosen one. The tie band is measured from the lowest delay known
/// through any candidate (a neighbour's own lowest plus the link), not
/// from the lowest way told: a neighbour's way told is its own pick, up to
/// its band above its lowest, and a band over bands would compound hop by
/// hop. Should no way told fall within the band (a lowest already gone
/// stale elsewhere), the band is measured from the lowest way told.
fn choose<T>(candidates: &[T], key: impl for<'a> Fn(&'a T) -> Key<'a>, config: &RoutingConfig) -> Option<usize> {
    let keys: Vec<Key> = candidates.iter().map(&key).collect();
    let floor = keys.iter().map(|k| k.floor_us).min()?;
    let lowest_told = keys.iter().map(|k| k.delay_us).min()?;
    let best_within = |low: u64| {
        let limit = low + tie_band(config, low);
        (0..keys.len())
            .filter(|&i| keys[i].delay_us <= limit)
            .min_by_key(|&i| (keys[i].hops, keys[i].delay_us, keys[i].via))
    };
    best_within(floor).or_else(|| best_within(lowest_told))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(via: &str, delay_us: u64, hops: u32) -> Route {
        Route { via: via.into(), delay_us, hops, floor_us: delay_us }
    }

    fn cfg() -> RoutingConfig {
        RoutingConfig { tie_floor_us: 0, ..RoutingConfig::default() }
    }

    #[test]
    fn only_a_clear_win_is_worth_moving_for() {
        let t = RouteTable::new("o3", vec!["o2".into(), "o9".into()], cfg());
        // Tie band 10% of the lower delay: 1 ms at 10 ms.
        assert!(t.clearly_better(&route("o9", 10_000, 3), &route("o2", 31_000, 2)));
        assert!(!t.clearly_better(&route("o9", 10_000, 3), &route("o2", 11_900, 2)), "within twice the band");
        assert!(t.clearly_better(&route("o9", 10_500, 2), &route("o2", 10_000, 3)), "same delay, fewer hops");
        assert!(!t.clearly_better(&route("o9", 10_000, 3), &route("o2", 10_500, 2)), "same delay, more hops");
        assert!(!t.clearly_better(&route("o9", 10_000, 2), &route("o2", 10_000, 2)));
    }

    #[test]
    fn lowest_delay_wins_outside_the_tie_band() {
        let r = pick(&[route("a", 10_000, 1), route("b", 20_000, 5)], &cfg()).unwrap();
        assert_eq!(r.via, "a");
        let r = pick(&[route("a", 11_500, 1), route("b", 10_000, 5)], &cfg()).unwrap();
        assert_eq!(r.via, "b", "15% apart is not a tie");
    }

    #[test]
    fn within_ten_percent_fewer_hops_wins() {
        let r = pick(&[route("a", 10_900, 2), route("b", 10_000, 4)], &cfg()).unwrap();
        assert_eq!(r.via, "a");
        let r = pick(&[route("a", 10_000, 3), route("b", 10_000, 3)], &cfg()).unwrap();
        assert_eq!(r.via, "a", "full tie falls back to name");
    }

    #[test]
    fn the_tie_band_is_measured_from_the_lowest_known_not_the_lowest_told() {
        // b told a way of 10.9 ms (fewer hops won at b) but knows one of
        // 10 ms: a's 11.5 ms is 15% over the true lowest, no tie.
        let a = route("a", 11_500, 2);
        let b = Route { floor_us: 10_000, ..route("b", 10_900, 5) };
        assert_eq!(pick(&[a.clone(), b.clone()], &cfg()).unwrap().via, "b");
        // Without b's lowest the band would run from 10.9 ms, and a would
        // win on hops: the band would compound hop by hop.
        let b_told_only = route("b", 10_900, 5);
        assert_eq!(pick(&[a, b_told_only], &cfg()).unwrap().via, "a");
    }

    #[test]
    fn a_node_tells_its_lowest_with_the_way_it_chose() {
        let now = Instant::now();
        let mut t = RouteTable::new("o3", vec!["o1".into(), "o2".into(), "o9".into()], cfg());
        t.on_link_rtt("o1", 2_000);
        t.on_link_rtt("o2", 2_000);
        // By o1: 10 ms, 6 hops; by o2: 10.5 ms, 3 hops. o3 takes o2's
        // (within the band, fewer hops) and tells o9 so, with 10 ms + link
        // as its lowest.
        t.on_probe(&probe("s1", 1, "o1", &["s1", "a", "b", "c", "d", "o1"], 6, 9_000), now, 0);
        let out = t.on_probe(&probe("s1", 1, "o2", &["s1", "e", "o2"], 3, 9_500), now, 0);
        let told: Vec<&Probe> = out.iter().filter(|(n, _)| n == "o9").map(|(_, p)| p).collect();
        let last = t.on_probe(&probe("s1", 1, "o2", &["s1", "e", "o2"], 3, 9_500), now, 0);
        assert!(last.is_empty(), "nothing new to tell: {last:?}");
        let p = told.last().expect("o9 hears o3's way");
        assert_eq!(p.visited.last().map(String::as_str), Some("o3"));
        assert_eq!(p.visited[p.visited.len() - 2], "o2", "the way chosen: fewer hops");
        assert_eq!((p.path_delay_us, p.best_delay_us), (10_500, 10_000));
    }

    #[test]
    fn tie_floor_absorbs_measurement_noise() {
        let c = RoutingConfig { tie_floor_us: 500, ..RoutingConfig::default() };
        let r = pick(&[route("a", 400, 3), route("b", 100, 4)], &c).unwrap();
        assert_eq!(r.via, "a");
    }

    fn probe(server: &str, seq: u64, sender: &str, visited: &[&str], hops: u32, delay: u64) -> Probe {
        Probe {
            server: server.into(),
            seq,
            send_time_unix_us: 1_000,
            hops,
            visited: visited.iter().map(|s| s.to_string()).collect(),
            path_delay_us: delay,
            best_delay_us: delay,
            streams: vec!["test".into()],
            sender: sender.into(),
            withdrawn: false,
        }
    }

    fn table(me: &str, neighbours: &[&str]) -> RouteTable {
        crate::testing::table_with(me, neighbours, cfg())
    }

    #[test]
    fn forwards_each_probe_once_and_never_back() {
        let now = Instant::now();
        let mut t = table("o2", &["s1", "o3", "o9"]);
        let out = t.on_probe(&probe("s1", 1, "s1", &["s1"], 1, 0), now, 2_000);
        let to: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(to, ["o3", "o9"]);
        assert!(out.iter().all(|(_, p)| p.visited == ["s1", "o2"] && p.hops == 2 && p.sender == "o2"));
        // The same sequence number via another neighbour: recorded, not forwarded.
        let again = t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 0), now, 2_000);
        assert!(again.is_empty());
        assert_eq!(t.entries(now)["s1"].len(), 2);
        // A newer one is forwarded again.
        assert_eq!(t.on_probe(&probe("s1", 2, "s1", &["s1"], 1, 0), now, 2_000).len(), 2);
        // An old one is not.
        assert!(t.on_probe(&probe("s1", 1, "s1", &["s1"], 1, 0), now, 2_000).is_empty());
    }

    #[test]
    fn a_copy_over_a_link_not_measured_yet_is_not_learnt() {
        let now = Instant::now();
        let mut t = RouteTable::new("o3", vec!["o2".into(), "o9".into()], cfg());
        t.on_link_rtt("o9", 2_000);
        // The o2 link just came back: its delay is unknown, and 0 would make
        // this the lowest way by far.
        assert!(t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 3_000), now, 0).is_empty());
        assert!(t.route_via("s1", "o2", now).is_none());
        assert_eq!(t.counters().unmeasured, 1);
        t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 9_000), now, 0);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap(), route("o9", 10_000, 2));
        // Measured, its next copy is learnt with the link counted.
        t.on_link_rtt("o2", 20_000);
        t.on_probe(&probe("s1", 2, "o2", &["s1", "o2"], 2, 3_000), now, 0);
        assert_eq!(t.route_via("s1", "o2", now).map(|r| r.delay_us), Some(13_000));
    }

    #[test]
    fn delay_accumulates_measured_links_not_clocks() {
        let now = Instant::now();
        let mut t = RouteTable::new("o3", vec!["o2".into(), "o9".into()], cfg());
        t.on_link_rtt("o2", 10_000);
        t.on_link_rtt("o2", 8_000);
        t.on_link_rtt("o9", 2_000);
        // Send time from a clock far in the future: must not matter.
        let mut p = probe("s1", 1, "o2", &["s1", "o2"], 2, 3_000);
        p.send_time_unix_us = u64::MAX / 4;
        t.on_probe(&p, now, 0);
        t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 9_000), now, 0);
        let e = t.entries(now);
        let via_o2 = &e["s1"].iter().find(|(v, _)| v == "o2").unwrap().1;
        assert_eq!(via_o2.delay_us, 7_000);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap(), route("o2", 7_000, 2));
    }

    #[test]
    fn a_later_copy_that_improves_the_round_is_passed_on_as_an_update() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9", "o4"]);
        // Round 1's first copy comes the slow way.
        let out = t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 50_000), now, 0);
        let to: Vec<(&str, u64)> = out.iter().map(|(n, p)| (n.as_str(), p.path_delay_us)).collect();
        assert_eq!(to, [("o2", 50_000), ("o4", 50_000)], "never back to o9");
        // Its fast copy follows: o4 and o9 hear the better route, o2 (on its
        // path) does not.
        let out = t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        let to: Vec<(&str, u64, u32)> = out.iter().map(|(n, p)| (n.as_str(), p.path_delay_us, p.hops)).collect();
        assert_eq!(to, [("o9", 1_000, 3), ("o4", 1_000, 3)]);
        assert!(out.iter().all(|(_, p)| p.visited == ["s1", "o2", "o3"] && p.sender == "o3" && !p.withdrawn));
        // The same copy again changes nothing, so nothing is sent.
        assert!(t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 1_000), now, 0).is_empty());
        // Round 2 starts the slow way again: the fast way of round 1 is
        // still told (a copy late or lost is no news), o9 is not told back.
        let out = t.on_probe(&probe("s1", 2, "o9", &["s1", "o9"], 2, 50_000), now, 0);
        let to: Vec<(&str, u64)> = out.iter().map(|(n, p)| (n.as_str(), p.path_delay_us)).collect();
        assert_eq!(to, [("o2", 50_000), ("o4", 1_000)]);
    }

    #[test]
    fn a_way_lost_is_withdrawn_and_a_withdrawal_forgets_the_route() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        let out = t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        assert_eq!(out.len(), 1, "o9 hears the way via o2");
        t.neighbour_down("o2");
        let out = t.tell_changes(now);
        assert_eq!(out.len(), 1);
        let (to, w) = &out[0];
        assert_eq!((to.as_str(), w.withdrawn, w.server.as_str(), w.seq), ("o9", true, "s1", 1));
        assert!(t.tell_changes(now).is_empty(), "said once");
        assert_eq!(
            t.counters(),
            RouteCounters { refreshes: 1, withdrawals: 1, ..Default::default() },
            "one refresh to o9, then its withdrawal"
        );

        // At the receiving end.
        let mut u = table("o9", &["o3", "o8"]);
        u.on_probe(&probe("s1", 1, "o3", &["s1", "o2", "o3"], 3, 2_000), now, 0);
        assert_eq!(u.best_next_hop("s1", now, &[]).unwrap().via, "o3");
        let mut w = w.clone();
        w.sender = "o3".into();
        u.on_probe(&w, now, 0);
        assert_eq!(u.best_next_hop("s1", now, &[]), None);
    }

    #[test]
    fn near_equal_ways_do_not_swap_with_every_copy() {
        let now = Instant::now();
        let mut t = table("o3", &["o1", "o2", "o4"]);
        t.on_probe(&probe("s1", 1, "o1", &["s1", "o1"], 2, 10_000), now, 0);
        // A way 3% faster with the same hops: no clear gain, no update.
        assert!(t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 9_700), now, 0).iter().all(|(n, _)| n != "o4"));
        // Next round, whichever copy comes first, o4 keeps hearing the way via o1.
        let out = t.on_probe(&probe("s1", 2, "o2", &["s1", "o2"], 2, 9_700), now, 0);
        let p = &out.iter().find(|(n, _)| n == "o4").unwrap().1;
        assert_eq!(p.visited, ["s1", "o1", "o3"]);
    }

    #[test]
    fn a_link_down_notice_kills_the_routes_through_it_until_it_is_back() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9", "o4"]);
        t.on_probe(&probe("s1", 5, "o2", &["s1", "x", "o2"], 3, 1_000), now, 0);
        t.on_probe(&probe("s1", 5, "o9", &["s1", "y", "o9"], 3, 9_000), now, 0);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o2");
        let notice = LinkNotice { a: "x".into(), b: "s1".into(), id: 7, up: false, sender: "o2".into() };
        let out = t.on_link_notice(&notice, now);
        let to: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(to, ["o9", "o4"], "passed on, not back");
        assert!(out.iter().all(|(_, n)| n.sender == "o3" && n.id == 7 && !n.up));
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9", "the way through x-s1 is gone");
        let told = t.tell_changes(now);
        assert!(told.iter().any(|(n, p)| n == "o4" && p.visited == ["s1", "y", "o9", "o3"]), "{told:?}");
        let again = LinkNotice { sender: "o9".into(), ..notice.clone() };
        assert!(t.on_link_notice(&again, now).is_empty(), "a notice is passed on once");
        // Copies that crossed the dead link, of any round, are ignored...
        t.on_probe(&probe("s1", 9, "o2", &["s1", "x", "o2"], 3, 1_000), now, 0);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9");
        // ... until the link is said to be back.
        let back = LinkNotice { id: 8, up: true, ..notice.clone() };
        assert_eq!(t.on_link_notice(&back, now).len(), 2);
        assert_eq!((t.counters().notices_heard, t.counters().notices_started), (2, 0), "each notice counted once");
        t.announce_link("o4", false, 9);
        assert_eq!(t.counters().notices_started, 1);
        t.on_probe(&probe("s1", 10, "o2", &["s1", "x", "o2"], 3, 1_000), now, 0);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o2");
    }

    #[test]
    fn a_failed_node_takes_the_routes_through_it_along() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.on_probe(&probe("s1", 5, "o2", &["s1", "x", "o2"], 3, 1_000), now, 0);
        t.on_probe(&probe("s1", 5, "o9", &["s1", "y", "o9"], 3, 9_000), now, 0);
        t.node_failed("x", now);
        assert_eq!(t.counters().failures_heard, 1);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9");
        assert_eq!(t.best_next_hop("s1", now, &["y"]), None, "no next hop whose path crosses the request's");
    }

    #[test]
    fn an_update_does_not_make_its_round_younger() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.on_probe(&probe("s1", 1, "o2", &["s1", "a", "o2"], 3, 9_000), now, 0);
        let later = now + Duration::from_millis(1_000);
        t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 1_000), later, 0);
        let past_stale = now + cfg().stale_after + Duration::from_millis(1);
        assert_eq!(t.best_next_hop("s1", past_stale, &[]), None);
        // Nor does a copy of the round through a neighbour first heard
        // later (a way told by update, or told again after it was dropped).
        t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 2_000), later, 0);
        assert_eq!(t.best_next_hop("s1", past_stale, &[]), None, "as old as the round");
        assert_eq!(t.best_next_hop("s1", later, &[]).unwrap().via, "o2");
    }

    #[test]
    fn fewer_hops_within_the_band_is_an_update_and_updates_are_bounded() {
        let now = Instant::now();
        let mut t = table("o3", &["o1", "o2", "o4"]);
        let out = t.on_probe(&probe("s1", 7, "o1", &["s1", "x", "y", "o1"], 4, 10_000), now, 0);
        assert!(out.iter().any(|(n, p)| n == "o4" && p.hops == 5));
        // Slower by 5%, but two hops fewer: the tie rule prefers it.
        let out = t.on_probe(&probe("s1", 7, "o2", &["s1", "o2"], 2, 10_500), now, 0);
        let p = &out.iter().find(|(n, _)| n == "o4").unwrap().1;
        assert_eq!((p.hops, p.path_delay_us), (3, 10_500));
        // A neighbour that keeps changing its mind is heard a bounded
        // number of times a round.
        let mut sent = 0;
        for d in 0..10u64 {
            let out = t.on_probe(&probe("s1", 7, "o2", &["s1", "o2"], 2, 9_000 - d * 500), now, 0);
            sent += out.iter().filter(|(n, _)| n == "o4").count();
        }
        assert_eq!(sent, 1, "{} updates a round after the first copy", cfg().updates_per_round);
        assert_eq!(t.counters().updates, 2 + 2, "two to o4, and the same two to o1");
    }

    #[test]
    fn a_copy_that_already_went_through_this_node_is_ignored() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        assert!(t.on_probe(&probe("s1", 1, "o2", &["s1", "o3", "o2"], 3, 1_000), now, 0).is_empty());
        assert_eq!(t.best_next_hop("s1", now, &[]), None);
    }

    #[test]
    fn a_failed_server_is_not_brought_back_by_copies_still_on_their_way() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.on_probe(&probe("s1", 5, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        t.node_failed("s1", now);
        assert_eq!(t.best_next_hop("s1", now, &[]), None);
        for seq in [5, 6] {
            assert!(t.on_probe(&probe("s1", seq, "o9", &["s1", "o9"], 2, 1_000), now, 0).is_empty());
            assert_eq!(t.best_next_hop("s1", now, &[]), None, "round {seq} is from before the failure");
            assert!(!t.offered("test"));
        }
        // Restarted, it probes with a higher sequence: welcome back.
        assert_eq!(t.on_probe(&probe("s1", 1_000, "o9", &["s1", "o9"], 2, 1_000), now, 0).len(), 1);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9");
    }

    #[test]
    fn a_route_rounds_behind_is_used_only_when_nothing_newer_is_left() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.config.rounds_kept = 1;
        t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        t.on_probe(&probe("s1", 3, "o9", &["s1", "o9"], 2, 5_000), now, 0);
        // o2 passed on neither round 2 nor 3: its way may now run through
        // this node.
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9");
        t.neighbour_down("o9");
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o2", "better than none");
    }

    #[test]
    fn stale_and_dead_routes_are_not_used() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 2, 0), now, 0);
        t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 3, 0), now, 0);
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o2");
        t.neighbour_down("o2");
        assert_eq!(t.best_next_hop("s1", now, &[]).unwrap().via, "o9");
        let later = now + Duration::from_secs(10);
        assert_eq!(t.best_next_hop("s1", later, &[]), None);
    }

    #[test]
    fn upstream_prefers_a_near_carrier_and_names_why_none() {
        let now = Instant::now();
        let mut t = table("o5", &["o4", "o6"]);
        assert_eq!(t.upstream_for("test", now, &[]), Err(NoUpstream::UnknownStream));
        t.on_probe(&probe("s1", 1, "o4", &["s1", "o2", "o3", "o4"], 4, 0), now, 0);
        assert_eq!(t.upstream_for("nope", now, &[]), Err(NoUpstream::UnknownStream));
        assert_eq!(t.upstream_for("test", now, &["o4"]), Err(NoUpstream::NoRoute));
        let up = t.upstream_for("test", now, &[]).unwrap();
        assert!(matches!(up, Upstream::Server { ref server, .. } if server == "s1"));
        t.set_carrying("o6", ["test".to_string()]);
        assert_eq!(t.upstream_for("test", now, &[]).unwrap().via(), "o6");
        assert_eq!(t.upstream_for("test", now, &["o6"]).unwrap().via(), "o4");
        // o6 pruned its branch here: its last heartbeat's word is void.
        t.stopped_carrying("o6", "test");
        assert_eq!(t.upstream_for("test", now, &[]).unwrap().via(), "o4");
    }

    #[test]
    fn the_nearer_server_by_the_hop_rule_roots_the_tree() {
        let now = Instant::now();
        let mut t = crate::testing::table_with(
            "o5",
            &["o4"],
            RoutingConfig { tie_floor_us: 20_000, ..RoutingConfig::default() },
        );
        // s1 is slightly faster but within the tie band; s2 has fewer hops.
        t.on_probe(&probe("s1", 1, "o4", &["s1", "o2", "o3", "o4"], 4, 1_000), now, 0);
        t.on_probe(&probe("s2", 1, "o4", &["s2", "o8", "o4"], 3, 3_000), now, 0);
        let up = t.upstream_for("test", now, &[]).unwrap();
        assert!(matches!(up, Upstream::Server { ref server, .. } if server == "s2"), "{up:?}");
    }
}
