//! Static IP routes for the lab: for every host and every subnet it is not
//! on, the next hop along a shortest path (sum of link costs).
//!
//! For each subnet the distances of all hosts are computed from the hosts on
//! it (Dijkstra); a host then routes through the neighbour that is closest
//! to the subnet. Every next hop is strictly closer, so the routes never
//! loop whatever way ties are broken; ties go to the neighbour whose name
//! sorts first, so the result is deterministic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;

use crate::addr::Net;
use crate::lab::{Host, Segment};

/// One static route of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dest: Net,
    pub via: Ipv4Addr,
    /// The host's interface toward `via`.
    pub dev: String,
    /// Summed cost to the subnet.
    pub cost: u32,
}

/// A host with no path to a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    pub host: usize,
    pub segment: usize,
}

/// Cost from every host to every segment: `dist[segment][host]`.
fn distances(hosts: usize, segments: &[Segment]) -> Vec<Vec<Option<u32>>> {
    let mut adj: Vec<Vec<(usize, u32)>> = vec![Vec::new(); hosts];
    for s in segments {
        for m in &s.members {
            for n in &s.members {
                if m.host != n.host {
                    adj[m.host].push((n.host, s.cost));
                }
            }
        }
    }
    segments
        .iter()
        .map(|s| {
            let mut dist: Vec<Option<u32>> = vec![None; hosts];
            let mut heap = BinaryHeap::new();
            for m in &s.members {
                dist[m.host] = Some(0);
                heap.push(Reverse((0u32, m.host)));
            }
            while let Some(Reverse((d, h))) = heap.pop() {
                if dist[h].is_some_and(|best| d > best) {
                    continue;
                }
                for &(n, c) in &adj[h] {
                    let nd = d + c;
                    if dist[n].is_none_or(|best| nd < best) {
                        dist[n] = Some(nd);
                        heap.push(Reverse((nd, n)));
                    }
                }
            }
            dist
        })
        .collect()
}

/// Routes of every host (indexed like `hosts`) to the subnets it is not on.
pub fn compute(hosts: &[Host], segments: &[Segment]) -> Result<Vec<Vec<Route>>, Unreachable> {
    let dist = distances(hosts.len(), segments);
    let mut all = vec![Vec::new(); hosts.len()];
    for (si, seg) in segments.iter().enumerate() {
        for (h, routes) in all.iter_mut().enumerate() {
            if seg.members.iter().any(|m| m.host == h) {
                continue;
            }
            let Some(total) = dist[si][h] else {
                return Err(Unreachable { host: h, segment: si });
            };
            // Neighbours of h that lie on a shortest path.
            let mut best: Option<(&str, Ipv4Addr, &str)> = None;
            for other in segments {
                let Some(me) = other.members.iter().find(|m| m.host == h) else {
                    continue;
                };
                for n in other.members.iter().filter(|m| m.host != h) {
                    if dist[si][n.host].is_some_and(|d| d + other.cost == total) {
                        let cand = (hosts[n.host].name.as_str(), n.addr, me.iface.as_str());
                        if best.is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                            best = Some(cand);
                        }
                    }
                }
            }
            let (_, via, dev) = best.expect("a host at finite distance has a closer neighbour");
            routes.push(Route { dest: seg.net, via, dev: dev.to_string(), cost: total });
        }
    }
    Ok(all)
}

/// The hosts a packet from `from` to `dst` visits, following the routes
/// (for tests and `netlab status`); `None` when it would loop or dead-end.
pub fn trace(
    hosts: &[Host],
    segments: &[Segment],
    routes: &[Vec<Route>],
    from: usize,
    dst: Ipv4Addr,
) -> Option<Vec<usize>> {
    let mut path = vec![from];
    let mut at = from;
    loop {
        if hosts[at].ifaces.iter().any(|i| i.addr.addr == dst) {
            return Some(path);
        }
        let on_link = hosts[at].ifaces.iter().any(|i| segments[i.segment].net.contains(dst));
        let next_addr = if on_link { dst } else { routes[at].iter().find(|r| r.dest.contains(dst))?.via };
        let next = hosts.iter().position(|h| h.ifaces.iter().any(|i| i.addr.addr == next_addr))?;
        if path.contains(&next) {
            return None;
        }
        path.push(next);
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{Lab, LabSpec};

    fn names(lab: &Lab, path: &[usize]) -> Vec<String> {
        path.iter().map(|h| lab.hosts[*h].name.clone()).collect()
    }

    fn seed() -> Lab {
        crate::lab::shipped("seed.json")
    }

    #[test]
    fn every_host_reaches_every_address_in_the_seed_lab() {
        let lab = seed();
        for (from, _) in lab.hosts.iter().enumerate() {
            for (_, addr) in lab.all_addresses() {
                let path = trace(&lab.hosts, &lab.segments, &lab.routes, from, addr);
                assert!(path.is_some(), "{} cannot reach {addr}", lab.hosts[from].name);
            }
        }
    }

    #[test]
    fn o3_reaches_o7_through_the_router() {
        let lab = seed();
        let o3 = lab.host("o3").unwrap();
        let o7 = lab.host("o7").unwrap();
        let p = trace(&lab.hosts, &lab.segments, &lab.routes, o3, "10.0.14.1".parse().unwrap()).unwrap();
        assert_eq!(names(&lab, &p), ["o3", "r1", "o7"]);
        let back = trace(&lab.hosts, &lab.segments, &lab.routes, o7, "10.0.18.2".parse().unwrap()).unwrap();
        assert_eq!(names(&lab, &back), ["o7", "r1", "o3"]);
        let r = lab.routes[o3].iter().find(|r| r.dest.to_string() == "10.0.14.0/24").unwrap();
        assert_eq!(r.via.to_string(), "10.0.18.1");
        assert_eq!(r.dev, "v-r1");
    }

    #[test]
    fn clients_reach_the_bootstrapper_along_a_shortest_path() {
        let lab = seed();
        let c5 = lab.host("c5").unwrap();
        let p = trace(&lab.hosts, &lab.segments, &lab.routes, c5, "10.0.25.10".parse().unwrap()).unwrap();
        // c5 - o7 - r1 - o3 - o2 - s1 (5 hops) is shorter than through o9.
        assert_eq!(names(&lab, &p), ["c5", "o7", "r1", "o3", "o2", "s1"]);
        // Every host has one route per subnet it is not on.
        for (h, host) in lab.hosts.iter().enumerate() {
            assert_eq!(lab.routes[h].len() + host.ifaces.len(), lab.segments.len(), "{}", host.name);
        }
    }

    #[test]
    fn cost_steers_the_path() {
        // a - b - d and a - c - d; b's links cost 5, so a goes through c.
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}],
            "links": [
                {"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}, "cost": 5},
                {"a": {"host": "b", "addr": "10.0.2.1/24"}, "b": {"host": "d", "addr": "10.0.2.2/24"}},
                {"a": {"host": "a", "addr": "10.0.3.1/24"}, "b": {"host": "c", "addr": "10.0.3.2/24"}},
                {"a": {"host": "c", "addr": "10.0.4.1/24"}, "b": {"host": "d", "addr": "10.0.4.2/24"}}
            ]
        }"#;
        let spec: LabSpec = serde_json::from_str(json).unwrap();
        let lab = Lab::from_spec(spec, None).unwrap();
        let p = trace(&lab.hosts, &lab.segments, &lab.routes, 0, "10.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(names(&lab, &p), ["a", "c", "d"]);
        let r = &lab.routes[0];
        let to_b_d = r.iter().find(|r| r.dest.to_string() == "10.0.2.0/24").unwrap();
        assert_eq!((to_b_d.via.to_string(), to_b_d.cost), ("10.0.3.2".to_string(), 2));
    }

    #[test]
    fn ties_break_by_neighbour_name_and_lans_count_as_one_hop() {
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "y"}, {"name": "x"}, {"name": "d"}],
            "lans": [
                {"name": "l1", "members": [{"host": "a", "addr": "10.0.1.1/24"}, {"host": "x", "addr": "10.0.1.2/24"}, {"host": "y", "addr": "10.0.1.3/24"}]},
                {"name": "l2", "members": [{"host": "x", "addr": "10.0.2.1/24"}, {"host": "y", "addr": "10.0.2.2/24"}, {"host": "d", "addr": "10.0.2.3/24"}]}
            ]
        }"#;
        let spec: LabSpec = serde_json::from_str(json).unwrap();
        let lab = Lab::from_spec(spec, None).unwrap();
        let r = &lab.routes[0][0];
        assert_eq!(r.via.to_string(), "10.0.1.2", "x sorts before y");
        assert_eq!(r.dev, "l-l1");
        assert_eq!(r.cost, 1);
    }
}
