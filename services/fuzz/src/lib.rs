//! Checks shared by the fuzz targets in `fuzz_targets/`.
//!
//! The lab's reading of the overlay file ([`netlab::overlay::Overlay`]) is
//! reached from two targets: `topology` compares it with the bootstrapper's
//! full validation, `lab` parses the overlay file that comes with a lab.

use std::collections::BTreeSet;

use netlab::overlay::Overlay;

/// Properties every parsed overlay file has.
pub fn check_overlay(o: &Overlay) {
    for pair in o.nodes.windows(2) {
        assert!(pair[0].name < pair[1].name, "nodes sorted by name, each once");
    }
    let mut linked = BTreeSet::new();
    for n in &o.nodes {
        assert_eq!(o.node(&n.name), Some(n));
        for a in &n.names {
            assert_eq!(o.owner(*a).map(|m| &m.name), Some(&n.name), "{a} is a name of {}", n.name);
        }
        for a in &n.neighbours {
            let m = o.owner(*a).expect("parse refuses a neighbour nobody owns");
            if m.name != n.name {
                let pair = if n.name < m.name { (&n.name, &m.name) } else { (&m.name, &n.name) };
                linked.insert((pair.0.clone(), pair.1.clone()));
            }
        }
    }
    let edges = o.edges();
    for pair in edges.windows(2) {
        assert!(pair[0] < pair[1], "edges sorted, each once");
    }
    for (x, y) in &edges {
        assert!(x < y, "edge {x}-{y}: smaller name first");
        assert!(o.node(x).is_some() && o.node(y).is_some(), "edge {x}-{y} joins two nodes");
    }
    assert_eq!(edges.into_iter().collect::<BTreeSet<_>>(), linked, "one edge per pair of neighbours");
}
