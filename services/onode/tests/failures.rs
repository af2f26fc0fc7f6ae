//! Failure recovery on loopback with real processes: tree repair around a
//! killed server and a killed relay, a relay that cannot repair handing the
//! job to its downstream, and a wedged relay found by the silence of the
//! stream it fed, while a viewer keeps decoding.

mod common;

use std::time::{Duration, Instant};

use common::{seed_topology, wait_output, Overlay};

#[test]
fn trees_repair_around_a_dead_server_and_a_dead_relay() {
    let mut o = Overlay::start("repair", &seed_topology(), None);
    let c = o.client("c", "test", Some("o5"), 14.0).spawn().unwrap();
    o.wait_for("tree o5-o4-o8-s2", Duration::from_secs(10), |o| {
        o.branch("o8", "test").is_some_and(|b| b["upstream"] == "s2")
    });
    std::thread::sleep(Duration::from_secs(2));

    // The root server dies: o8 re-roots the tree at s1 (through o9).
    let t = Instant::now();
    o.kill("s2");
    o.wait_for("re-rooted at s1", Duration::from_secs(5), |o| {
        o.branch("o8", "test").is_some_and(|b| b["upstream"] == "o9" && b["server"] == "s1")
    });
    println!("server failover: tree re-rooted {} ms after the kill", t.elapsed().as_millis());
    assert_eq!(o.inspect("s1")["pipelines"], serde_json::json!(["test"]));
    assert_eq!(o.branch("o4", "test").unwrap()["upstream"], "o8", "o4 kept its upstream");
    assert_eq!(o.branch("o4", "test").unwrap()["server"], "s1", "the new root flowed down");
    std::thread::sleep(Duration::from_secs(2));

    // o9 dies too: o8 has no way left (its other neighbour is its
    // downstream), gives up, and o4 repairs through o3.
    let t = Instant::now();
    o.kill("o9");
    o.wait_for("o4 repaired through o3", Duration::from_secs(6), |o| {
        o.branch("o4", "test").is_some_and(|b| b["upstream"] == "o3")
    });
    println!("relay loss: o4 repaired {} ms after the kill", t.elapsed().as_millis());
    o.wait_for("o8 off the tree", Duration::from_secs(3), |o| o.branch("o8", "test").is_none());
    assert!(o.log("o8").contains("no way to the root"));

    let out = wait_output(c, Duration::from_secs(40));
    assert!(out.status.success(), "client: {}", o.client_log("c"));
    let s = o.stats("c");
    println!("client: {s}");
    assert!(s["frames_decoded"].as_u64().unwrap() > 200, "the viewer kept decoding: {s}");
    let gap = s["longest_gap_ms"].as_f64().unwrap();
    assert!(gap < 5000.0, "media came back after each fault (longest gap {gap} ms)");
}

#[test]
fn a_wedged_relay_is_found_by_the_silence_of_its_stream() {
    // Heartbeats so slow that three missed ones take over ten seconds: only
    // the silence of the stream can find the wedged relay in time.
    let mut o = Overlay::start_with_env("silence", &seed_topology(), None, &[("ONODE_HEARTBEAT_MS", "3000")]);
    let c = o.client("c", "test", Some("o5"), 12.0).spawn().unwrap();
    o.wait_for("tree o5-o4-o8-s2", Duration::from_secs(10), |o| {
        o.branch("o4", "test").is_some_and(|b| b["upstream"] == "o8")
    });
    std::thread::sleep(Duration::from_secs(2));

    let t = Instant::now();
    o.freeze("o8");
    o.wait_for("o4 repaired through o3", Duration::from_secs(6), |o| {
        o.branch("o4", "test").is_some_and(|b| b["upstream"] == "o3")
    });
    println!("wedged relay: o4 repaired {} ms after the freeze", t.elapsed().as_millis());
    assert!(
        o.log("o4").contains("went silent and its upstream does not answer"),
        "o4 should have found o8 by its silence: {}",
        o.log("o4")
    );
    o.thaw("o8");

    let out = wait_output(c, Duration::from_secs(40));
    assert!(out.status.success(), "client: {}", o.client_log("c"));
    let s = o.stats("c");
    let gap = s["longest_gap_ms"].as_f64().unwrap();
    assert!(gap < 3000.0, "media came back long before heartbeats could notice (longest gap {gap} ms): {s}");
    o.kill("o8");
}

/// Sends `Leave(stream)` to `to` as `as_node`, with that node's own
/// certificate: what an upstream that drops a branch by mistake (or state
/// lost in a restart that nobody noticed) looks like to the downstream.
fn leave_as(o: &Overlay, as_node: &str, to: &str, stream: &str) {
    use overlay_proto as pb;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = o.tls_dir();
    let read = |f: String| std::fs::read(tls.join(f)).unwrap();
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(read(format!("{as_node}.pem")), read(format!("{as_node}.key"))))
        .domain_name(o.addr[to].to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = Endpoint::from_shared(format!("https://{}:7070", o.addr[to]))
            .unwrap()
            .tls_config(config)
            .unwrap()
            .local_address(Some(o.addr[as_node]))
            .connect()
            .await
            .unwrap();
        pb::overlay_client::OverlayClient::new(channel)
            .leave(pb::LeaveRequest { stream: stream.into(), sender: as_node.into() })
            .await
            .unwrap();
    });
}

#[test]
fn a_branch_its_upstream_stopped_feeding_is_joined_again() {
    let o = Overlay::start("rejoin", &seed_topology(), None);
    let c = o.client("c", "test", Some("o5"), 16.0).spawn().unwrap();
    o.wait_for("o5 in the tree", Duration::from_secs(10), |o| o.branch("o5", "test").is_some());
    std::thread::sleep(Duration::from_secs(2));
    let up = o.branch("o5", "test").unwrap()["upstream"].as_str().unwrap().to_string();

    // The upstream drops o5's branch while both stay alive and answer pings.
    leave_as(&o, "o5", &up, "test");
    let fed = |o: &Overlay| {
        o.branch(&up, "test").is_some_and(|b| b["downstream"].as_array().is_some_and(|d| d.iter().any(|n| n == "o5")))
    };
    assert!(!fed(&o), "{up} still feeds o5 after the leave: {}", o.inspect(&up));
    o.wait_for("o5 joined again", Duration::from_secs(10), |o| {
        o.log("o5").contains("no longer feeds the stream: joining again")
            && o.branch("o5", "test").is_some_and(|b| b["repairing"] == false)
    });
    let now_up = o.branch("o5", "test").unwrap()["upstream"].as_str().unwrap().to_string();
    assert!(
        o.branch(&now_up, "test").is_some_and(|b| b["downstream"].as_array().unwrap().iter().any(|n| n == "o5")),
        "o5's new upstream {now_up} does not feed it: {}",
        o.inspect(&now_up)
    );

    let out = wait_output(c, Duration::from_secs(40));
    assert!(out.status.success(), "client: {}", o.client_log("c"));
    let fps: Vec<u64> = o.stats("c")["fps_timeline"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let last: Vec<u64> = fps.iter().rev().take(3).copied().collect();
    assert!(last.iter().all(|f| *f >= 10), "the viewer did not get its picture back: fps {fps:?}");
}
