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
use netlab::delays::{self, OverlayDelays};
use netlab::lab::{Impairment, Lab};
use netlab::plan::ns_name;
use netlab::run::{self, Bins};
use netlab::state::LabState;
use overlay_core::routing::RoutingConfig;

/// The probe period onode uses by default.
const PROBE_PERIOD: Duration = Duration::from_millis(500);

type Table = BTreeMap<String, BTreeMap<String, String>>;

/// What the lab file says every node's next hop toward every server is.
fn expected(lab: &Lab) -> Table {
    let d = OverlayDelays::of(lab).expect("overlay delays");
    let ambiguous = d.ambiguities(&RoutingConfig::default(), 0.2, 0.05);
    assert!(ambiguous.is_empty(), "the lab's delays leave decisions to noise:\n{}", ambiguous.join("\n"));
    d.expected_routes(&RoutingConfig::default())
        .into_iter()
        .map(|(n, m)| (n, m.into_iter().map(|(s, c)| (s, c.via)).collect()))
        .collect()
}

/// Every overlay node's current next hops, from `onode inspect` run in its
/// own namespace (all nodes at once).
fn observed(lab: &Lab, prefix: &str, bins: &Bins) -> Table {
    let overlay = lab.overlay.as_ref().expect("an overlay");
    std::thread::scope(|scope| {
        let handles: Vec<_> = overlay
            .nodes()
            .map(|n| {
                scope.spawn(|| {
                    let v = try_inspect(lab, prefix, bins, &n.name).unwrap_or_default();
                    let routes: BTreeMap<String, String> = v["routes"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(s, r)| Some((s.clone(), r["best"].as_str()?.to_string())))
                        .collect();
                    (n.name.clone(), routes)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("inspect thread")).filter(|(_, r)| !r.is_empty()).collect()
    })
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
    let rule = RoutingConfig::default();
    let routes = OverlayDelays::of(lab).expect("overlay delays").expected_routes(&rule);
    routes
        .into_iter()
        .filter_map(|(node, servers)| {
            let best = delays::pick(&servers.into_values().collect::<Vec<_>>(), &rule)?;
            Some((node, best.via))
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
    let upstream =
        |node: &str| branch(lab, prefix, bins, node).and_then(|b| b["upstream"].as_str().map(str::to_string));
    let pop = overlay
        .nodes()
        .filter(|n| n.is_pop())
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

/// `onode inspect` of one node, run in its namespace; None if it does not
/// answer.
fn try_inspect(lab: &Lab, prefix: &str, bins: &Bins, node: &str) -> Option<serde_json::Value> {
    let overlay = lab.overlay.as_ref().expect("an overlay");
    let n = overlay.node(node).expect("node");
    let ns = ns_name(prefix, &lab.hosts[lab.host_of_node(node).expect("host")].name);
    let addr = format!("{}:{}", n.names[0], lab.spec.control_port);
    let onode = bins.onode.display().to_string();
    let out = netlab::sys::output(&["ip", "netns", "exec", &ns, &onode, "inspect", &addr], None).ok()?;
    serde_json::from_str(&out).ok()
}

fn inspect(lab: &Lab, prefix: &str, bins: &Bins, node: &str) -> serde_json::Value {
    try_inspect(lab, prefix, bins, node).unwrap_or_else(|| panic!("onode inspect of {node} failed"))
}

/// A node's branch of the stream `test`, if it carries it.
fn branch(lab: &Lab, prefix: &str, bins: &Bins, node: &str) -> Option<serde_json::Value> {
    let v = inspect(lab, prefix, bins, node);
    v["streams"].as_array()?.iter().find(|b| b["stream"] == "test").cloned()
}

/// The tree of `test` from `pop` up to its server: the nodes in order.
fn tree_up(lab: &Lab, prefix: &str, bins: &Bins, pop: &str) -> Vec<String> {
    let mut path = vec![pop.to_string()];
    let mut at = pop.to_string();
    while let Some(up) = branch(lab, prefix, bins, &at).and_then(|b| b["upstream"].as_str().map(str::to_string)) {
        if path.contains(&up) || path.len() > 12 {
            break;
        }
        path.push(up.clone());
        at = up;
    }
    path
}

/// The nodes of `tree` (POP first) whose upstream is not their next hop
/// toward `server` in `want`.
fn off_route(tree: &[String], server: &str, want: &Table) -> Vec<String> {
    tree.windows(2)
        .filter(|w| want.get(&w[0]).and_then(|m| m.get(server)) != Some(&w[1]))
        .map(|w| {
            format!(
                "{} feeds from {}, its next hop toward {server} is {:?}",
                w[0],
                w[1],
                want.get(&w[0]).and_then(|m| m.get(server))
            )
        })
        .collect()
}

#[test]
fn seed_lab_established_tree_follows_a_slower_link() {
    // A viewer on o7's LAN watches; then a link on its tree gets much
    // slower. The tree it already has moves to the new best routes
    // (make-before-break), not only trees built afterwards.
    let Some((bins, _one)) = product_lab() else { return };
    let mut lab = Lab::load(&lab_path("seed.json")).expect("lab validates");
    // Trees may move 4 s after they change (the default waits 30 s).
    for role in lab.roles.iter_mut().filter(|r| r.kind != netlab::lab::RoleKind::Client) {
        role.args.extend(["--settle-s".to_string(), "4".to_string()]);
    }
    let want = expected(&lab);
    let (guard, st) = up(&lab, Some(&bins), None);
    let prefix = guard.prefix.clone();
    converge(&lab, &prefix, &bins, &want, Duration::from_secs(30), "after up");
    let run = run::ClientRun {
        host: "c5".into(),
        stream: "test".into(),
        duration_s: Some(32.0),
        headless: true,
        stats: st.dir().join("clients").join("established.json"),
        log: Some(st.dir().join("logs").join("established-client.log")),
    };
    let mut child = run::start_client(&st, &bins, &run).expect("start a client");
    // The tree is built on the routes the nodes measure when the viewer
    // joins; a busy machine can tilt a measurement for a while, and then
    // the tree settles onto the routes of the links' delays once it may
    // move (4 s here). Either way it is on them within 10 s.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let (before, server) = loop {
        let tree = tree_up(&lab, &prefix, &bins, "o7");
        let server = tree.last().expect("a tree").clone();
        if off_route(&tree, &server, &want).is_empty() {
            break (tree, server);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the tree should settle on the routes: {tree:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    // Raise a link the tree crosses, whichever server roots it.
    let (link, raised_ms, mover, new_up) =
        if server == "s1" { ("o2-o3", 25.0, "o3", "o9") } else { ("o8-o9", 60.0, "o3", "o4") };
    let change = Impairment { delay_ms: Some(raised_ms), ..Impairment::default() };
    run::link_set(&prefix, link, None, &change).expect("link-set");
    let lab2 = LabState::load(&prefix).expect("state").lab().expect("lab");
    let want2 = expected(&lab2);
    assert_eq!(want2[mover][&server], new_up, "the computation should move {mover} toward {server} to {new_up}");
    converge(&lab2, &prefix, &bins, &want2, PROBE_PERIOD * 10, "routes after the change");
    let start = Instant::now();
    let after = loop {
        let tree = tree_up(&lab2, &prefix, &bins, "o7");
        let wrong = off_route(&tree, &server, &want2);
        if wrong.is_empty() && tree.last() == Some(&server) {
            break tree;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the established tree did not follow the routes after {link} went to {raised_ms} ms: {tree:?}\n{}",
            wrong.join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    println!(
        "{link} raised to {raised_ms} ms: tree {before:?} became {after:?} within {:.1} s of the routes",
        start.elapsed().as_secs_f64()
    );
    assert_ne!(before, after, "the tree should have moved");
    // o7 knows its delay along the tree (what moves compare): each link as
    // its lower end measures it, passed down with the reroot notices.
    let links = OverlayDelays::of(&lab2).expect("overlay delays");
    let want_ms: f64 = after.windows(2).map(|w| links.link_ms[&(w[0].clone(), w[1].clone())]).sum();
    let told = branch(&lab2, &prefix, &bins, "o7").and_then(|b| b["tree_delay_ms"].as_f64());
    println!("o7's delay along the tree: {told:?} ms; the lab's links sum to {want_ms:.1} ms");
    assert!(
        told.is_some_and(|ms| (want_ms * 0.9 - 1.0..=want_ms * 1.3 + 5.0).contains(&ms)),
        "o7's delay along the tree {after:?} is {told:?} ms; its links sum to {want_ms:.1} ms"
    );
    let status = child.wait().expect("client");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run.stats).expect("client stats")).expect("stats JSON");
    assert!(status.success(), "client: {stats}");
    assert_eq!(stats["pop_name"], "o7");
    let gap = stats["longest_gap_ms"].as_f64().unwrap_or(f64::INFINITY);
    assert!(gap < 1000.0, "the viewer should not notice the move (longest gap {gap} ms)");
    down_and_check_clean(guard);
    remove_lab_folder(&prefix);
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
