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

/// `onode token mint` with the given key and arguments; the token.
fn mint(key: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(bin("onode")).args(["token", "mint", "--key"]).arg(key).args(args).output().unwrap();
    assert!(out.status.success(), "onode token mint: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn with_a_token_key_pops_serve_only_viewers_whose_token_grants_the_stream() {
    // The operator makes a key pair; nodes get only the public half.
    let keys = common::tempdir::Dir::new("trust-keys");
    let made = Command::new(bin("onode")).args(["token", "keygen", "--out"]).arg(keys.path()).output().unwrap();
    assert!(made.status.success(), "onode token keygen: {}", String::from_utf8_lossy(&made.stderr));
    let public = keys.path().join("token.pub");
    let private = keys.path().join("token.key");
    let o =
        Overlay::start_with_env("tokens", &seed_topology(), None, &[("OVERLAY_TOKEN_KEY", public.to_str().unwrap())]);

    let refused = |name: &str, token: Option<&str>, expect: &str| {
        let mut c = o.client(name, "test", Some("o5"), 2.0);
        if let Some(t) = token {
            c.args(["--token", t]);
        }
        let out = wait_output(c.spawn().unwrap(), Duration::from_secs(30));
        let log = o.client_log(name);
        assert!(!out.status.success(), "{name} was served; log:\n{log}");
        assert!(log.contains(expect), "{name}: expected {expect:?} in the client log:\n{log}");
    };
    refused("no-token", None, "a token is required");
    let other_stream = mint(&private, &["--sub", "bob", "--read", "clip*"]);
    refused("wrong-stream", Some(&other_stream), "does not grant read on stream \"test\"");
    // Minted by another operator's key: same claims, wrong signature.
    let stranger = common::tempdir::Dir::new("trust-stranger");
    let secret = stranger.path().join("secret");
    let made = Command::new(bin("onode")).args(["token", "new-secret"]).arg(&secret).output().unwrap();
    assert!(made.status.success(), "onode token new-secret: {}", String::from_utf8_lossy(&made.stderr));
    let forged = mint(&secret, &["--sub", "mallory", "--read", "*"]);
    refused("forged", Some(&forged), "not valid here");
    // Nothing of the refused requests reached the tree.
    assert!(o.branch("o5", "test").is_none(), "o5 joined test for refused viewers: {}", o.inspect("o5"));

    let good = mint(&private, &["--sub", "alice", "--read", "te*"]);
    let viewer = o.client("alice", "test", Some("o5"), 3.0).args(["--token", &good]).spawn().unwrap();
    let out = wait_output(viewer, Duration::from_secs(30));
    assert!(out.status.success(), "alice: {}", o.client_log("alice"));
    assert!(o.stats("alice")["frames_decoded"].as_u64().unwrap() > 0, "{}", o.stats("alice"));
    let log = o.log("o5");
    assert!(log.contains("token accepted") && log.contains("\"alice\""), "o5 did not log alice's token:\n{log}");
}

/// A control-plane client holding node `name`'s certificate of the overlay
/// (as a thief of that node's key would), to `addr`.
async fn as_node(o: &Overlay, name: &str, addr: std::net::IpAddr) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = o.tls_dir();
    let read = |f: String| std::fs::read(dir.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .identity(Identity::from_pem(read(format!("{name}.pem")), read(format!("{name}.key"))))
        .domain_name(addr.to_string());
    Endpoint::from_shared(format!("https://{addr}:7070")).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
}

#[test]
fn a_node_certificate_speaks_only_for_its_own_name() {
    // o6's key in the wrong hands: it opens TLS, but every call that names
    // another node (o5, a POP whose upstream is o4) is refused, and o5's
    // viewer plays on.
    use overlay_proto as pb;
    let o = Overlay::start("impostor", &seed_topology(), None);
    let viewer = o.client("viewer", "test", Some("o5"), 6.0).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refusals = runtime.block_on(async {
        let mut out = Vec::new();
        let boot = as_node(&o, "o6", o.bootstrapper()).await;
        let mut bootstrap = pb::bootstrap_client::BootstrapClient::new(boot);
        let r =
            bootstrap.register(pb::RegisterRequest { name: "o5".into(), role: "pop".into(), streams: vec![] }).await;
        out.push(("Register as o5", r.map(|_| ()).err()));
        let r = bootstrap.watch(pb::WatchRequest { name: "o5".into() }).await;
        out.push(("Watch as o5", r.map(|_| ()).err()));
        let mut relay = pb::overlay_client::OverlayClient::new(as_node(&o, "o6", o.addr["o4"]).await);
        let r = relay.leave(pb::LeaveRequest { stream: "test".into(), sender: "o5".into() }).await;
        out.push(("Leave as o5 at o4", r.map(|_| ()).err()));
        out
    });
    for (what, refusal) in refusals {
        let status = refusal.unwrap_or_else(|| panic!("{what} with o6's certificate was accepted"));
        println!("{what} with o6's certificate: {:?} {}", status.code(), status.message());
        assert!(
            matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
            "{what}: {status:?}"
        );
    }
    let out = wait_output(viewer, Duration::from_secs(30));
    assert!(out.status.success(), "viewer: {}", o.client_log("viewer"));
    let stats = o.stats("viewer");
    let fps: Vec<u64> = stats["fps_timeline"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
    let n = fps.len();
    assert!(n >= 3 && fps[n - 3..n - 1].iter().all(|&f| f >= 10), "o5's viewer stopped: {stats}");
}
