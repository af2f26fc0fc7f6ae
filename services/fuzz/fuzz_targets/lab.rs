//! The lab file: `LabSpec` from JSON, then `Lab::from_spec`.
//!
//! Input: the lab file's text, optionally followed by a NUL byte and the
//! text of its overlay file. `from_spec` would read the file the lab's
//! `overlay` field names (relative to the current directory when the lab
//! has no path), and a fuzzed name such as `/dev/stdin` would block, so a
//! lab with an `overlay` goes through `Lab::from_parts` with the overlay
//! text from the input; without one, the shipped overlay file of that name
//! in `netns/labs/` stands in (so the shipped labs are complete seeds), and
//! failing that an empty file. A lab without `overlay` uses `from_spec`.
//!
//! A lab spec must survive writing and reading it again unchanged; a
//! validated lab must hold together: every interface on its segment, no
//! overlapping subnets, one route per subnet a host is not on, and every
//! host reaches every address of the lab along its routes.

#![no_main]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use libfuzzer_sys::{fuzz_target, Corpus};
use netlab::lab::{HostKind, Lab, LabSpec, RoleKind, SegmentKind};
use overlay_core::topology::Topology;

/// The overlay files of the shipped labs.
const SHIPPED_OVERLAYS: [(&str, &str); 2] = [
    ("seed-overlay.json", include_str!("../../../netns/labs/seed-overlay.json")),
    ("ring-overlay.json", include_str!("../../../netns/labs/ring-overlay.json")),
];

/// Largest interface name the kernel takes (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;

/// Tracing every host to every address is quadratic; beyond this many
/// hosts only the routes themselves are checked.
const TRACE_MAX_HOSTS: usize = 48;

fuzz_target!(|data: &[u8]| -> Corpus {
    let (lab_bytes, overlay_bytes) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(lab_text) = std::str::from_utf8(lab_bytes) else {
        return Corpus::Reject;
    };
    let overlay_text = match overlay_bytes.map(std::str::from_utf8) {
        None => None,
        Some(Ok(text)) => Some(text),
        Some(Err(_)) => return Corpus::Reject,
    };
    if let Some(Ok(t)) = overlay_text.map(Topology::parse) {
        overlay_fuzz::check_topology(&t);
    }

    let spec = match serde_json::from_str::<LabSpec>(lab_text) {
        Ok(spec) => spec,
        Err(_) => return Corpus::Keep,
    };
    check_round_trip(&spec);
    let result = match &spec.overlay {
        None => Lab::from_spec(spec.clone(), None),
        Some(name) => {
            let shipped = SHIPPED_OVERLAYS.iter().find(|(n, _)| n == name).map(|(_, text)| *text);
            let text = overlay_text.or(shipped).unwrap_or_default();
            Lab::from_parts(spec.clone(), None, Some((PathBuf::from(name), text.to_string())))
        }
    };
    match result {
        Ok(lab) => check_lab(&spec, &lab),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    Corpus::Keep
});

fn check_round_trip(spec: &LabSpec) {
    let text = serde_json::to_string(spec).expect("a lab spec serialises");
    let back: LabSpec = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: written as {text}"));
    assert_eq!(&back, spec, "written as {text}");
}

fn check_lab(spec: &LabSpec, lab: &Lab) {
    assert_eq!(&lab.spec, spec);
    assert!(lab.file.is_none());
    let hosts = &lab.hosts;
    assert_eq!(hosts.len(), spec.hosts.len());
    for (h, s) in hosts.iter().zip(&spec.hosts) {
        assert_eq!((&h.name, h.kind), (&s.name, s.kind));
    }
    assert_eq!(lab.segments.len(), spec.links.len() + spec.lans.len());

    // Interfaces sit on their segments; segments are well formed.
    for (hi, h) in hosts.iter().enumerate() {
        assert!(!h.ifaces.is_empty(), "host {} has an interface", h.name);
        let mut names = BTreeSet::new();
        for i in &h.ifaces {
            assert!(names.insert(&i.name), "host {}: interface {} twice", h.name, i.name);
            assert!(i.name.len() <= IFNAME_MAX, "host {}: interface name {} too long", h.name, i.name);
            let seg = &lab.segments[i.segment];
            assert_eq!(seg.net, i.addr.net(), "host {} {}", h.name, i.name);
            assert!(
                seg.members.iter().any(|m| m.host == hi && m.iface == i.name && m.addr == i.addr.addr),
                "host {} {} is a member of {}",
                h.name,
                i.name,
                seg.label
            );
        }
    }
    for (si, s) in lab.segments.iter().enumerate() {
        assert!(s.cost >= 1, "{}", s.label);
        let members: BTreeSet<usize> = s.members.iter().map(|m| m.host).collect();
        assert_eq!(members.len(), s.members.len(), "{}: a host once", s.label);
        match &s.kind {
            SegmentKind::Link { .. } => assert_eq!(s.members.len(), 2, "{}", s.label),
            SegmentKind::Lan { ports, .. } => {
                assert!(s.members.len() >= 2, "{}", s.label);
                assert_eq!(ports.len(), s.members.len(), "{}", s.label);
            }
        }
        for m in &s.members {
            assert!(s.net.contains(m.addr), "{}: {}", s.label, m.addr);
            assert!(hosts[m.host].ifaces.iter().any(|i| i.segment == si && i.name == m.iface), "{}", s.label);
        }
        for t in &lab.segments[..si] {
            assert!(!s.net.overlaps(&t.net), "{} overlaps {}", s.label, t.label);
        }
    }
    let addrs = lab.all_addresses();
    let distinct: BTreeSet<Ipv4Addr> = addrs.iter().map(|(_, a)| *a).collect();
    assert_eq!(distinct.len(), addrs.len(), "every address once");

    // One route per subnet a host is not on, through a neighbour on the
    // interface it names.
    assert_eq!(lab.routes.len(), hosts.len());
    for (hi, (h, routes)) in hosts.iter().zip(&lab.routes).enumerate() {
        assert_eq!(routes.len() + h.ifaces.len(), lab.segments.len(), "host {}", h.name);
        for r in routes {
            assert!(lab.segments.iter().any(|s| s.net == r.dest), "host {}: route to {}", h.name, r.dest);
            assert!(!h.ifaces.iter().any(|i| i.addr.net() == r.dest), "host {}: route to its own {}", h.name, r.dest);
            let dev = h.ifaces.iter().find(|i| i.name == r.dev).expect("a route's dev is an interface of the host");
            let seg = &lab.segments[dev.segment];
            assert!(
                seg.members.iter().any(|m| m.host != hi && m.addr == r.via),
                "host {}: via {} is a neighbour on {}",
                h.name,
                r.via,
                seg.label
            );
            assert!(r.cost >= 1);
        }
    }
    if hosts.len() <= TRACE_MAX_HOSTS {
        for from in 0..hosts.len() {
            for (owner, addr) in &addrs {
                let path =
                    lab.trace(from, *addr).unwrap_or_else(|| panic!("host {} cannot reach {addr}", hosts[from].name));
                assert_eq!(path.last(), Some(owner), "host {} to {addr}", hosts[from].name);
            }
        }
    }

    // Roles and the bootstrapper.
    assert_eq!(lab.roles.len(), spec.roles.len());
    for r in &lab.roles {
        assert_eq!(hosts[r.host].kind, HostKind::Host, "a router runs no role");
        if r.kind.is_overlay_node() {
            assert_eq!(lab.host_of_node(&r.name), Some(r.host), "overlay node {}", r.name);
        }
        if r.kind == RoleKind::Client {
            assert!(r.stream.as_deref().is_some_and(|s| !s.is_empty()));
            if let Some(pop) = lab.local_pop(r.host) {
                let on_pop = lab
                    .roles
                    .iter()
                    .any(|p| p.kind == RoleKind::Pop && hosts[p.host].ifaces.iter().any(|i| i.addr.addr == pop));
                assert!(on_pop, "client on {}: local POP {pop} is a POP's address", hosts[r.host].name);
            }
        }
    }
    let boot = lab.roles.iter().find(|r| r.kind == RoleKind::Bootstrapper);
    match (boot, lab.bootstrap) {
        (None, None) => {}
        (Some(b), Some(addr)) => {
            assert!(hosts[b.host].ifaces.iter().any(|i| i.addr.addr == addr), "bootstrap {addr}");
            assert!(spec.bootstrap.is_none_or(|a| a == addr));
            assert!(lab.overlay.is_some(), "the bootstrapper has an overlay file");
        }
        (boot, addr) => panic!("bootstrapper role {boot:?} but bootstrap address {addr:?}"),
    }

    // The overlay file agrees with the lab.
    if let Some(o) = &lab.overlay {
        overlay_fuzz::check_topology(o);
        assert_eq!(lab.overlay_text.as_deref().map(Topology::parse), Some(Ok(o.clone())));
        for n in o.nodes() {
            let host = lab.host_of_node(&n.name).expect("every overlay node runs in the lab");
            for a in &n.names {
                assert!(
                    hosts[host].ifaces.iter().any(|i| IpAddr::V4(i.addr.addr) == *a),
                    "overlay node {}: {a}",
                    n.name
                );
            }
        }
        for r in lab.roles.iter().filter(|r| r.kind.is_overlay_node()) {
            assert!(o.node(&r.name).is_some(), "role {} is in the overlay file", r.name);
        }
    }
}
