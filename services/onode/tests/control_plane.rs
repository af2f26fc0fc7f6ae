//! Control plane on the original topology, with real `onode` processes on
//! loopback: registration, STATUS routes, tree building, grafting, pruning,
//! NAK, and the bootstrapper's failure notice.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, hops_to, neighbours_of, seed_topology, wait_output, Overlay};

#[test]
fn topology_check_accepts_the_original_and_names_faults() {
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../../netns/labs/seed-overlay.json");
    let out = Command::new(bin("onode")).args(["topology", "check", seed]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nodes: 10") && text.contains("overlay edges (12)"), "{text}");
    assert!(text.contains("pops (3): o5 o6 o7"), "{text}");

    let dir = common::tempdir::Dir::new("topo");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"s1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"]},"o1":{"neighbours":[],"names":["10.0.0.2"],"pop":[]}}"#).unwrap();
    let out = Command::new(bin("onode")).args(["topology", "check"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node s1") && err.contains("neighbours") && err.contains("o1"), "{err}");
}

#[test]
fn overlay_registers_routes_builds_grafts_and_prunes_trees() {
    let mut o = Overlay::start("cp", &seed_topology(), None);
    let overview = o.overview().unwrap();
    assert_eq!(overview["registered"].as_array().unwrap().len(), 10, "{overview}");
    assert!(overview["missing"].as_array().unwrap().is_empty());

    // Every node converges to a next hop on a shortest path to each server
    // (loopback delays are noise, so the hop rule decides).
    for server in ["s1", "s2"] {
        let dist = hops_to(&o.topology, server);
        let nodes: Vec<String> = o.addr.keys().filter(|n| *n != server).cloned().collect();
        o.wait_for(&format!("routes toward {server}"), Duration::from_secs(10), |o| {
            nodes.iter().all(|n| {
                let best = o.inspect(n)["routes"][server]["best"].as_str().map(str::to_string);
                best.is_some_and(|b| dist[&b] + 1 == dist[n] && neighbours_of(&o.topology, n).contains(&b))
            })
        });
        for n in &nodes {
            let hops = o.inspect(n)["routes"][server]["hops"].as_u64().unwrap();
            assert_eq!(hops as u32, dist[n], "{n} toward {server}");
        }
    }

    // A viewer at o5: the nearest server is s2 (o5-o4-o8-s2, 3 hops).
    let c1 = o.client("c1", "test", Some("o5"), 8.0).spawn().unwrap();
    o.wait_for("tree o5-o4-o8-s2", Duration::from_secs(10), |o| o.branch("o5", "test").is_some());
    let b = |n: &str| o.branch(n, "test").unwrap_or_else(|| panic!("{n} carries no test stream"));
    assert_eq!(b("o5")["upstream"], "o4");
    assert_eq!(b("o5")["local_viewers"], 1);
    assert_eq!(b("o4")["upstream"], "o8");
    assert_eq!(b("o4")["downstream"], serde_json::json!(["o5"]));
    assert_eq!(b("o8")["upstream"], "s2");
    assert_eq!(b("s2")["upstream"], serde_json::Value::Null);
    assert_eq!(b("s2")["downstream"], serde_json::json!(["o8"]));
    for n in ["s1", "o2", "o3", "o6", "o7", "o9"] {
        assert!(o.branch(n, "test").is_none(), "{n} is off the tree");
    }
    assert_eq!(o.inspect("s2")["pipelines"], serde_json::json!(["test"]));

    // A second POP grafts at o4 instead of reaching a server.
    let c2 = o.client("c2", "test", Some("o6"), 3.0).spawn().unwrap();
    o.wait_for("o6 grafted", Duration::from_secs(10), |o| o.branch("o6", "test").is_some());
    assert_eq!(b("o6")["upstream"], "o4");
    assert_eq!(b("o4")["downstream"], serde_json::json!(["o5", "o6"]));
    assert_eq!(b("s2")["downstream"], serde_json::json!(["o8"]), "the server still sends one copy");
    assert!(o.branch("s1", "test").is_none());

    // c2 leaves first: o6 is pruned, o4 keeps o5.
    let out = wait_output(c2, Duration::from_secs(20));
    assert!(out.status.success(), "c2: {}", o.client_log("c2"));
    o.wait_for("o6 pruned", Duration::from_secs(5), |o| o.branch("o6", "test").is_none());
    assert_eq!(b("o4")["downstream"], serde_json::json!(["o5"]));

    // The last viewer leaves: the whole branch is pruned, the pipeline stops.
    let out = wait_output(c1, Duration::from_secs(20));
    assert!(out.status.success(), "c1: {}", o.client_log("c1"));
    o.wait_for("tree pruned", Duration::from_secs(5), |o| {
        ["o5", "o4", "o8", "s2"].iter().all(|n| o.branch(n, "test").is_none())
    });
    o.wait_for("pipeline stopped", Duration::from_secs(5), |o| o.inspect("s2")["pipelines"] == serde_json::json!([]));

    // Unknown stream: NAK, the client exits non-zero naming the reason.
    let out = wait_output(o.client("c3", "no-such-stream", Some("o7"), 2.0).spawn().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success());
    let log = o.client_log("c3");
    assert!(log.contains("unknown") && log.contains("no-such-stream"), "{log}");
    assert!(o.branch("o7", "no-such-stream").is_none());

    // A client that dies without TEARDOWN: its POP expires the session
    // and prunes the branch.
    let mut crashed = o.client("c4", "test", Some("o7"), 30.0).spawn().unwrap();
    o.wait_for("o7 serves c4", Duration::from_secs(10), |o| o.branch("o7", "test").is_some());
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    o.wait_for("silent session expired and pruned", Duration::from_secs(10), |o| o.branch("o7", "test").is_none());
    assert!(o.log("o7").contains("session expired"));

    // A killed node is reported by the bootstrapper, and nodes drop it.
    o.kill("o9");
    o.wait_for("o9 reported failed", Duration::from_secs(5), |o| {
        o.overview().is_some_and(|v| v["failed"].as_array().unwrap().iter().any(|f| f == "o9"))
    });
    o.wait_for("o8 stops routing through o9", Duration::from_secs(5), |o| {
        o.inspect("o8")["routes"]["s1"]["entries"].as_array().unwrap().iter().all(|e| e["via"] != "o9")
    });
    assert!(o.log("o8").contains("bootstrapper reports a failed node"), "o8 heard the notice");

    // Clean shutdown on SIGTERM.
    let status = o.stop("o7");
    assert!(status.success(), "o7 exit status {status}");
}
