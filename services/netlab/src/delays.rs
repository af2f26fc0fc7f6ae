//! Delays of the overlay as the lab file sets them, and the next hop the
//! overlay's route rule should choose toward each server: what the lab
//! tests compare `onode inspect` with, and what `netlab validate --routes`
//! prints.
//!
//! A node measures a neighbour's link delay as half the round trip of its
//! heartbeats, so the delay of overlay link X-Y as X sees it is half the
//! sum of the one-way delays along the underlay path from X to Y's address
//! and back to X's source address (an overlay link may cross routers).
//!
//! The rule (overlay-core's routing, whose knobs and choice this module
//! uses): each node advertises its chosen
//! route; a node's candidates are its neighbours' advertised routes plus
//! the link to them; it picks the lowest delay, except that routes within
//! 10% of the lowest (or within the tie floor, 0.5 ms) are a tie that fewer
//! hops decide. A node forwards only the first copy of each probe, to the
//! neighbours that copy has not visited: a neighbour whose fastest path
//! from the server runs through a node sends that node nothing. Here the
//! recursion follows simple paths, which the protocol's loop checks make
//! equivalent wherever the delays are not ambiguous; [`ambiguities`] finds
//! the decisions whose outcome a little measurement noise could flip.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use overlay_core::routing::{self, RoutingConfig};

use crate::lab::{Lab, SegmentKind};

/// A route toward a server: first overlay hop, summed delay, hops.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub via: String,
    pub delay_ms: f64,
    pub hops: u32,
    /// The lowest delay known through `via` (the way it tells may be
    /// longer: fewer hops won there).
    pub floor_ms: f64,
}

/// The overlay with the link delays its nodes measure.
#[derive(Debug, Clone, Default)]
pub struct OverlayDelays {
    /// Overlay node -> its neighbours in file order.
    pub neighbours: BTreeMap<String, Vec<String>>,
    /// (node, neighbour) -> the link delay the node measures, ms.
    pub link_ms: BTreeMap<(String, String), f64>,
    /// Overlay nodes that originate probes (servers and the bootstrapper).
    pub servers: Vec<String>,
}

/// One-way delay of the underlay path from host `from` to `dst` (ms), and
/// the source address `from` uses for it; `None` when unroutable.
pub fn path_delay(lab: &Lab, from: usize, dst: Ipv4Addr) -> Option<(f64, Ipv4Addr)> {
    let mut at = from;
    let mut total = 0.0;
    let mut source = None;
    for _ in 0..=lab.hosts.len() {
        let host = &lab.hosts[at];
        if host.ifaces.iter().any(|i| i.addr.addr == dst) {
            return Some((total, source.unwrap_or(dst)));
        }
        let (iface, next_addr) = match host.ifaces.iter().find(|i| lab.segments[i.segment].net.contains(dst)) {
            Some(i) => (i, dst),
            None => {
                let r = lab.routes[at].iter().find(|r| r.dest.contains(dst))?;
                (host.ifaces.iter().find(|i| i.name == r.dev)?, r.via)
            }
        };
        source.get_or_insert(iface.addr.addr);
        let seg = &lab.segments[iface.segment];
        if let SegmentKind::Link { out } = &seg.kind {
            let side = seg.members.iter().position(|m| m.host == at)?;
            total += out[side].delay_ms.unwrap_or(0.0);
        }
        at = seg.members.iter().find(|m| m.addr == next_addr)?.host;
    }
    None
}

impl OverlayDelays {
    /// The overlay of `lab` with the delays of its lab file.
    pub fn of(lab: &Lab) -> Result<OverlayDelays, String> {
        let overlay = lab.overlay.as_ref().ok_or("the lab has no overlay file")?;
        let mut d = OverlayDelays::default();
        for n in overlay.nodes() {
            let from = lab.host_of_node(&n.name).ok_or(format!("overlay node {} has no host", n.name))?;
            let mut nbrs = Vec::new();
            for m in &n.neighbours {
                let IpAddr::V4(addr) = m.address else {
                    return Err(format!("node {}: neighbour {} is not an IPv4 address", n.name, m.address));
                };
                let to = lab.host_of_node(&m.name).ok_or(format!("overlay node {} has no host", m.name))?;
                let (there, src) =
                    path_delay(lab, from, addr).ok_or(format!("node {}: no underlay path to {addr}", n.name))?;
                let (back, _) =
                    path_delay(lab, to, src).ok_or(format!("node {}: no underlay path back to {src}", m.name))?;
                d.link_ms.insert((n.name.clone(), m.name.clone()), (there + back) / 2.0);
                nbrs.push(m.name.clone());
            }
            d.neighbours.insert(n.name.clone(), nbrs);
        }
        d.servers = lab.server_names();
        Ok(d)
    }

    fn link(&self, x: &str, n: &str) -> f64 {
        self.link_ms.get(&(x.to_string(), n.to_string())).copied().unwrap_or(f64::INFINITY)
    }

    /// The nodes on the fastest path from `server` to each node (the path
    /// of the first probe copy to arrive), the node itself included.
    fn fastest_paths(&self, server: &str) -> BTreeMap<String, BTreeSet<String>> {
        let mut best: BTreeMap<String, (f64, BTreeSet<String>)> = BTreeMap::new();
        best.insert(server.to_string(), (0.0, BTreeSet::from([server.to_string()])));
        let mut done = BTreeSet::new();
        loop {
            let next = best
                .iter()
                .filter(|(n, _)| !done.contains(*n))
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                .map(|(n, (d, p))| (n.clone(), *d, p.clone()));
            let Some((n, d, path)) = next else { break };
            done.insert(n.clone());
            for m in self.neighbours.get(&n).into_iter().flatten() {
                // The probe travels n -> m; m measures the link.
                let nd = d + self.link(m, &n);
                if best.get(m).is_none_or(|(old, _)| nd < *old) {
                    let mut p = path.clone();
                    p.insert(m.clone());
                    best.insert(m.clone(), (nd, p));
                }
            }
        }
        best.into_iter().map(|(n, (_, p))| (n, p)).collect()
    }

    /// Every node's route toward every server (node -> server -> choice).
    pub fn expected_routes(&self, rule: &RoutingConfig) -> BTreeMap<String, BTreeMap<String, Choice>> {
        self.solve(rule, &mut |_: &str, _: &str, _: &[Choice]| {})
    }

    /// The decisions that are neither clear (the winner ahead by at least
    /// `clear`, say 20%) nor safe ties (within `tie`, say 5%): where
    /// measurement noise of a few percent could change a next hop.
    pub fn ambiguities(&self, rule: &RoutingConfig, clear: f64, tie: f64) -> Vec<String> {
        let mut found = Vec::new();
        let mut check = |at: &str, server: &str, cands: &[Choice]| {
            let Some(min) = cands.iter().map(|c| c.delay_ms).min_by(f64::total_cmp) else { return };
            let safe = (min * (1.0 + tie)).max(min + rule.tie_floor_us as f64 / 1000.0);
            let ties: Vec<&Choice> = cands.iter().filter(|c| c.delay_ms <= safe).collect();
            let w = ties.iter().min_by(|a, b| order(a, b)).expect("the lowest is a tie of itself");
            for c in cands {
                let r = (c.delay_ms - min) / min.max(1e-9);
                if c.delay_ms > safe && r < clear && order(c, w).is_lt() {
                    found.push(format!(
                        "{at} toward {server}: via {} ({:.1} ms, {} hops) is {:.0}% above via {} ({:.1} ms, {} hops)",
                        c.via,
                        c.delay_ms,
                        c.hops,
                        r * 100.0,
                        w.via,
                        w.delay_ms,
                        w.hops
                    ));
                }
            }
        };
        let _ = self.solve(rule, &mut check);
        found.sort();
        found.dedup();
        found
    }

    fn solve(
        &self,
        rule: &RoutingConfig,
        check: &mut dyn FnMut(&str, &str, &[Choice]),
    ) -> BTreeMap<String, BTreeMap<String, Choice>> {
        let mut out: BTreeMap<String, BTreeMap<String, Choice>> = BTreeMap::new();
        for s in &self.servers {
            let fastest = self.fastest_paths(s);
            for x in self.neighbours.keys().filter(|x| *x != s) {
                let mut path = vec![x.clone()];
                if let Some(c) = self.best(rule, s, x, &mut path, &fastest, check) {
                    out.entry(x.clone()).or_default().insert(s.clone(), c);
                }
            }
        }
        out
    }

    /// `x`'s choice toward `server`, never through the nodes of `path`
    /// (x and the nodes that asked it, nearer the querying node).
    fn best(
        &self,
        rule: &RoutingConfig,
        server: &str,
        x: &str,
        path: &mut Vec<String>,
        fastest: &BTreeMap<String, BTreeSet<String>>,
        check: &mut dyn FnMut(&str, &str, &[Choice]),
    ) -> Option<Choice> {
        let mut cands = Vec::new();
        for n in self.neighbours.get(x).into_iter().flatten() {
            if path.contains(n) {
                continue;
            }
            let link = self.link(x, n);
            if n == server {
                cands.push(Choice { via: n.clone(), delay_ms: link, hops: 1, floor_ms: link });
                continue;
            }
            // n forwards only its first copy, and not back along its path.
            if fastest.get(n).is_some_and(|p| p.contains(x)) {
                continue;
            }
            path.push(n.clone());
            let sub = self.best(rule, server, n, path, fastest, check);
            path.pop();
            if let Some(c) = sub {
                cands.push(Choice {
                    via: n.clone(),
                    delay_ms: link + c.delay_ms,
                    hops: c.hops + 1,
                    floor_ms: link + c.floor_ms,
                });
            }
        }
        check(x, server, &cands);
        let lowest = cands.iter().map(|c| c.floor_ms).fold(f64::INFINITY, f64::min);
        pick(&cands, rule).map(|c| Choice { floor_ms: lowest, ..c })
    }
}

fn order(a: &Choice, b: &Choice) -> std::cmp::Ordering {
    (a.hops, a.delay_ms, &a.via).partial_cmp(&(b.hops, b.delay_ms, &b.via)).unwrap_or(std::cmp::Ordering::Equal)
}

/// The rule: lowest delay, fewest hops among those within the tolerance;
/// overlay-core's own [`routing::pick`], on delays rounded to the
/// microsecond as the nodes measure them.
pub fn pick(cands: &[Choice], rule: &RoutingConfig) -> Option<Choice> {
    let routes: Vec<routing::Route> = cands
        .iter()
        .map(|c| routing::Route {
            via: c.via.clone(),
            delay_us: (c.delay_ms * 1000.0).round() as u64,
            hops: c.hops,
            floor_us: (c.floor_ms * 1000.0).round() as u64,
        })
        .collect();
    let chosen = routing::pick(&routes, rule)?;
    routes.iter().position(|r| *r == chosen).map(|i| cands[i].clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::LabSpec;

    fn load(name: &str) -> Lab {
        crate::lab::shipped(name)
    }

    fn with_delay(lab: &Lab, a: &str, b: &str, ms: f64) -> Lab {
        let mut spec: LabSpec = lab.spec.clone();
        let l = spec
            .links
            .iter_mut()
            .find(|l| (l.a.host == a && l.b.host == b) || (l.a.host == b && l.b.host == a))
            .expect("the link");
        l.impair.delay_ms = Some(ms);
        l.a.impair_out.delay_ms = None;
        l.b.impair_out.delay_ms = None;
        Lab::from_spec(spec, lab.file.as_deref()).unwrap()
    }

    fn via(r: &BTreeMap<String, BTreeMap<String, Choice>>, node: &str, server: &str) -> String {
        r[node][server].via.clone()
    }

    #[test]
    fn routed_overlay_links_add_up_their_underlay_links() {
        let lab = load("seed.json");
        let d = OverlayDelays::of(&lab).unwrap();
        // o3-o7 crosses r1: 4 ms + 3 ms.
        assert_eq!(d.link_ms[&("o3".into(), "o7".into())], 7.0);
        assert_eq!(d.link_ms[&("o7".into(), "o3".into())], 7.0);
        assert_eq!(d.link_ms[&("o9".into(), "s1".into())], 28.0);
        assert_eq!(d.servers, ["s1", "s2"]);
    }

    #[test]
    fn the_rule_picks_lowest_delay_and_breaks_near_ties_by_hops() {
        let c = |via: &str, delay_ms: f64, hops: u32| Choice { via: via.into(), delay_ms, hops, floor_ms: delay_ms };
        let r = RoutingConfig::default();
        assert_eq!(pick(&[c("a", 10.0, 3), c("b", 20.0, 1)], &r).unwrap().via, "a");
        assert_eq!(pick(&[c("a", 10.0, 3), c("b", 10.9, 2)], &r).unwrap().via, "b");
        assert_eq!(pick(&[c("a", 10.0, 3), c("b", 11.1, 2)], &r).unwrap().via, "a");
        // The floor: 0.4 ms apart is a tie even at 1 ms.
        assert_eq!(pick(&[c("a", 1.0, 3), c("b", 1.4, 2)], &r).unwrap().via, "b");
    }

    #[test]
    fn seed_lab_delays_make_delay_and_hops_disagree() {
        let lab = load("seed.json");
        let d = OverlayDelays::of(&lab).unwrap();
        let rule = RoutingConfig::default();
        let r = d.expected_routes(&rule);
        // (a) o9's direct link to s1 (1 hop, 28 ms) loses to o2 (2 hops, 10 ms).
        assert_eq!(via(&r, "o9", "s1"), "o2");
        assert_eq!((r["o9"]["s1"].delay_ms, r["o9"]["s1"].hops), (10.0, 2));
        // (a) s1 reaches s2 through o2 (4 hops, 23 ms), not o9 (3 hops, 41 ms).
        assert_eq!(via(&r, "s1", "s2"), "o2");
        // (b) o3 toward s1: via o9 13 ms / 3 hops, via o2 13.5 ms / 2 hops:
        // within 10%, so fewer hops wins.
        assert_eq!(via(&r, "o3", "s1"), "o2");
        assert_eq!(r["o3"]["s1"].delay_ms, 13.5);
        assert_eq!(d.ambiguities(&rule, 0.2, 0.05), Vec::<String>::new());
        assert_eq!(r.values().map(|m| m.len()).sum::<usize>(), 18, "9 nodes x 2 servers");
    }

    #[test]
    fn seed_lab_routes_move_when_o2_o9_slows_down() {
        let lab = with_delay(&load("seed.json"), "o2", "o9", 25.0);
        let d = OverlayDelays::of(&lab).unwrap();
        let r = d.expected_routes(&RoutingConfig::default());
        assert_eq!(via(&r, "o9", "s1"), "o3");
        assert_eq!(via(&r, "o2", "s2"), "o3");
        assert_eq!(d.ambiguities(&RoutingConfig::default(), 0.2, 0.05), Vec::<String>::new());
    }

    #[test]
    fn ring_lab_delays_make_delay_and_hops_disagree() {
        let lab = load("ring.json");
        let d = OverlayDelays::of(&lab).unwrap();
        let rule = RoutingConfig::default();
        let r = d.expected_routes(&rule);
        // (a) o4 toward s1: the chord (2 hops, 32 ms) loses to o5 (4 hops, 19 ms).
        assert_eq!(via(&r, "o4", "s1"), "o5");
        assert_eq!(via(&r, "o1", "s2"), "o6");
        // (b) o3 toward s1: via o4 29 ms / 5 hops, via o2 30 ms / 3 hops.
        assert_eq!(via(&r, "o3", "s1"), "o2");
        assert_eq!(d.ambiguities(&rule, 0.2, 0.05), Vec::<String>::new());
        // The chord never wins here (onode's heartbeats over its 60 ms
        // round trip sometimes read 100 ms more); the lab test's change
        // keeps it so: o5-rb (half of overlay link o5-o6) from 3 to 18 ms.
        let moved = with_delay(&lab, "o5", "rb", 18.0);
        let d2 = OverlayDelays::of(&moved).unwrap();
        let r2 = d2.expected_routes(&rule);
        assert_eq!(via(&r2, "o5", "s1"), "o8");
        assert_eq!(via(&r2, "o6", "s2"), "o8");
        for rt in [&r, &r2] {
            for (node, servers) in rt {
                for (server, c) in servers {
                    let chord = (node.as_str(), c.via.as_str());
                    assert!(chord != ("o1", "o4") && chord != ("o4", "o1"), "{node} toward {server} takes the chord");
                }
            }
        }
        assert_eq!(d2.ambiguities(&rule, 0.2, 0.05), Vec::<String>::new());
    }

    #[test]
    fn an_ambiguous_decision_is_reported() {
        let mut d = OverlayDelays::default();
        for (x, y, ms) in [("s", "a", 10.0), ("s", "b", 5.0), ("b", "a", 6.5)] {
            d.link_ms.insert((x.into(), y.into()), ms);
            d.link_ms.insert((y.into(), x.into()), ms);
        }
        d.neighbours.insert("s".into(), vec!["a".into(), "b".into()]);
        d.neighbours.insert("a".into(), vec!["s".into(), "b".into()]);
        d.neighbours.insert("b".into(), vec!["s".into(), "a".into()]);
        d.servers = vec!["s".into()];
        // a toward s: direct 13 ms (1 hop) against 6.5 + 5 = 11.5 ms via b
        // (2 hops), 13% apart: a few percent of noise decides.
        d.link_ms.insert(("a".into(), "s".into()), 13.0);
        let found = d.ambiguities(&RoutingConfig::default(), 0.2, 0.05);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("a toward s: via s (13.0 ms, 1 hops) is 13% above via b"), "{found:?}");
    }
}
