//! Routes that follow delay, on both labs with their wide-area delays (link
//! emulators in the middle of the links): once the overlay has converged,
//! every node's next hop toward each server (`onode inspect`:
//! `.routes.<server>.best`) is the one computed from the lab file alone
//! (`netlab::delays`: lowest summed delay; within 10%, fewer hops). Then
//! one link's delay is raised at run time (`netlab link-set`) and the
//! affected nodes move to the new best next hop within a few probe
//! periods. Needs root and the built product; skips with a reason
//! otherwise.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use netlab::delays::{OverlayDelays, Rule};
use netlab::lab::{Impairment, Lab};
use netlab::plan::ns_name;
use netlab::run::{self, Bins};
use netlab::state::LabState;

/// The probe period onode uses by default.
const PROBE_PERIOD: Duration = Duration::from_millis(500);

type Table = BTreeMap<String, BTreeMap<String, String>>;

/// What the lab file says every node's next hop toward every server is.
fn expected(lab: &Lab) -> Table {
    let d = OverlayDelays::of(lab).expect("overlay delays");
    let ambiguous = d.ambiguities(&Rule::default(), 0.2, 0.05);
    assert!(ambiguous.is_empty(), "the lab's delays leave decisions to noise:\n{}", ambiguous.join("\n"));
    d.expected_routes(&Rule::default())
        .into_iter()
        .map(|(n, m)| (n, m.into_iter().map(|(s, c)| (s, c.via)).collect()))
        .collect()
}

/// Every overlay node's current next hops, from `onode inspect` run in its
/// own namespace (all nodes at once).
fn observed(lab: &Lab, prefix: &str, bins: &Bins) -> Table {
    let overlay = lab.overlay.as_ref().expect("an overlay");
    let handles: Vec<_> = overlay
        .nodes
        .iter()
        .map(|n| {
            let host = lab.host_of_node(&n.name).expect("host");
            let ns = ns_name(prefix, &lab.hosts[host].name);
            let addr = format!("{}:{}", n.names[0], lab.spec.control_port);
            let onode = bins.onode.display().to_string();
            let name = n.name.clone();
            std::thread::spawn(move || {
                let out = netlab::sys::output(&["ip", "netns", "exec", &ns, &onode, "inspect", &addr], None);
                let v: serde_json::Value =
                    out.ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(serde_json::Value::Null);
                let routes: BTreeMap<String, String> = v["routes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(s, r)| Some((s.clone(), r["best"].as_str()?.to_string())))
                    .collect();
                (name, routes)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("inspect thread")).filter(|(_, r)| !r.is_empty()).collect()
}

fn differences(want: &Table, got: &Table) -> Vec<String> {
    let mut v = Vec::new();
    for (node, servers) in want {
        for (server, via) in servers {
            let seen = got.get(node).and_then(|m| m.get(server));
            if seen != Some(via) {
                v.push(format!("{node} toward {server}: expected via {via}, onode says {seen:?}"));
            }
        }
    }
    v
}

/// Waits until the overlay's next hops are `want`; returns how long it
/// took, or fails with what still differs.
fn converge(lab: &Lab, prefix: &str, bins: &Bins, want: &Table, limit: Duration, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = observed(lab, prefix, bins);
        let diff = differences(want, &got);
        if diff.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!(
                "{what}: next hops still differ after {:.1} s (logs in {}):\n{}",
                limit.as_secs_f64(),
                netlab::state::lab_dir(prefix).display(),
                diff.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn moved(before: &Table, after: &Table) -> Vec<String> {
    let mut v = Vec::new();
    for (node, servers) in after {
        for (server, via) in servers {
            let old = &before[node][server];
            if old != via {
                v.push(format!("{node} toward {server}: {old} -> {via}"));
            }
        }
    }
    v
}

/// The whole check on one lab: converge, raise `link`'s delay, converge
/// again within a few probe periods.
fn routes_follow_delay(lab_file: &str, link: &str, raised_ms: f64, must_move: &[(&str, &str, &str)]) {
    let Some((bins, _one)) = product_lab() else { return };
    let lab = Lab::load(&lab_path(lab_file)).expect("lab validates");
    let want = expected(&lab);
    let (guard, _st) = up(&lab, Some(&bins), None);
    let prefix = guard.prefix.clone();
    let took = converge(&lab, &prefix, &bins, &want, Duration::from_secs(30), "after up");
    println!("{lab_file}: every next hop as computed, {:.1} s after the overlay was ready", took.as_secs_f64());

    let change = Impairment { delay_ms: Some(raised_ms), ..Impairment::default() };
    run::link_set(&prefix, link, None, &change).expect("link-set");
    let lab2 = LabState::load(&prefix).expect("state").lab().expect("lab");
    let want2 = expected(&lab2);
    let changes = moved(&want, &want2);
    for (node, server, via) in must_move {
        assert_eq!(&want2[*node][*server], via, "the computation should move {node} toward {server}");
    }
    let limit = PROBE_PERIOD * 10;
    let took = converge(&lab2, &prefix, &bins, &want2, limit, &format!("after {link} went to {raised_ms} ms"));
    println!(
        "{lab_file}: {link} raised to {raised_ms} ms; {} moved within {:.1} s ({:.1} probe periods): {}",
        changes.len(),
        took.as_secs_f64(),
        took.as_secs_f64() / PROBE_PERIOD.as_secs_f64(),
        changes.join("; ")
    );
    // A new SETUP now builds its tree along the new routes: every node on
    // it took the next hop toward the server its routes rank first.
    setup_follows_routes(&lab2, &prefix, &bins);
    down_and_check_clean(guard);
    remove_lab_folder(&prefix);
}

/// Each node's first choice among the servers (same rule as next hops).
fn best_server_hops(lab: &Lab) -> BTreeMap<String, String> {
    let rule = Rule::default();
    let routes = OverlayDelays::of(lab).expect("overlay delays").expected_routes(&rule);
    routes
        .into_iter()
        .filter_map(|(node, servers)| {
            let min = servers.values().map(|c| c.delay_ms).fold(f64::INFINITY, f64::min);
            let band = (min * rule.tie_ratio).max(rule.tie_floor_ms);
            let best = servers
                .values()
                .filter(|c| c.delay_ms <= min + band)
                .min_by(|a, b| a.hops.cmp(&b.hops).then(a.delay_ms.total_cmp(&b.delay_ms)))?;
            Some((node, best.via.clone()))
        })
        .collect()
}

fn setup_follows_routes(lab: &Lab, prefix: &str, bins: &Bins) {
    let st = LabState::load(prefix).expect("state");
    let client = lab.roles.iter().find(|r| r.kind == netlab::lab::RoleKind::Client).expect("a client role");
    let host = lab.hosts[client.host].name.clone();
    let run = run::ClientRun {
        host: host.clone(),
        stream: "test".into(),
        duration_s: Some(4.0),
        headless: true,
        stats: st.dir().join("clients").join("after-change.json"),
        log: Some(st.dir().join("logs").join("after-change-client.log")),
    };
    let mut child = run::start_client(&st, bins, &run).expect("start a client");
    std::thread::sleep(Duration::from_secs(2));
    let overlay = lab.overlay.as_ref().expect("an overlay");
    let inspect = |node: &str| -> serde_json::Value {
        let n = overlay.nodes.iter().find(|n| n.name == node).expect("node");
        let ns = ns_name(prefix, &lab.hosts[lab.host_of_node(node).expect("host")].name);
        let addr = format!("{}:{}", n.names[0], lab.spec.control_port);
        let out = netlab::sys::output(
            &["ip", "netns", "exec", &ns, &bins.onode.display().to_string(), "inspect", &addr],
            None,
        )
        .expect("inspect");
        serde_json::from_str(&out).expect("inspect JSON")
    };
    let upstream = |node: &str| -> Option<String> {
        let v = inspect(node);
        let b = v["streams"].as_array()?.iter().find(|b| b["stream"] == "test")?.clone();
        b["upstream"].as_str().map(str::to_string)
    };
    let pop = overlay
        .nodes
        .iter()
        .filter(|n| !n.pop.is_empty())
        .map(|n| n.name.clone())
        .find(|p| upstream(p).is_some())
        .expect("a POP carries the new viewer's stream");
    let best = best_server_hops(lab);
    let mut at = pop.clone();
    let mut path = vec![at.clone()];
    while let Some(up) = upstream(&at) {
        assert_eq!(best.get(&at), Some(&up), "{at} joined through {up}, not its best next hop (tree so far {path:?})");
        path.push(up.clone());
        at = up;
    }
    println!("new SETUP at {pop} for {host}: tree {path:?} follows the routes");
    let _ = child.wait();
}

#[test]
fn seed_lab_routes_follow_delay() {
    // o2-o9 from 4 to 25 ms: o9 reaches s1 through o3 instead of o2, and
    // o2 reaches s2 through o3 instead of o9.
    routes_follow_delay("seed.json", "o2-o9", 25.0, &[("o9", "s1", "o3"), ("o2", "s2", "o3")]);
}

#[test]
fn ring_lab_routes_follow_delay() {
    // o5-rb (half of the overlay link o5-o6, which crosses router rb) from
    // 3 to 18 ms: o5 reaches s1 through o8 instead of o6, and o6 reaches s2
    // through o8 instead of o5.
    routes_follow_delay("ring.json", "o5-rb", 18.0, &[("o5", "s1", "o8"), ("o6", "s2", "o8")]);
}
