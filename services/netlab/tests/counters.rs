//! The measuring and impairing machinery on a three-namespace lab, without
//! the product: RTP crafted by the test crosses a router, the per-link
//! counters pick it up by SSRC (and leave RTCP and other SSRCs out), and
//! loss and rate settings take effect. Needs root; skips otherwise.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use common::*;
use netlab::lab::{Lab, LabSpec};
use netlab::media::{self, Count};
use netlab::state::StreamIds;
use netlab::{plan, sys};

const LAB: &str = r#"{
    "overlay": "mini-overlay.json",
    "hosts": [{"name": "s1"}, {"name": "r", "kind": "router"}, {"name": "o1"}],
    "links": [
        {"a": {"host": "s1", "addr": "10.9.1.1/24"}, "b": {"host": "r", "addr": "10.9.1.2/24"},
         "impair": {"rate_kbit": 50000, "delay_ms": 20}},
        {"a": {"host": "r", "addr": "10.9.2.2/24"}, "b": {"host": "o1", "addr": "10.9.2.1/24"}}
    ],
    "roles": [{"host": "s1", "role": "bootstrapper"}, {"host": "o1", "role": "pop"}]
}"#;

const OVERLAY: &str = r#"{
  "s1": {"neighbours": ["10.9.2.1"], "names": ["10.9.1.1"]},
  "o1": {"neighbours": ["10.9.1.1s"], "names": ["10.9.2.1"], "pop": ["10.9.2.1"]}
}"#;

fn mini(loss_into_o1: Option<f64>) -> Lab {
    let mut spec: LabSpec = serde_json::from_str(LAB).expect("lab JSON");
    if let Some(l) = loss_into_o1 {
        spec.links[1].a.impair_out.loss_pct = Some(l);
    }
    Lab::from_parts(spec, None, Some(("mini-overlay.json".into(), OVERLAY.to_string()))).expect("mini lab validates")
}

/// An RTP (or, with payload type 200, RTCP-like) packet with this SSRC.
fn packet(pt: u8, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, pt, 0, 1, 0, 0, 0, 0];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0u8; 100]);
    p
}

fn send_from(prefix: &str, host: &str, to: SocketAddr, packets: Vec<Vec<u8>>) {
    sys::in_netns(&plan::ns_name(prefix, host), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for p in packets {
            sock.send_to(&p, to).expect("send");
            // Stay under the link's rate and the receiver's queue.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        // Let the emulated links' delay lines drain.
        std::thread::sleep(std::time::Duration::from_millis(200));
    })
    .expect("in namespace");
}

/// Sends from `host` to `addr` (a port nobody counts) until `host` has
/// resolved `addr`'s link-layer address.
fn settle_neighbour(prefix: &str, host: &str, addr: &str) {
    let ns = plan::ns_name(prefix, host);
    let to: SocketAddr = format!("{addr}:9999").parse().expect("address");
    for _ in 0..50 {
        let neigh = sys::output(&["ip", "-n", &ns, "neigh", "show", addr], None).unwrap_or_default();
        if ["REACHABLE", "STALE", "DELAY", "PERMANENT"].iter().any(|s| neigh.contains(s)) {
            return;
        }
        sys::in_netns(&ns, move || {
            let _ = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(&[0u8; 8], to));
        })
        .expect("in namespace");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{host} does not resolve {addr} after 10 s");
}

fn ids() -> Vec<StreamIds> {
    vec![
        StreamIds { stream: "test".into(), video: 0x1234_5678, audio: 0x0000_0042 },
        StreamIds { stream: "clip".into(), video: 7, audio: 8 },
    ]
}

fn count_into_o1(lab: &Lab, prefix: &str) -> (Count, Vec<Count>) {
    let counts = media::read(lab, prefix, &ids()).expect("read counters");
    let l = counts.iter().find(|l| l.dir.from == "s1" && l.dir.to == "o1").expect("direction s1 -> o1");
    (l.all, l.streams.clone())
}

#[test]
fn ssrc_counters_count_rtp_per_stream_across_a_router() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = mini(None);
    assert!(lab.warnings.is_empty(), "{:?}", lab.warnings);
    let (guard, st) = up(&lab, None, None);
    media::install(&lab, &guard.prefix, &ids()).expect("install counters");
    let to = SocketAddr::from((Ipv4Addr::new(10, 9, 2, 1), 7071));
    let mut pkts = Vec::new();
    for _ in 0..30 {
        pkts.push(packet(96, 0x1234_5678)); // test video
        pkts.push(packet(0x80 | 97, 0x42)); // test audio, marker bit set
        pkts.push(packet(96, 7)); // clip video
        pkts.push(packet(200, 0x1234_5678)); // RTCP: not media
        pkts.push(packet(96, 999)); // RTP of no counted stream
    }
    send_from(&guard.prefix, "s1", to, pkts);
    // Traffic to another port is not media.
    send_from(
        &guard.prefix,
        "s1",
        SocketAddr::from((Ipv4Addr::new(10, 9, 2, 1), 9999)),
        vec![packet(96, 0x1234_5678); 5],
    );
    let (all, streams) = count_into_o1(&lab, &guard.prefix);
    assert_eq!(all.packets, 120, "all RTP: test v+a, clip v, unknown");
    assert_eq!(streams[0].packets, 60, "test: video and audio");
    assert_eq!(streams[1].packets, 30, "clip: video only");
    // IP length: 20 + 8 + 12 + 100.
    assert_eq!(streams[1].bytes, 30 * 140);
    // Re-installing resets.
    media::install(&lab, &guard.prefix, &ids()).expect("reinstall");
    assert_eq!(count_into_o1(&lab, &guard.prefix).0.packets, 0);
    // The s1-r link runs through an emulator with its rate and delay; the
    // RTP crossed it.
    let e = st.emulators.iter().find(|e| e.link == "s1-r").expect("emulator of s1-r");
    let s = netlab::run::emulator_stats(e).expect("emulator stats");
    assert_eq!((s.a2b.settings.rate_kbit, s.a2b.settings.delay_ms), (50000, 20.0));
    assert!(s.a2b.sent_packets >= 155, "{:?}", s.a2b);
    down_and_check_clean(guard);
    remove_lab_folder(&st.prefix);
}

#[test]
fn loss_drops_about_the_configured_share() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 30% loss from r into o1: counted after the loss, at o1.
    let lab = mini(Some(30.0));
    let (guard, st) = up(&lab, None, None);
    media::install(&lab, &guard.prefix, &ids()).expect("install counters");
    // The emulated link loses ARP too: let r learn o1's address first, or
    // a lost request holds the whole burst for a second.
    settle_neighbour(&guard.prefix, "r", "10.9.2.1");
    let n = 2000;
    send_from(&guard.prefix, "s1", SocketAddr::from((Ipv4Addr::new(10, 9, 2, 1), 7071)), vec![packet(96, 7); n]);
    let got = count_into_o1(&lab, &guard.prefix).1[1].packets as f64;
    // Binomial: mean 1400, sd about 20; allow 6 sd.
    assert!((got - 1400.0).abs() < 125.0, "{got} of {n} arrived with 30% loss");
    down_and_check_clean(guard);
    remove_lab_folder(&st.prefix);
}
