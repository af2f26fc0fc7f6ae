//! Real players watch the seed lab's streams over RTSP at its POPs:
//! two RTSP players and our own client at one POP with one copy of the
//! stream on each link of its tree, ffmpeg (over UDP and TCP) at every
//! POP with its receiver reports taken in, GStreamer's rtspsrc at one, a
//! player that keeps decoding while a relay of its tree is killed, and a
//! SETUP that names another host as its destination, refused. Needs root,
//! ffmpeg and GStreamer.

mod common;

use std::process::Command;
use std::time::Duration;

use std::collections::BTreeSet;

use common::*;
use netlab::lab::Lab;
use netlab::plan::ns_name;
use netlab::run::{self, ClientRun};
use netlab::{analysis, faults, media};

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
    let pop_addr = |name: &str| overlay.node(name).unwrap().pop[0].to_string();
    let mut problems = Vec::new();

    // Two RTSP players (ffmpeg on c2 over UDP, on c3 over TCP) and our own
    // client (c4) at o6: the POP fans the one copy it receives out to all
    // three; every link of the tree carries the stream once.
    let ids = media::stream_ids(&bins.onode, "test").expect("stream ids");
    media::install(&lab, &prefix, std::slice::from_ref(&ids)).expect("link counters");
    let stats = st.dir().join("c4-grpc.json");
    let client = ClientRun {
        host: "c4".into(),
        stream: "test".into(),
        duration_s: Some(14.0),
        headless: true,
        stats: stats.clone(),
        log: Some(st.dir().join("c4-grpc.log")),
    };
    let mut ours = run::start_client(&st, &bins, &client).expect("oclient on c4");
    std::thread::sleep(Duration::from_secs(2));
    let url = format!("rtsp://{}:8554/test", pop_addr("o6"));
    let rtsp_players: Vec<_> = [("c2", "udp"), ("c3", "tcp")]
        .into_iter()
        .map(|(host, transport)| {
            let (prefix, url) = (prefix.clone(), url.clone());
            std::thread::spawn(move || (host, transport, ffmpeg_frames(&prefix, host, &url, 10, transport)))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    let before = media::read(&lab, &prefix, std::slice::from_ref(&ids)).expect("counters");
    std::thread::sleep(Duration::from_secs(4));
    let after = media::read(&lab, &prefix, std::slice::from_ref(&ids)).expect("counters");
    let o6 = faults::inspect_node(&lab, &st, &bins, "o6").expect("inspect o6");
    let window = media::difference(&after, &before);
    let servers = lab.server_names();
    let viewed = vec![BTreeSet::from(["o6".to_string()])];
    let trees = analysis::check_trees(&["test".into()], &window, &window, &servers, &viewed);
    let links: Vec<String> = trees
        .trees
        .iter()
        .flat_map(|t| t.links.iter())
        .map(|(d, _, stress)| format!("{}->{} x{stress:.2}", d.from, d.to))
        .collect();
    println!("two RTSP players and oclient at o6: tree links {}", links.join(", "));
    let sessions = o6["sessions"].as_array().map(Vec::len).unwrap_or(0);
    if sessions != 3 {
        problems.push(format!("o6 should have 3 sessions (2 RTSP, 1 oclient) in the window, has {sessions}: {o6}"));
    }
    problems.extend(trees.problems.iter().map(|p| format!("two RTSP players and oclient at o6: {p}")));
    for player in rtsp_players {
        let (host, transport, (frames, log)) = player.join().unwrap();
        println!("ffmpeg on {host} over {transport} beside oclient: {frames} frames");
        if frames < 150 {
            problems.push(format!("ffmpeg on {host} over {transport} beside oclient decoded {frames} frames:\n{log}"));
        }
    }
    let _ = ours.wait();
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap_or_default()).unwrap_or_default();
    println!("oclient on c4 beside them: {} frames", ours["frames_decoded"]);
    if ours["frames_decoded"].as_u64().unwrap_or(0) < 200 {
        problems.push(format!("oclient on c4 beside two RTSP players decoded too little: {ours}"));
    }

    // ffmpeg at every POP: c1 at o5, c2 at o6, c5 at o7 (the first viewer
    // of each POP builds its branch of the tree), over UDP, then over TCP
    // (c4 at o6).
    // One wave per transport, the POPs at once.
    let waves = [
        [("c1", "o5", "udp"), ("c2", "o6", "udp"), ("c5", "o7", "udp")],
        [("c1", "o5", "tcp"), ("c4", "o6", "tcp"), ("c5", "o7", "tcp")],
    ];
    for wave in waves {
        let running: Vec<_> = wave
            .into_iter()
            .map(|(host, pop, transport)| {
                let url = format!("rtsp://{}:8554/test", pop_addr(pop));
                let prefix = prefix.clone();
                std::thread::spawn(move || {
                    let (frames, log) = ffmpeg_frames(&prefix, host, &url, 5, transport);
                    (host, transport, url, frames, log)
                })
            })
            .collect();
        for player in running {
            let (host, transport, url, frames, log) = player.join().unwrap();
            println!("ffmpeg on {host} over {transport}: {frames} frames from {url}");
            // 5 s at 30 fps is 150 frames; half is a generous floor.
            if frames < 75 {
                problems.push(format!("ffmpeg on {host} over {transport} decoded {frames} frames from {url}:\n{log}"));
            }
        }
    }

    // GStreamer's rtspsrc over TCP (rtspwatch) at o7, 8 s: it sends its
    // receiver reports on the RTCP channels of the connection (ffmpeg
    // sends none over TCP).
    let rtspwatch = bins.oclient.with_file_name("rtspwatch");
    let url = format!("rtsp://{}:8554/test", pop_addr("o7"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ns_name(&prefix, "c5")])
        .arg(&rtspwatch)
        .args([url.as_str(), "--tcp", "--duration", "8"])
        .output()
        .expect("rtspwatch runs");
    let watched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    println!("rtspsrc over tcp on c5 (rtspwatch): {watched}");
    if !out.status.success() || watched["frames_decoded"].as_u64().unwrap_or(0) < 120 {
        problems.push(format!(
            "rtspwatch over tcp on c5 decoded too little of {url}: {watched} {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    // Their receiver reports came to the POPs (over UDP to the port after
    // the data port from ffmpeg's 10 s at o6, over TCP on the RTCP
    // channels from rtspsrc's 8 s at o7) and were taken in. (ffmpeg sends
    // its first one some seconds in: the 5 s players are not judged.)
    for pop in ["o6", "o7"] {
        let state = faults::inspect_node(&lab, &st, &bins, pop).expect("inspect");
        let intake = &state["rtcp_intake"];
        println!("{pop}: players' RTCP taken in: {intake}");
        if intake["report_blocks"].as_u64().unwrap_or(0) == 0 {
            problems.push(format!("{pop} took in no receiver report from its players: {intake}"));
        }
    }

    // GStreamer's rtspsrc on c3 (POP o6), over UDP and over TCP: 90
    // decoded frames, then EOS. What is judged is the frames the sink
    // took (gst-launch -v prints one line per buffer), not gst-launch's
    // exit status: at EOS rtspsrc's own state change to READY flushes its
    // connection while its PAUSE is in flight ("connection flush busy
    // PAUSE" in its log), and now and then that surfaces as an error
    // ("Received end-of-file") and exit status 1, the POP having answered
    // everything it was sent.
    let url = format!("rtsp://{}:8554/test", pop_addr("o6"));
    for protocol in ["udp", "tcp"] {
        let gst = Command::new("ip")
            .args(["netns", "exec", &ns_name(&prefix, "c3"), "timeout", "30", "gst-launch-1.0", "-v"])
            .args(["rtspsrc", &format!("location={url}"), &format!("protocols={protocol}"), "!", "rtph264depay"])
            .args(["!", "h264parse", "!", "avdec_h264", "!", "identity", "eos-after=90"])
            .args(["!", "fakesink", "name=sink", "sync=false", "silent=false"])
            .output()
            .expect("gst-launch runs");
        let stdout = String::from_utf8_lossy(&gst.stdout);
        let frames = stdout.lines().filter(|l| l.contains("sink: last-message = chain")).count();
        println!("gst-launch rtspsrc on c3 over {protocol}: {frames} frames, {}", gst.status);
        // The sink reports 89 or 90 of the 90 buffers identity passes.
        if frames < 85 {
            let tail: Vec<&str> = stdout.lines().rev().take(20).collect();
            problems.push(format!(
                "gst-launch rtspsrc on c3 over {protocol} decoded {frames} of 90 frames of {url}: {}\n{}\n{}",
                gst.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
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
    let (relay, host) = relay_two_above(&lab, &edges, "o7");
    faults::kill_node(&st, &host).expect("kill the relay");
    println!("killed relay {relay} 5 s in (tree of test: {edges:?})");
    // 11 s in, what the player's receiver reports say, per track, in o7's
    // session table.
    std::thread::sleep(Duration::from_secs(6));
    let o7 = faults::inspect_node(&lab, &st, &bins, "o7").expect("inspect o7");
    let reception: Vec<&serde_json::Value> =
        o7["sessions"].as_array().into_iter().flatten().map(|s| &s["reception"]).collect();
    println!("o7's RTSP session, from the player's receiver reports: {reception:?}");
    let video_reports = reception.iter().filter_map(|r| r["0"]["reports"].as_u64()).max().unwrap_or(0);
    if video_reports == 0 {
        problems.push(format!("o7's session has no receiver report of the video 11 s in: {reception:?}"));
    }
    let (frames, log) = watch.join().unwrap();
    println!("ffmpeg on c5 through the crash of {relay}: {frames} frames in 16 s");
    // 16 s at 30 fps is 480 frames; a player stuck at the crash (6 s in)
    // would have about 180.
    if frames < 300 {
        problems.push(format!("ffmpeg on c5 decoded {frames} frames in 16 s across the crash of {relay}:\n{log}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    down_and_check_clean(guard);
    remove_lab_folder(&st.prefix);
}
