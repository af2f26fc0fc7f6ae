//! Real players watch the seed lab's streams over RTSP at its POPs:
//! ffmpeg (over UDP and TCP) at every POP, GStreamer's rtspsrc at one, a player
//! that keeps decoding while a relay of its tree is killed, and a SETUP
//! that names another host as its destination, refused. Needs root, ffmpeg
//! and GStreamer.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use netlab::faults;
use netlab::lab::{Lab, RoleKind};
use netlab::plan::ns_name;
use netlab::sys;

fn have(tool: &str) -> bool {
    sys::output(&["sh", "-c", &format!("command -v {tool}")], None).is_ok()
}

/// ffmpeg in `host`'s namespace decoding `url` for `secs` seconds: the
/// frames it decoded, and its log.
fn ffmpeg_frames(prefix: &str, host: &str, url: &str, secs: u32, transport: &str) -> (u64, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns_name(prefix, host), "timeout", &(secs + 20).to_string()])
        .args(["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "info", "-rtsp_transport", transport, "-i", url])
        .args(["-t", &secs.to_string(), "-map", "0:v", "-f", "null", "-", "-progress", "pipe:1"])
        .stdin(Stdio::null())
        .output()
        .expect("ffmpeg runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stderr), stdout);
    let frames = stdout.lines().filter_map(|l| l.strip_prefix("frame=")).filter_map(|v| v.trim().parse().ok()).last();
    assert!(out.status.success(), "ffmpeg on {host} for {url} failed ({}):\n{log}", out.status);
    (frames.unwrap_or(0), log)
}

/// Sends raw RTSP requests from `host` (python3's socket) and returns what
/// the POP answered.
fn raw_rtsp(prefix: &str, host: &str, addr: &str, requests: &[String]) -> String {
    let script = format!(
        "import socket,sys\ns=socket.create_connection(({addr:?},8554),timeout=10)\nout=b''\n\
         for r in {requests:?}:\n    s.sendall(r.encode())\n    d=b''\n\
         \n    while b'\\r\\n\\r\\n' not in d:\n        c=s.recv(65536)\n        if not c: break\n        d+=c\n\
         \n    out+=d\nsys.stdout.write(out.decode('utf-8','replace'))\n"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns_name(prefix, host), "python3", "-c", &script])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "raw RTSP from {host}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn players_watch_every_pop_over_rtsp_and_keep_decoding_through_a_relay_crash() {
    let Some((bins, _one)) = product_lab() else { return };
    for tool in ["ffmpeg", "gst-launch-1.0", "python3"] {
        if !have(tool) {
            println!("skipped: {tool} is not installed (.ci/deps installs it)");
            return;
        }
    }
    let lab = Lab::load(&lab_path("seed.json")).expect("seed lab");
    let (guard, st) = up(&lab, Some(&bins), None);
    let prefix = guard.prefix.clone();
    let overlay = lab.overlay.as_ref().expect("overlay");
    let pop_addr = |name: &str| overlay.nodes.iter().find(|n| n.name == name).unwrap().pop[0].to_string();
    let mut problems = Vec::new();

    // ffmpeg at every POP: c1 at o5, c2 at o6, c5 at o7 (the first viewer
    // of each POP builds its branch of the tree), over UDP and over TCP.
    let players =
        [("c1", "o5", "udp"), ("c2", "o6", "udp"), ("c5", "o7", "tcp"), ("c4", "o6", "tcp"), ("c1", "o5", "tcp")];
    for (host, pop, transport) in players {
        let url = format!("rtsp://{}:8554/test", pop_addr(pop));
        let (frames, log) = ffmpeg_frames(&prefix, host, &url, 5, transport);
        println!("ffmpeg on {host} over {transport}: {frames} frames from {url}");
        // 5 s at 30 fps is 150 frames; half is a generous floor.
        if frames < 75 {
            problems.push(format!("ffmpeg on {host} over {transport} decoded {frames} frames from {url}:\n{log}"));
        }
    }

    // GStreamer's rtspsrc on c3 (POP o6): 90 decoded frames, then EOS.
    // (Over TCP it decodes too, but its PAUSE at EOS sometimes finds the
    // connection closed, and gst-launch then exits 1: not judged here yet.)
    let url = format!("rtsp://{}:8554/test", pop_addr("o6"));
    for protocol in ["udp"] {
        let gst = Command::new("ip")
            .args(["netns", "exec", &ns_name(&prefix, "c3"), "timeout", "30", "gst-launch-1.0", "-q"])
            .args(["rtspsrc", &format!("location={url}"), &format!("protocols={protocol}"), "!", "rtph264depay"])
            .args(["!", "h264parse", "!", "avdec_h264", "!", "identity", "eos-after=90", "!", "fakesink", "sync=false"])
            .output()
            .expect("gst-launch runs");
        println!("gst-launch rtspsrc on c3 over {protocol}: {}", gst.status);
        if !gst.status.success() {
            problems.push(format!(
                "gst-launch rtspsrc on c3 over {protocol} did not decode 90 frames of {url}: {}\n{}\n{}",
                gst.status,
                String::from_utf8_lossy(&gst.stdout),
                String::from_utf8_lossy(&gst.stderr)
            ));
        }
    }

    // A SETUP naming another host (c2) as the destination is refused.
    let victim = lab.hosts.iter().find(|h| h.name == "c2").unwrap().ifaces[0].addr.addr.to_string();
    let answer = raw_rtsp(
        &prefix,
        "c3",
        &pop_addr("o6"),
        &[format!(
            "SETUP rtsp://{}:8554/test/trackID=0 RTSP/1.0\r\nCSeq: 1\r\n\
             Transport: RTP/AVP;unicast;destination={victim};client_port=5000-5001\r\n\r\n",
            pop_addr("o6")
        )],
    );
    println!("SETUP with destination={victim}: {}", answer.lines().next().unwrap_or(""));
    if !answer.starts_with("RTSP/1.0 403 ") {
        problems.push(format!("a SETUP with destination={victim} was not refused with 403:\n{answer}"));
    }

    // A relay of the tree of `test` dies while ffmpeg watches at o7. Every
    // POP of the seed lab has one neighbour, so the relay killed is the one
    // above it (o3's upstream): o3 repairs around it, the POP keeps its
    // upstream, the player its session.
    let url = format!("rtsp://{}:8554/test", pop_addr("o7"));
    let watch = {
        let prefix = prefix.clone();
        std::thread::spawn(move || ffmpeg_frames(&prefix, "c5", &url, 16, "udp"))
    };
    std::thread::sleep(Duration::from_secs(5));
    let edges = faults::tree(&lab, &st, &bins, "test").expect("tree of test");
    let is_relay = |n: &str| lab.roles.iter().any(|r| r.name == n && r.kind == RoleKind::Node);
    let mut above = Vec::new();
    let mut at = "o7".to_string();
    while let Some((up, _)) = edges.iter().find(|(_, d)| *d == at) {
        above.push(up.clone());
        at = up.clone();
    }
    let relay = above
        .get(1)
        .filter(|n| is_relay(n))
        .cloned()
        .unwrap_or_else(|| panic!("no relay two hops above o7: {edges:?}"));
    let host = &lab.hosts[lab.roles.iter().find(|r| r.name == relay).unwrap().host].name;
    faults::kill_node(&st, host).expect("kill the relay");
    println!("killed relay {relay} 5 s in (tree of test: {edges:?})");
    let (frames, log) = watch.join().unwrap();
    println!("ffmpeg on c5 through the crash of {relay}: {frames} frames in 16 s");
    // 16 s at 30 fps is 480 frames; a player stuck at the crash (6 s in)
    // would have about 180.
    if frames < 300 {
        problems.push(format!("ffmpeg on c5 decoded {frames} frames in 16 s across the crash of {relay}:\n{log}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    down_and_check_clean(guard);
}
