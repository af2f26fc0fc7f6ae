//! Who may do what, driven with the real tools on a TLS overlay on
//! loopback: the admin calls need the operator's certificate of this
//! overlay's CA, and a viewer cannot aim a POP's media at another host.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{bin, seed_topology, wait_output, Overlay};

#[test]
fn strangers_get_no_admin_answers_and_no_traffic_cannon() {
    let o = Overlay::start("trust", &seed_topology(), None);
    let target = o.addr["o4"].to_string();

    // The operator of this overlay is answered.
    let ok = o.onode_tool(&["inspect", &target]).output().unwrap();
    assert!(ok.status.success(), "operator inspect: {}", String::from_utf8_lossy(&ok.stderr));

    // Certificates of another CA (another overlay's, or self-made) are not.
    let other = o.dir.path().join("other-ca");
    let made = Command::new(bin("onode"))
        .args(["certs", "--topology"])
        .arg(o.dir.path().join("topology.json"))
        .arg("--out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success(), "onode certs: {}", String::from_utf8_lossy(&made.stderr));
    for args in [vec!["inspect", target.as_str()], vec!["overview", &o.bootstrapper().to_string()]] {
        let out = Command::new(bin("onode")).args(&args).arg("--tls-dir").arg(&other).output().unwrap();
        assert!(!out.status.success(), "{args:?} with a foreign CA was answered");
    }
    // Nor is a caller without any certificate (plain TCP to a TLS node).
    let out = Command::new(bin("onode")).args(["inspect", &target]).env_remove("OVERLAY_TLS_DIR").output().unwrap();
    assert!(!out.status.success(), "inspect without credentials was answered");

    // A viewer that asks for media at another host's address is refused,
    // naming the rule; the same viewer asking for itself plays.
    let victim = o.addr["o8"].to_string();
    let mut cannon = o.client("cannon", "test", Some("o5"), 2.0);
    cannon.args(["--bind", &victim]);
    let out = wait_output(cannon.spawn().unwrap(), Duration::from_secs(30));
    assert!(!out.status.success(), "a SETUP aimed at {victim} was accepted");
    let log = o.client_log("cannon");
    assert!(log.contains("media may only go to the address the session was opened from"), "client log:\n{log}");
    let inspect = o.inspect("o5");
    assert!(inspect["sessions"].as_array().is_none_or(|s| s.iter().all(|s| s["stream"].is_null())), "{inspect}");

    let viewer = o.client("viewer", "test", Some("o5"), 3.0).spawn().unwrap();
    let out = wait_output(viewer, Duration::from_secs(30));
    assert!(out.status.success(), "viewer: {}", o.client_log("viewer"));
    assert!(o.stats("viewer")["frames_decoded"].as_u64().unwrap() > 0, "{}", o.stats("viewer"));
}
