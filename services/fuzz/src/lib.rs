//! Checks shared by the fuzz targets in `fuzz_targets/`.
//!
//! A parsed overlay topology ([`overlay_core::topology::Topology`]) is
//! reached from two targets: `topology` parses arbitrary text, `lab` the
//! overlay file that comes with a lab.

use std::collections::BTreeSet;

use overlay_core::topology::{NodeSpec, Topology};

/// Properties every accepted topology has.
pub fn check_topology(t: &Topology) {
    let nodes: Vec<_> = t.nodes().collect();
    for pair in nodes.windows(2) {
        assert!(pair[0].name < pair[1].name, "nodes sorted by name, each once");
    }
    assert!(nodes.iter().any(|n| n.server), "a topology has a server");
    for n in &nodes {
        assert_eq!(t.node(&n.name), Some(*n));
        assert_eq!(n.server, n.name.starts_with('s'), "node {}", n.name);
        assert!(!n.names.is_empty(), "node {} has names", n.name);
        assert!(!(n.server && n.is_pop()), "server {} is a POP", n.name);
        for a in &n.names {
            assert_eq!(t.owner_of(*a).map(|o| &o.name), Some(&n.name), "{a} is a name of {}", n.name);
        }
        for a in &n.pop {
            assert!(n.names.contains(a), "node {}: pop {a} is one of its names", n.name);
        }
        for nb in &n.neighbours {
            assert_ne!(nb.name, n.name, "node {} is its own neighbour", n.name);
            assert_eq!(t.owner_of(nb.address).map(|o| &o.name), Some(&nb.name), "node {}: {}", n.name, nb.address);
            let other = t.node(&nb.name).expect("a neighbour is a node");
            assert_eq!(nb.server, other.server, "node {}: neighbour {}", n.name, nb.name);
            assert!(other.neighbours.iter().any(|b| b.name == n.name), "{}-{} one-sided", n.name, nb.name);
        }
    }

    let s = t.summary();
    assert_eq!(s.nodes, nodes.len());
    let names = |keep: fn(&NodeSpec) -> bool| -> Vec<String> {
        nodes.iter().filter(|n| keep(n)).map(|n| n.name.clone()).collect()
    };
    assert_eq!(s.servers, names(|n| n.server));
    assert_eq!(s.pops, names(|n| n.is_pop()));
    assert_eq!(s.relays, names(|n| !n.server && !n.is_pop()));
    assert_eq!(s.servers.len() + s.pops.len() + s.relays.len(), s.nodes, "roles partition the nodes");
    assert_eq!(s.edges, t.edges().into_iter().collect::<Vec<_>>());
    let mut linked = BTreeSet::new();
    for n in &nodes {
        for nb in &n.neighbours {
            linked.insert(if n.name < nb.name {
                (n.name.clone(), nb.name.clone())
            } else {
                (nb.name.clone(), n.name.clone())
            });
        }
    }
    assert_eq!(s.edges, linked.into_iter().collect::<Vec<_>>(), "one edge per pair of neighbours");
    let shown = s.to_string();
    assert!(shown.starts_with(&format!("nodes: {}\n", s.nodes)), "{shown}");
}
