//! The overlay topology file: `Topology::parse` on arbitrary text (other
//! bytes are rejected). A topology it accepts must hold together (owners,
//! neighbours both ways, summary partitions the nodes), must parse again
//! to the same value when written back out, and the lab's lighter reading
//! of the same file (`netlab::overlay`) must agree with it.

#![no_main]

use std::collections::BTreeSet;
use std::net::IpAddr;

use libfuzzer_sys::{fuzz_target, Corpus};
use netlab::overlay::Overlay;
use overlay_core::topology::{NodeSpec, Topology};
use serde_json::{json, Map, Value};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(text) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    let overlay = Overlay::parse(text);
    if let Ok(o) = &overlay {
        overlay_fuzz::check_overlay(o);
    }
    match Topology::parse(text) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(t) => {
            check_topology(&t);
            check_rewritten(&t);
            check_against_overlay(&t, overlay);
        }
    }
    Corpus::Keep
});

fn check_topology(t: &Topology) {
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
            linked.insert(if n.name < nb.name { (n.name.clone(), nb.name.clone()) } else { (nb.name.clone(), n.name.clone()) });
        }
    }
    assert_eq!(s.edges, linked.into_iter().collect::<Vec<_>>(), "one edge per pair of neighbours");
    let shown = s.to_string();
    assert!(shown.starts_with(&format!("nodes: {}\n", s.nodes)), "{shown}");
}

/// Writes the topology back in the file format (servers marked) and parses
/// it again: nothing may be lost or changed.
fn check_rewritten(t: &Topology) {
    let addrs = |list: &[IpAddr]| -> Vec<Value> { list.iter().map(|a| json!(a.to_string())).collect() };
    let mut file = Map::new();
    for n in t.nodes() {
        let neighbours: Vec<Value> =
            n.neighbours.iter().map(|nb| json!(format!("{}{}", nb.address, if nb.server { "s" } else { "" }))).collect();
        file.insert(
            n.name.clone(),
            json!({"neighbours": neighbours, "names": addrs(&n.names), "pop": addrs(&n.pop)}),
        );
    }
    let text = Value::Object(file).to_string();
    assert_eq!(Topology::parse(&text).as_ref(), Ok(t), "rewritten as {text}");
}

/// When every address is IPv4 the lab's reading must accept the file and
/// find the same nodes, addresses and edges.
fn check_against_overlay(t: &Topology, overlay: Result<Overlay, netlab::overlay::OverlayError>) {
    let v4 = |list: &[IpAddr]| -> Option<Vec<std::net::Ipv4Addr>> {
        list.iter()
            .map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect()
    };
    let mut want = Vec::new();
    for n in t.nodes() {
        let neighbours: Vec<IpAddr> = n.neighbours.iter().map(|nb| nb.address).collect();
        let (Some(names), Some(pop), Some(neighbours)) = (v4(&n.names), v4(&n.pop), v4(&neighbours)) else {
            return;
        };
        want.push((n.name.clone(), names, pop, neighbours));
    }
    let o = overlay.unwrap_or_else(|e| panic!("the bootstrapper accepts the file but the lab does not: {e}"));
    let got: Vec<_> =
        o.nodes.iter().map(|n| (n.name.clone(), n.names.clone(), n.pop.clone(), n.neighbours.clone())).collect();
    assert_eq!(got, want);
    assert_eq!(o.edges(), t.summary().edges);
}
