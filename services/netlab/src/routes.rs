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

/// A host's place on a subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub host: usize,
    pub iface: String,
    pub addr: Ipv4Addr,
}

/// A subnet (a link or a LAN) as the routes see it: the cost of crossing
/// it and the hosts on it.
#[derive(Debug, Clone, Copy)]
pub struct Subnet<'a> {
    pub net: Net,
    pub cost: u32,
    pub members: &'a [Attachment],
}

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
fn distances(hosts: usize, segments: &[Subnet<'_>]) -> Vec<Vec<Option<u32>>> {
    let mut adj: Vec<Vec<(usize, u32)>> = vec![Vec::new(); hosts];
    for s in segments {
        for m in s.members {
            for n in s.members {
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
            for m in s.members {
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

/// Routes of every host (indexed like `hosts`, its names) to the subnets
/// it is not on.
pub fn compute(hosts: &[&str], segments: &[Subnet<'_>]) -> Result<Vec<Vec<Route>>, Unreachable> {
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
                        let cand = (hosts[n.host], n.addr, me.iface.as_str());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: usize, iface: &str, addr: &str) -> Attachment {
        Attachment { host, iface: iface.into(), addr: addr.parse().unwrap() }
    }

    #[test]
    fn the_cheaper_way_wins_and_an_island_is_named() {
        // a - b - d costs 5 + 1, a - c - d 1 + 1.
        let links = [
            [at(0, "v-b", "10.0.1.1"), at(1, "v-a", "10.0.1.2")],
            [at(1, "v-d", "10.0.2.1"), at(3, "v-b", "10.0.2.2")],
            [at(0, "v-c", "10.0.3.1"), at(2, "v-a", "10.0.3.2")],
            [at(2, "v-d", "10.0.4.1"), at(3, "v-c", "10.0.4.2")],
        ];
        let cost = [5, 1, 1, 1];
        let subnets: Vec<Subnet> = links
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let net = format!("{}/24", m[0].addr).parse::<crate::addr::IfAddr>().unwrap().net();
                Subnet { net, cost: cost[i], members: m }
            })
            .collect();
        let routes = compute(&["a", "b", "c", "d"], &subnets).unwrap();
        let to_bd = routes[0].iter().find(|r| r.dest == subnets[1].net).unwrap();
        assert_eq!((to_bd.via.to_string(), to_bd.dev.as_str(), to_bd.cost), ("10.0.3.2".into(), "v-c", 2));
        assert_eq!(compute(&["a", "b", "c", "d", "e"], &subnets).unwrap_err().host, 4, "e is on no subnet");
    }
}
