//! Media plane with real processes on loopback: GStreamer servers, relays
//! forwarding RTP by SSRC, POP unicast, headless clients decoding.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{seed_topology, wait_output, Overlay};

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn two_viewers_decode_one_pauses_and_the_tree_is_pruned_after() {
    let o = Overlay::start_with_env("media", &seed_topology(), None, &[("ONODE_METRICS_PORT", "9998")]);
    let mut a = o.client("a", "test", Some("o5"), 7.0).stdin(Stdio::piped()).spawn().unwrap();
    let b = o.client("b", "test", Some("o5"), 7.0).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let mut keys = a.stdin.take().unwrap();
    keys.write_all(b"p").unwrap();
    keys.flush().unwrap();
    o.wait_for("a paused at the POP", Duration::from_secs(3), |o| {
        o.branch("o5", "test").is_some_and(|br| br["playing_clients"] == 1 && br["local_viewers"] == 2)
    });
    // One upstream copy serves both viewers of o5.
    assert_eq!(o.branch("o4", "test").unwrap()["downstream"], serde_json::json!(["o5"]));
    // The metrics say the same: one viewer playing at o5 (a paused), fed
    // by o4, which feeds one neighbour; o5 has sent packets.
    let o5 = o.metrics("o5");
    let m = |series: &str| Overlay::metric(&o5, series);
    assert_eq!(m("overlay_stream_viewers{stream=\"test\",protocol=\"grpc\"}"), Some(1.0), "{o5}");
    assert!(o5.lines().any(|l| l.starts_with("overlay_stream_info{stream=\"test\",") && l.contains("upstream=\"o4\"")));
    assert!(m("overlay_relay_sent_packets_total").is_some_and(|n| n > 100.0), "{o5}");
    assert_eq!(m("overlay_neighbour_up{neighbour=\"o4\"}"), Some(1.0), "{o5}");
    assert!(m("overlay_stream_gop_cache_packets{stream=\"test\"}").is_some_and(|n| n > 0.0), "{o5}");
    let o4 = o.metrics("o4");
    assert_eq!(Overlay::metric(&o4, "overlay_stream_downstream_neighbours{stream=\"test\"}"), Some(1.0), "{o4}");
    // A viewer at another POP: o6 joins the tree at o4 mid-GOP and answers
    // SETUP once o4's last GOP is on its way, so PLAY starts with it.
    let c = o.client("c", "test", Some("o6"), 3.0).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    keys.write_all(b"p").unwrap();
    keys.flush().unwrap();
    let out_a = wait_output(a, Duration::from_secs(30));
    let out_b = wait_output(b, Duration::from_secs(30));
    let out_c = wait_output(c, Duration::from_secs(30));
    assert!(out_c.status.success(), "c: {}", o.client_log("c"));
    assert!(f(&o.stats("c"), "frames_decoded") > 30.0, "c decoded: {}", o.stats("c"));
    let burst = o.log("o6").lines().find_map(|l| {
        let n = l.split("PLAY starts with the cached GOP: ").nth(1)?;
        n.split_whitespace().next()?.parse::<u32>().ok()
    });
    assert!(burst.is_some_and(|n| n > 0), "o6 should start c with a GOP: {burst:?}\n{}", o.log("o6"));
    assert!(out_a.status.success(), "a: {}", o.client_log("a"));
    assert!(out_b.status.success(), "b: {}", o.client_log("b"));
    let (sa, sb) = (o.stats("a"), o.stats("b"));
    for s in [&sa, &sb] {
        assert!(f(s, "frames_decoded") > 60.0, "video decoded: {s}");
        assert!(f(s, "audio_buffers") > 50.0, "audio decoded: {s}");
        assert_eq!(s["pop_name"], "o5");
        assert!(s["first_frame_ms"].is_number());
    }
    assert!(f(&sa, "longest_gap_ms") >= 1500.0, "a's pause stopped its packets: {sa}");
    assert!(f(&sb, "longest_gap_ms") < 1000.0, "b kept receiving during a's pause: {sb}");
    // Sender reports reached the client through the tree: glass-to-glass
    // latency is measured (at least the jitter buffer's hold, at most a
    // fraction of a second on loopback).
    let g2g = &sb["glass_to_glass_ms"];
    assert!(g2g["samples"].as_u64().unwrap() > 50, "{g2g}");
    let median = g2g["median"].as_f64().unwrap();
    assert!((60.0..1000.0).contains(&median), "glass-to-glass median {median} ms");
    // Lip sync: sound and picture captured together are presented together.
    let skew = f(&sb, "av_skew_ms");
    assert!(skew.abs() < 45.0, "audio trails video by {skew} ms: {sb}");
    assert_eq!(sa["pauses"], 1);
    assert!(f(&sa, "packets_received") < f(&sb, "packets_received") * 0.85, "a missed its pause: {sa} {sb}");
    // Both gone: tree pruned to the root, pipeline stopped.
    o.wait_for("pruned", Duration::from_secs(5), |o| {
        ["o5", "o4", "o8", "s2"].iter().all(|n| o.branch(n, "test").is_none())
    });
    o.wait_for("pipeline stopped", Duration::from_secs(5), |o| o.inspect("s2")["pipelines"] == serde_json::json!([]));
}

#[test]
fn a_file_stream_plays_and_garbage_is_counted_not_fatal() {
    let media = common::tempdir::Dir::new("files");
    let clip = media.path().join("clip.mkv");
    let status = Command::new("gst-launch-1.0")
        .args([
            "-q",
            "videotestsrc",
            "num-buffers=90",
            "pattern=ball",
            "!",
            "video/x-raw,format=I420,width=320,height=240,framerate=30/1",
        ])
        .args([
            "!",
            "x264enc",
            "key-int-max=30",
            "speed-preset=ultrafast",
            "!",
            "h264parse",
            "!",
            "matroskamux",
            "name=m",
        ])
        .args(["!", "filesink"])
        .arg(format!("location={}", clip.display()))
        .args(["audiotestsrc", "num-buffers=150", "!", "audioconvert", "!", "opusenc", "!", "m."])
        .status()
        .unwrap();
    assert!(status.success(), "make the clip with gst-launch-1.0");
    let o = Overlay::start("file", &seed_topology(), Some(media.path()));
    assert!(o.inspect("s1")["catalogue"].as_array().unwrap().iter().any(|s| s == "clip"));

    let c = o.client("c", "clip", Some("o7"), 6.0).spawn().unwrap();
    o.wait_for("o7 carries clip", Duration::from_secs(10), |o| o.branch("o7", "clip").is_some());
    let relay = o.branch("o7", "clip").unwrap()["upstream"].as_str().unwrap().to_string();
    let target = std::net::SocketAddr::new(o.addr[&relay], 7071);
    let junk = UdpSocket::bind((o.addr["o5"], 0)).unwrap();
    for i in 0..50u8 {
        junk.send_to(&[i; 40], target).unwrap();
    }
    let mut unknown = [0u8; 60];
    unknown[0] = 0x80;
    unknown[1] = 96;
    unknown[8..12].copy_from_slice(&0xabcdef01u32.to_be_bytes());
    junk.send_to(&unknown, target).unwrap();
    let out = wait_output(c, Duration::from_secs(30));
    assert!(out.status.success(), "client: {}", o.client_log("c"));
    let s = o.stats("c");
    assert!(f(&s, "frames_decoded") > 60.0, "file video decoded: {s}");
    assert!(f(&s, "audio_buffers") > 20.0, "file audio decoded: {s}");
    let counters = &o.inspect(&relay)["relay"];
    assert!(counters["dropped_not_rtp"].as_u64().unwrap() >= 50, "{counters}");
    assert!(counters["dropped_unknown_ssrc"].as_u64().unwrap() >= 1, "{counters}");
    assert!(counters["sent"].as_u64().unwrap() > 100, "{counters}");
}
