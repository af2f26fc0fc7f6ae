//! STATUS probes and the route table built from them.
//!
//! Every server floods a probe each period. A node records, per server and
//! per neighbour, the freshest copy: the accumulated path delay (the sum of
//! measured one-way link delays, so it stays right when clocks differ), the
//! hop count and the send time (the original's clock-based metric, kept for
//! display). It forwards each (server, seq) once, to neighbours the copy has
//! not visited, advertising its own best delay (never one learnt from the
//! neighbour it sends to). The best next hop toward a server has the lowest
//! delay; when delays are within 10% of each other, fewer hops wins. A
//! server the bootstrapper reports failed is forgotten, and copies of its
//! last round still travelling are ignored.

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
    /// Streams the server offers.
    pub streams: Vec<String>,
    /// The neighbour that sent this copy.
    pub sender: String,
}

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
    /// A route learnt from a probe this many rounds older than the newest
    /// one seen from its server is used only when no newer one is left:
    /// its neighbour did not pass the newer rounds on (it lost its own way
    /// to the server, or its way now runs through this node). Off
    /// (u64::MAX) by default; overlay-sim explores it.
    pub rounds_kept: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            tie_ratio: 0.10,
            tie_floor_us: 500,
            stale_after: Duration::from_millis(1500),
            rounds_kept: u64::MAX,
        }
    }
}

/// What a node knows of one path toward a server, via one neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub delay_us: u64,
    pub hops: u32,
    pub seq: u64,
    pub received: Instant,
    /// Receive wall time minus send wall time: the original's delay metric.
    pub clock_delay_us: i64,
}

/// A chosen next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub via: String,
    pub delay_us: u64,
    pub hops: u32,
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

/// Per-node route state: probe dedup, routes per (server, neighbour), link
/// delays, and which neighbours carry which streams.
#[derive(Debug, Clone)]
pub struct RouteTable {
    me: String,
    neighbours: Vec<String>,
    config: RoutingConfig,
    entries: BTreeMap<String, BTreeMap<String, RouteEntry>>,
    last_seq: BTreeMap<String, u64>,
    /// Servers reported failed: probes of theirs up to this sequence
    /// number (copies still on their way) are ignored.
    failed: BTreeMap<String, u64>,
    offers: BTreeMap<String, BTreeSet<String>>,
    link_rtt: BTreeMap<String, VecDeque<u64>>,
    carrying: BTreeMap<String, BTreeSet<String>>,
    down: BTreeSet<String>,
}

impl RouteTable {
    pub fn new(me: impl Into<String>, neighbours: Vec<String>, config: RoutingConfig) -> Self {
        RouteTable {
            me: me.into(),
            neighbours,
            config,
            entries: BTreeMap::new(),
            last_seq: BTreeMap::new(),
            failed: BTreeMap::new(),
            offers: BTreeMap::new(),
            link_rtt: BTreeMap::new(),
            carrying: BTreeMap::new(),
            down: BTreeSet::new(),
        }
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
                    streams: streams.clone(),
                    sender: self.me.clone(),
                };
                (n.clone(), probe)
            })
            .collect()
    }

    fn live_neighbours(&self) -> impl Iterator<Item = &String> {
        self.neighbours.iter().filter(|n| !self.down.contains(*n))
    }

    /// Records a probe copy and returns the copies to forward (at most one
    /// per neighbour, and only for the first copy of each sequence number).
    pub fn on_probe(&mut self, probe: &Probe, now: Instant, now_unix_us: u64) -> Vec<(String, Probe)> {
        if probe.server == self.me || !self.neighbours.contains(&probe.sender) {
            return Vec::new();
        }
        if self.failed.get(&probe.server).is_some_and(|&floor| probe.seq <= floor) {
            return Vec::new();
        }
        let delay_us = probe.path_delay_us + self.link_delay_us(&probe.sender).unwrap_or(0);
        let entry = RouteEntry {
            delay_us,
            hops: probe.hops,
            seq: probe.seq,
            received: now,
            clock_delay_us: now_unix_us as i64 - probe.send_time_unix_us as i64,
        };
        let per_server = self.entries.entry(probe.server.clone()).or_default();
        match per_server.get(&probe.sender) {
            Some(old) if old.seq > probe.seq => {}
            _ => {
                per_server.insert(probe.sender.clone(), entry);
            }
        }
        self.offers.insert(probe.server.clone(), probe.streams.iter().cloned().collect());

        let last = self.last_seq.entry(probe.server.clone()).or_insert(0);
        if probe.seq <= *last || probe.visited.contains(&self.me) {
            return Vec::new();
        }
        *last = probe.seq;

        let mut visited = probe.visited.clone();
        visited.push(self.me.clone());
        let mut out = Vec::new();
        for n in self.live_neighbours() {
            if probe.visited.contains(n) {
                continue;
            }
            let Some(best) = self.best_next_hop(&probe.server, now, &[n.as_str()]) else {
                continue;
            };
            out.push((
                n.clone(),
                Probe {
                    server: probe.server.clone(),
                    seq: probe.seq,
                    send_time_unix_us: probe.send_time_unix_us,
                    hops: best.hops + 1,
                    visited: visited.clone(),
                    path_delay_us: best.delay_us,
                    streams: probe.streams.clone(),
                    sender: self.me.clone(),
                },
            ));
        }
        out
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

    /// A neighbour (or the link to it) is dead: forget every route through it.
    pub fn neighbour_down(&mut self, neighbour: &str) {
        self.down.insert(neighbour.to_string());
        for per_server in self.entries.values_mut() {
            per_server.remove(neighbour);
        }
        self.carrying.remove(neighbour);
        self.link_rtt.remove(neighbour);
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
    pub fn node_failed(&mut self, node: &str) {
        // Copies of its last round may still be travelling, and a node
        // that comes back starts a new, higher sequence.
        let floor = self.last_seq.get(node).map_or(0, |s| s + 1);
        self.failed.insert(node.to_string(), floor);
        self.entries.remove(node);
        self.offers.remove(node);
        if self.neighbours.iter().any(|n| n == node) {
            self.neighbour_down(node);
        }
    }

    fn fresh<'a>(&'a self, server: &str, now: Instant) -> impl Iterator<Item = (&'a String, &'a RouteEntry)> {
        let stale_after = self.config.stale_after;
        self.entries.get(server).into_iter().flat_map(|m| m.iter()).filter(move |(via, e)| {
            now.saturating_duration_since(e.received) <= stale_after && !self.down.contains(*via)
        })
    }

    /// The best neighbour toward `server`, never one of `exclude`. Routes
    /// of the last [`RoutingConfig::rounds_kept`] rounds are preferred:
    /// an older one is taken only when no recent one is left (its newer
    /// copies may just have been lost).
    pub fn best_next_hop(&self, server: &str, now: Instant, exclude: &[&str]) -> Option<Route> {
        let oldest = self.last_seq.get(server).map_or(0, |s| s.saturating_sub(self.config.rounds_kept));
        let candidates = |recent_only: bool| -> Vec<Route> {
            self.fresh(server, now)
                .filter(|(via, e)| !exclude.contains(&via.as_str()) && (!recent_only || e.seq >= oldest))
                .map(|(via, e)| Route { via: via.clone(), delay_us: e.delay_us, hops: e.hops })
                .collect()
        };
        pick(&candidates(true), &self.config).or_else(|| pick(&candidates(false), &self.config))
    }

    /// The route toward `server` through `via`, while fresh.
    pub fn route_via(&self, server: &str, via: &str, now: Instant) -> Option<Route> {
        self.fresh(server, now).find(|(v, _)| v.as_str() == via).map(|(v, e)| Route {
            via: v.clone(),
            delay_us: e.delay_us,
            hops: e.hops,
        })
    }

    /// Whether moving from `current` to `candidate` is worth it by the
    /// selection rule, with hysteresis so that noise never swings a tree
    /// back and forth: a lower delay by more than twice the tie band, or a
    /// delay within the band with fewer hops (hop counts are exact).
    pub fn clearly_better(&self, candidate: &Route, current: &Route) -> bool {
        let low = candidate.delay_us.min(current.delay_us);
        let band = ((low as f64 * self.config.tie_ratio) as u64).max(self.config.tie_floor_us);
        if current.delay_us > candidate.delay_us + 2 * band {
            return true;
        }
        current.delay_us.abs_diff(candidate.delay_us) <= band && candidate.hops < current.hops
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

fn upstream_key(o: &Upstream) -> (u64, u32, &str) {
    match o {
        Upstream::Carrier { via, delay_us } => (*delay_us, 1, via.as_str()),
        Upstream::Server { route, .. } => (route.delay_us, route.hops, route.via.as_str()),
    }
}

fn route_key(r: &Route) -> (u64, u32, &str) {
    (r.delay_us, r.hops, r.via.as_str())
}

/// The rule of [`pick`] over any candidates, given (delay, hops, name) of
/// each; returns the index of the chosen one.
fn choose<T>(
    candidates: &[T],
    key: impl for<'a> Fn(&'a T) -> (u64, u32, &'a str),
    config: &RoutingConfig,
) -> Option<usize> {
    let min = candidates.iter().map(|c| key(c).0).min()?;
    let tolerance = ((min as f64 * config.tie_ratio) as u64).max(config.tie_floor_us);
    (0..candidates.len()).filter(|&i| key(&candidates[i]).0 <= min + tolerance).min_by(|&a, &b| {
        let (da, ha, na) = key(&candidates[a]);
        let (db, hb, nb) = key(&candidates[b]);
        (ha, da, na).cmp(&(hb, db, nb))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(via: &str, delay_us: u64, hops: u32) -> Route {
        Route { via: via.into(), delay_us, hops }
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
            streams: vec!["test".into()],
            sender: sender.into(),
        }
    }

    fn table(me: &str, neighbours: &[&str]) -> RouteTable {
        RouteTable::new(me, neighbours.iter().map(|s| s.to_string()).collect(), cfg())
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
    fn delay_accumulates_measured_links_not_clocks() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
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
    fn advertises_its_best_but_not_back_to_where_it_came_from() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9", "o4"]);
        t.on_probe(&probe("s1", 1, "o9", &["s1", "o9"], 2, 50_000), now, 0);
        t.on_probe(&probe("s1", 2, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        let out = t.on_probe(&probe("s1", 3, "o9", &["s1", "o9"], 2, 50_000), now, 0);
        let to_o4 = &out.iter().find(|(n, _)| n == "o4").unwrap().1;
        assert_eq!(to_o4.path_delay_us, 1_000, "o4 hears o3's best route, via o2");
        let to_o2 = &out.iter().find(|(n, _)| n == "o2").unwrap().1;
        assert_eq!(to_o2.path_delay_us, 50_000, "o2 never hears its own route back");
    }

    #[test]
    fn a_failed_server_is_not_brought_back_by_copies_still_on_their_way() {
        let now = Instant::now();
        let mut t = table("o3", &["o2", "o9"]);
        t.on_probe(&probe("s1", 5, "o2", &["s1", "o2"], 2, 1_000), now, 0);
        t.node_failed("s1");
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
    }

    #[test]
    fn the_nearer_server_by_the_hop_rule_roots_the_tree() {
        let now = Instant::now();
        let mut t = RouteTable::new(
            "o5",
            vec!["o4".into()],
            RoutingConfig { tie_floor_us: 20_000, ..RoutingConfig::default() },
        );
        // s1 is slightly faster but within the tie band; s2 has fewer hops.
        t.on_probe(&probe("s1", 1, "o4", &["s1", "o2", "o3", "o4"], 4, 1_000), now, 0);
        t.on_probe(&probe("s2", 1, "o4", &["s2", "o8", "o4"], 3, 3_000), now, 0);
        let up = t.upstream_for("test", now, &[]).unwrap();
        assert!(matches!(up, Upstream::Server { ref server, .. } if server == "s2"), "{up:?}");
    }
}
