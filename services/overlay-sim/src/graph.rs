//! Seeded overlay topologies for the simulator, and the oracle that says
//! what the routes should be.
//!
//! Nodes are placed at random on a square continent; each links to its
//! nearest few, and components are joined by their closest pair until the
//! overlay is connected. A link's one-way delay follows its length (light
//! in fibre, about 5 µs per km) plus a fixed cost per hop.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a node does in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Relay,
    Pop,
}

/// How to generate a topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub nodes: usize,
    pub servers: usize,
    pub pops: usize,
    /// Links each node makes to its nearest others (the mean degree is
    /// about twice this).
    pub nearest: usize,
    /// Long-haul links between random nodes, per 100 nodes: they keep the
    /// overlay's diameter near what real ones have (a few tens of hops
    /// at most, not a chain across the continent).
    pub long_haul: usize,
    /// Side of the square the nodes are placed on, in km.
    pub side_km: u32,
}

/// One undirected link: its ends (indices) and one-way delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub delay_us: u64,
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub names: Vec<String>,
    pub roles: Vec<Role>,
    pub links: Vec<Link>,
    /// Per node: (neighbour, link index).
    pub adjacent: Vec<Vec<(usize, usize)>>,
}

/// Fixed cost of a hop (queueing, the node's own forwarding), µs.
const HOP_US: u64 = 200;
/// One-way delay per km of fibre, in ns.
const NS_PER_KM: u64 = 5_000;

impl Graph {
    pub fn generate(shape: Shape, seed: u64) -> Graph {
        assert!(shape.servers + shape.pops <= shape.nodes, "more servers and POPs than nodes: {shape:?}");
        let mut rng = StdRng::seed_from_u64(seed);
        let n = shape.nodes;
        let at: Vec<(f64, f64)> = (0..n)
            .map(|_| (rng.random::<f64>() * shape.side_km as f64, rng.random::<f64>() * shape.side_km as f64))
            .collect();
        let km = |i: usize, j: usize| ((at[i].0 - at[j].0).powi(2) + (at[i].1 - at[j].1).powi(2)).sqrt();
        let mut pairs = BTreeSet::new();
        for i in 0..n {
            let mut others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
            others.sort_by(|&x, &y| km(i, x).total_cmp(&km(i, y)));
            for &j in others.iter().take(shape.nearest) {
                pairs.insert((i.min(j), i.max(j)));
            }
        }
        for _ in 0..shape.long_haul * n / 100 {
            let (i, j) = (rng.random_range(0..n), rng.random_range(0..n));
            if i != j {
                pairs.insert((i.min(j), i.max(j)));
            }
        }
        // Join the components, closest pair first, until there is one.
        loop {
            let comp = components(n, &pairs);
            let count = comp.iter().max().map_or(0, |m| m + 1);
            if count <= 1 {
                break;
            }
            let mut best: Option<(f64, usize, usize)> = None;
            for i in (0..n).filter(|&i| comp[i] == 0) {
                for j in (0..n).filter(|&j| comp[j] != 0) {
                    let d = km(i, j);
                    if best.is_none_or(|(b, ..)| d < b) {
                        best = Some((d, i, j));
                    }
                }
            }
            let (_, i, j) = best.expect("two components have a closest pair");
            pairs.insert((i.min(j), i.max(j)));
        }
        // Roles: servers and POPs drawn at random, the rest relay.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut roles = vec![Role::Relay; n];
        for &i in &order[..shape.servers] {
            roles[i] = Role::Server;
        }
        for &i in &order[shape.servers..shape.servers + shape.pops] {
            roles[i] = Role::Pop;
        }
        let names = (0..n)
            .map(|i| match roles[i] {
                Role::Server => format!("s{i}"),
                Role::Pop => format!("p{i}"),
                Role::Relay => format!("o{i}"),
            })
            .collect();
        let links: Vec<Link> = pairs
            .into_iter()
            .map(|(a, b)| Link { a, b, delay_us: HOP_US + (km(a, b) * NS_PER_KM as f64 / 1000.0) as u64 })
            .collect();
        Graph::from_links(names, roles, links)
    }

    pub fn from_links(names: Vec<String>, roles: Vec<Role>, links: Vec<Link>) -> Graph {
        let mut adjacent = vec![Vec::new(); names.len()];
        for (k, l) in links.iter().enumerate() {
            adjacent[l.a].push((l.b, k));
            adjacent[l.b].push((l.a, k));
        }
        Graph { names, roles, links, adjacent }
    }

    pub fn servers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.names.len()).filter(|&i| self.roles[i] == Role::Server)
    }

    pub fn mean_degree(&self) -> f64 {
        2.0 * self.links.len() as f64 / self.names.len() as f64
    }

    /// The link between two nodes, if they are neighbours.
    pub fn link_between(&self, a: usize, b: usize) -> Option<usize> {
        self.adjacent[a].iter().find(|(n, _)| *n == b).map(|&(_, k)| k)
    }

    /// Lowest summed delay from `source` to every node over the links for
    /// which `usable` holds (None: unreachable).
    pub fn shortest(&self, source: usize, usable: impl Fn(usize) -> bool) -> Vec<Option<u64>> {
        self.shortest_with_hops(source, usable).into_iter().map(|b| b.map(|(d, _)| d)).collect()
    }

    /// [`Graph::shortest`], with the hops of each lowest-delay path (the
    /// fewest among equal delays).
    pub fn shortest_with_hops(&self, source: usize, usable: impl Fn(usize) -> bool) -> Vec<Option<(u64, u32)>> {
        let mut best = vec![None; self.names.len()];
        let mut heap = BinaryHeap::new();
        heap.push(Reverse((0u64, 0u32, source)));
        while let Some(Reverse((d, h, i))) = heap.pop() {
            if best[i].is_some() {
                continue;
            }
            best[i] = Some((d, h));
            for &(j, k) in &self.adjacent[i] {
                if best[j].is_none() && usable(k) {
                    heap.push(Reverse((d + self.links[k].delay_us, h + 1, j)));
                }
            }
        }
        best
    }
}

/// Component number of every node (0 for node 0's).
fn components(n: usize, pairs: &BTreeSet<(usize, usize)>) -> Vec<usize> {
    let mut adjacent = vec![Vec::new(); n];
    for &(a, b) in pairs {
        adjacent[a].push(b);
        adjacent[b].push(a);
    }
    let mut comp = vec![usize::MAX; n];
    let mut next = 0;
    for start in 0..n {
        if comp[start] != usize::MAX {
            continue;
        }
        let mut stack = vec![start];
        comp[start] = next;
        while let Some(i) = stack.pop() {
            for &j in &adjacent[i] {
                if comp[j] == usize::MAX {
                    comp[j] = next;
                    stack.push(j);
                }
            }
        }
        next += 1;
    }
    comp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_overlay_is_connected_has_its_roles_and_is_the_same_for_a_seed() {
        let shape = Shape { nodes: 120, servers: 4, pops: 30, nearest: 2, long_haul: 5, side_km: 3000 };
        let g = Graph::generate(shape, 7);
        assert_eq!(g.servers().count(), 4);
        assert_eq!(g.roles.iter().filter(|r| **r == Role::Pop).count(), 30);
        let reach = g.shortest(0, |_| true);
        assert!(reach.iter().all(Option::is_some), "every node reachable from node 0");
        assert!(g.mean_degree() >= 2.0, "mean degree {}", g.mean_degree());
        let again = Graph::generate(shape, 7);
        assert_eq!(g.links, again.links);
        assert_ne!(g.links, Graph::generate(shape, 8).links);
    }

    #[test]
    fn shortest_delays_take_the_cheaper_path_and_skip_unusable_links() {
        // 0 - 1 - 2 costs 300, 0 - 2 directly 500.
        let names = ["a", "b", "c"].map(String::from).to_vec();
        let links = vec![
            Link { a: 0, b: 1, delay_us: 100 },
            Link { a: 1, b: 2, delay_us: 200 },
            Link { a: 0, b: 2, delay_us: 500 },
        ];
        let g = Graph::from_links(names, vec![Role::Server, Role::Relay, Role::Pop], links);
        assert_eq!(g.shortest(0, |_| true), vec![Some(0), Some(100), Some(300)]);
        assert_eq!(g.shortest(0, |k| k != 1), vec![Some(0), Some(100), Some(500)]);
        assert_eq!(g.shortest(0, |k| k == 0), vec![Some(0), Some(100), None]);
    }
}
