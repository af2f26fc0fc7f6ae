//! A stranger on a client LAN of the seed lab (c3, next to the viewer c2,
//! on POP o6's LAN) attacks the overlay while viewers of `test` watch: media aimed
//! at c2, overlay calls under real nodes' names, membership and admin
//! calls, oversized names and a session flood. The lab runs as users
//! would secure it: TLS on the control plane and POPs that require viewer
//! tokens. The intruder tries three times: over plain TCP, over TLS with
//! the CA certificate every viewer has, and with a valid viewer token
//! stolen from a viewer. Nothing may be taken, every viewer keeps
//! playing, and the POP's memory stays within a bound. Needs root.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use netlab::faults;
use netlab::lab::{Lab, RoleKind};
use netlab::plan::ns_name;
use netlab::run::{self, ClientRun};
use serde_json::Value;

/// How much a POP's resident memory may grow under the attacks.
const RSS_BOUND_KIB: u64 = 32 * 1024;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn onode(bins: &netlab::run::Bins, args: &[&str]) -> String {
    let out = Command::new(&bins.onode).args(args).output().unwrap();
    assert!(out.status.success(), "onode {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_stranger_on_a_client_lan_takes_nothing_and_viewers_keep_playing() {
    let Some((bins, _one)) = product_lab() else { return };
    let intruder = bins.dir().join("intruder");
    assert!(intruder.is_file(), "no intruder binary at {}", intruder.display());
    let lab = Lab::load(&lab_path("seed.json")).expect("seed lab");

    // Viewers need a token: the operator's secret is in the lab's
    // environment, every viewer (and, stolen, the intruder) holds one.
    let keys = std::env::temp_dir().join(format!("netlab-attacks-{}", std::process::id()));
    std::fs::create_dir_all(&keys).unwrap();
    let secret = keys.join("token.secret");
    onode(&bins, &["token", "new-secret", secret.to_str().unwrap()]);
    let token =
        onode(&bins, &["token", "mint", "--key", secret.to_str().unwrap(), "--sub", "lab-viewer", "--read", "*"]);
    std::env::set_var("OVERLAY_TOKEN_KEY", &secret);
    std::env::set_var("OVERLAY_TOKEN", &token);

    let (guard, st) = up(&lab, Some(&bins), None);
    let prefix = guard.prefix.clone();
    let viewers = ["c1", "c2", "c4", "c5"];
    let mut children = Vec::new();
    for host in viewers {
        let c = ClientRun {
            host: host.into(),
            stream: "test".into(),
            duration_s: Some(22.0),
            headless: true,
            stats: st.dir().join("clients").join(format!("attacks-{host}.json")),
            log: Some(st.dir().join("logs").join(format!("attacks-{host}-client.log"))),
        };
        children.push((c.clone(), run::start_client(&st, &bins, &c).unwrap()));
    }
    std::thread::sleep(Duration::from_secs(6));

    // Targets: POP o6 (c3's), a relay on the tree of `test` with a real
    // downstream, the bootstrapper; the victim is c2.
    let edges = faults::tree(&lab, &st, &bins, "test").expect("tree of test");
    let overlay = lab.overlay.as_ref().expect("overlay");
    let node = |name: &str| overlay.node(name).unwrap();
    let is_relay = |n: &str| lab.roles.iter().any(|r| r.name == n && r.kind == RoleKind::Node);
    let (relay, downstream) =
        edges.iter().find(|(u, _)| is_relay(u)).cloned().unwrap_or_else(|| panic!("no relay on the tree: {edges:?}"));
    let pop_addr = node("o6").pop[0].to_string();
    let victim = lab.hosts.iter().find(|h| h.name == "c2").unwrap().ifaces[0].addr.addr.to_string();
    let pop_pid = st.processes.iter().find(|p| p.name == "o6" && p.role == RoleKind::Pop).expect("o6 runs").pid;
    let rss_before = rss_kib(pop_pid);
    println!("tree of test: {edges:?}; attacking relay {relay} (downstream {downstream}), POP o6 at {pop_addr}, victim c2 at {victim}");

    let ca = run::tls_dir(&prefix).join("ca.pem");
    let rounds: [(&str, Vec<String>); 3] = [
        ("plain TCP", vec![]),
        ("TLS with the CA certificate", vec!["--ca".into(), ca.display().to_string()]),
        (
            "TLS and a stolen viewer token",
            vec!["--ca".into(), ca.display().to_string(), "--token".into(), token.clone()],
        ),
    ];
    let mut taken = Vec::new();
    for (round, extra) in &rounds {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns_name(&prefix, "c3")]).arg(&intruder);
        cmd.args(["--pop", &pop_addr, "--pop-name", "o6", "--relay", &node(&relay).names[0].to_string()]);
        cmd.args(["--downstream", &downstream, "--bootstrap", &st.bootstrap.clone().unwrap(), "--victim", &victim]);
        // No credentials but those given here.
        cmd.args(extra).env_remove("OVERLAY_TLS_DIR").env_remove("OVERLAY_TOKEN").env_remove("OVERLAY_TOKEN_KEY");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "intruder ({round}): {}", String::from_utf8_lossy(&out.stderr));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let a: Value = serde_json::from_str(line).unwrap();
            println!(
                "{round}: {}: {} ({})",
                a["attack"],
                if a["taken"] == true { "TAKEN" } else { "refused" },
                a["detail"]
            );
            if a["taken"] == true {
                taken.push(format!("{round}: {}: {}", a["attack"], a["detail"]));
            }
            // With a valid token the SETUP passes the token check: it must
            // be the destination rule that refuses it.
            if extra.len() == 4 && a["attack"] == "media aimed at another host" {
                let why = a["detail"].as_str().unwrap_or_default();
                assert!(why.contains("may only go to the address"), "{round}: refused for another reason: {why}");
            }
        }
    }
    // The POP's RTSP edge wants a token too, the way players give one.
    let narrow =
        onode(&bins, &["token", "mint", "--key", secret.to_str().unwrap(), "--sub", "narrow", "--read", "other-*"]);
    let rtsp = |url: String| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns_name(&prefix, "c3"), "timeout", "30", "ffmpeg", "-hide_banner", "-nostats"])
            .args(["-rtsp_transport", "udp", "-i", &url, "-t", "3", "-map", "0:v", "-f", "null", "-"])
            .args(["-progress", "pipe:1"])
            .output()
            .expect("ffmpeg runs (.ci/deps installs it)");
        let frames: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("frame="))
            .filter_map(|v| v.trim().parse().ok())
            .next_back()
            .unwrap_or(0);
        (out.status.success(), frames, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let base = format!("{pop_addr}:8554/test");
    let mut rtsp_problems = Vec::new();
    for (what, url, want) in [
        ("no token", format!("rtsp://{base}"), "401"),
        ("a token for other streams", format!("rtsp://{base}?token={narrow}"), "403"),
        ("the token in the URL", format!("rtsp://{base}?token={token}"), ""),
        // (ffmpeg keeps at most 127 characters of credentials, too few for
        // a JWT: the token as the URL's password is for other players.)
    ] {
        let (ok, frames, log) = rtsp(url);
        println!("RTSP with {what}: {} ({frames} frames)", if ok { "played" } else { "refused" });
        let right = if want.is_empty() { ok && frames >= 30 } else { !ok && frames == 0 && log.contains(want) };
        if !right {
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            rtsp_problems.push(format!("RTSP with {what}: played {ok}, {frames} frames, expected {want:?}: {tail:?}"));
        }
    }

    // So does its WebRTC edge, as WHEP players give one: a Bearer token.
    let whep = format!("http://{pop_addr}:8889/test/whep");
    for (what, bearer, want) in [
        ("no token", None, 401),
        ("a token for other streams", Some(narrow.as_str()), 403),
        ("a token that grants the stream", Some(token.as_str()), 201),
    ] {
        let (status, body) = http(&prefix, "c3", "POST", &whep, "application/sdp", bearer, OFFER);
        println!("WHEP with {what}: {status}");
        if status != want {
            rtsp_problems.push(format!("WHEP with {what}: {status} {body:?}, expected {want}"));
        }
    }

    // A server takes a publisher only with a token that grants publishing
    // the name (RTSP: in the URL, as players give one).
    let publisher = onode(
        &bins,
        &["token", "mint", "--key", secret.to_str().unwrap(), "--sub", "lab-encoder", "--publish", "cam*"],
    );
    let s1 = "10.0.25.10";
    let sdp = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nt=0 0\r\nm=video 0 RTP/AVP 96\r\n\
               a=rtpmap:96 H264/90000\r\na=control:streamid=0\r\n";
    for (what, query, want) in [
        ("no token", String::new(), "401"),
        ("a viewer's token", format!("?token={token}"), "403"),
        ("a token that grants publishing cam*", format!("?token={publisher}"), "200"),
    ] {
        let announce = format!(
            "ANNOUNCE rtsp://{s1}:8554/cam1{query} RTSP/1.0\r\nCSeq: 1\r\nContent-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        let answer = raw_rtsp(&prefix, "c3", s1, &[announce]);
        let status = answer.split_whitespace().nth(1).unwrap_or("");
        println!("RTSP publish with {what}: {}", answer.lines().next().unwrap_or(""));
        if status != want {
            rtsp_problems.push(format!("RTSP publish with {what}: {answer:?}, expected {want}"));
        }
    }

    let rss_after = rss_kib(pop_pid);
    println!("POP o6 resident memory: {rss_before} KiB before, {rss_after} KiB after the attacks");

    let mut problems = taken;
    problems.extend(rtsp_problems);
    if rss_after.saturating_sub(rss_before) > RSS_BOUND_KIB {
        problems.push(format!("POP o6 grew by {} KiB under attack (bound {RSS_BOUND_KIB})", rss_after - rss_before));
    }
    for (c, mut child) in children {
        let status = child.wait().unwrap();
        let stats: Value = std::fs::read_to_string(&c.stats)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| panic!("viewer {} wrote no stats ({status}); logs in /tmp/netlab-{prefix}", c.host));
        let fps: Vec<u64> =
            stats["fps_timeline"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        let n = fps.len();
        let last = if n >= 5 { fps[n - 5..n - 1].to_vec() } else { fps.clone() };
        let gap = stats["longest_gap_ms"].as_f64().unwrap_or(f64::INFINITY);
        println!("{}: {} frames, longest gap {gap:.0} ms, last seconds {last:?} fps", c.host, stats["frames_decoded"]);
        if !status.success() {
            problems.push(format!("viewer {} failed ({status})", c.host));
        }
        if let Some(p) = faults::decoding_problem(&last, gap) {
            problems.push(format!("viewer {}: {p}", c.host));
        }
    }
    let _ = std::fs::remove_dir_all(&keys);
    assert!(problems.is_empty(), "{}\n(logs in /tmp/netlab-{prefix})", problems.join("\n"));
    down_and_check_clean(guard);
    remove_lab_folder(&prefix);
}
