//! Shared by the lab tests: skipping without root, a guard that tears a lab
//! down on drop (also when the test panics), reachability and the issue's
//! acceptance checks on a lab.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use netlab::demo;
use netlab::lab::Lab;
use netlab::plan::ns_name;
use netlab::run::{self, Bins, UpOptions};
use netlab::state::{self, LabState};
use netlab::{plan, probe, sys};

/// Lab tests take the machine's two cores: one lab at a time per binary.
pub static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Why the lab tests cannot run here, if they cannot.
pub fn cannot_run() -> Option<String> {
    if !sys::is_root() {
        return Some("not root (network namespaces need root)".into());
    }
    for tool in ["ip", "nft", "tc"] {
        if sys::output(&["sh", "-c", &format!("command -v {tool}")], None).is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    // The labs' links have delays: they need the link emulator.
    if let Err(e) = run::find_linkem(None) {
        return Some(format!("{e:#}"));
    }
    None
}

/// What a test of the whole product needs: root and the lab tools, the
/// built binaries, and this test binary's one-lab lock. `None` (after
/// printing why the test is skipped) when this machine cannot run it.
pub fn product_lab() -> Option<(Bins, std::sync::MutexGuard<'static, ()>)> {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return None;
    }
    let bins = match product_bins() {
        Ok(b) => b,
        Err(why) => {
            println!("skipped: {why}");
            return None;
        }
    };
    Some((bins, ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())))
}

/// The onode and oclient binaries, or why there are none.
pub fn product_bins() -> Result<Bins, String> {
    let bins = Bins::find(None).map_err(|e| format!("{e:#}"))?;
    if !bins.oclient.is_file() {
        return Err(format!("no oclient next to {}", bins.onode.display()));
    }
    Ok(bins)
}

pub fn lab_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netns/labs").join(name).canonicalize().expect("lab file exists")
}

/// A prefix no other test or lab uses.
pub fn test_prefix() -> String {
    format!("nt{}", &state::new_prefix()[2..])
}

/// Tears its lab down when dropped, even when the test panics.
pub struct LabGuard {
    pub prefix: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = run::down(&self.prefix) {
            eprintln!("tearing lab {} down failed: {e:#}", self.prefix);
        }
    }
}

/// Brings `lab` up under a fresh prefix; roles only when `bins` is given.
pub fn up(lab: &Lab, bins: Option<&Bins>, media: Option<PathBuf>) -> (LabGuard, LabState) {
    let prefix = test_prefix();
    let guard = LabGuard { prefix: prefix.clone() };
    let opts =
        UpOptions { media_dir: media, network_only: bins.is_none(), ..UpOptions::new(&prefix, bins.map(Bins::dir)) };
    let st = run::up(lab, &opts).unwrap_or_else(|e| panic!("lab up failed: {e:#}"));
    (guard, st)
}

/// Every host pings every other host's addresses.
pub fn assert_full_reachability(lab: &Lab, prefix: &str) {
    let all = lab.all_addresses();
    let mut failures = Vec::new();
    for (h, host) in lab.hosts.iter().enumerate() {
        let targets: Vec<_> = all.iter().filter(|(o, _)| *o != h).map(|(_, a)| *a).collect();
        let missing = probe::ping_from(&plan::ns_name(prefix, &host.name), targets, Duration::from_secs(3))
            .expect("ping from namespace");
        if !missing.is_empty() {
            failures.push(format!("{} cannot reach {missing:?}", host.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The route `host` uses toward `dst`, as the kernel says.
pub fn route_get(prefix: &str, host: &str, dst: &str) -> String {
    let ns = plan::ns_name(prefix, host);
    sys::output(&["ip", "-n", &ns, "route", "get", dst], None).expect("ip route get")
}

/// Drops the guard and checks that nothing of the lab is left.
pub fn down_and_check_clean(guard: LabGuard) {
    let prefix = guard.prefix.clone();
    drop(guard);
    let left = sys::lab_namespaces(&prefix).expect("ip netns list");
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    // Safe to run twice.
    run::down(&prefix).expect("second down");
}

/// Removes a lab's folder (logs, stats): call when the test passed, so a
/// failed test leaves them to read.
pub fn remove_lab_folder(prefix: &str) {
    let _ = std::fs::remove_dir_all(state::lab_dir(prefix));
}

/// A lab's outcome: what the scenario measured and where its logs are.
pub struct Outcome {
    pub scenario: demo::Scenario,
    pub prefix: String,
}

impl Outcome {
    /// Fails the test with every problem and the log folder.
    pub fn assert_no_problems(&self) {
        let problems = self.scenario.problems();
        assert!(
            problems.is_empty(),
            "{}
(logs in {})",
            problems.join("\n"),
            state::lab_dir(&self.prefix).display()
        );
    }
}

/// The acceptance on a lab: every client decodes from the POP on
/// its LAN, each stream crosses each overlay link at most once while all
/// watch, links off the trees carry no media.
pub fn acceptance(lab: &Lab, bins: &Bins) -> Outcome {
    let media = std::env::temp_dir().join(format!("netlab-test-media-{}", test_prefix()));
    demo::make_media(&media, &demo::client_streams(lab)).expect("making the media files");
    let (guard, mut st) = up(lab, Some(bins), Some(media.clone()));
    let prefix = guard.prefix.clone();
    assert_full_reachability(lab, &prefix);
    let sc = demo::play(lab, &mut st, bins).unwrap_or_else(|e| panic!("scenario failed: {e:#}"));
    println!("{}", demo::report(&sc));
    down_and_check_clean(guard);
    let _ = std::fs::remove_dir_all(&media);
    Outcome { scenario: sc, prefix }
}

/// An SDP offer as a browser makes it (recvonly H.264 and Opus).
pub const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
    m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\n\
    a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
    a=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\na=rtpmap:102 H264/90000\r\n\
    a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\n\
    a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n\
    a=setup:actpass\r\na=mid:1\r\na=recvonly\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\n";

/// An HTTP request from `host` (python3's urllib), with a Bearer token
/// when given: status and body.
pub fn http(
    prefix: &str,
    host: &str,
    method: &str,
    url: &str,
    content_type: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = bearer.map(|t| format!("Bearer {t}")).unwrap_or_default();
    let script = format!(
        "import urllib.request,urllib.error,sys\n\
         r=urllib.request.Request({url:?},data={body:?}.encode() if {method:?}=='POST' else None,method={method:?},\
         headers={{'Content-Type':{content_type:?},'Authorization':{auth:?}}})\n\
         try:\n    x=urllib.request.urlopen(r,timeout=15); print(x.status); print(x.read().decode())\n\
         except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &netlab::plan::ns_name(prefix, host), "python3", "-c", &script])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    (status.trim().parse().unwrap_or(0), body.trim().to_string())
}

/// The relay two hops above `pop` on the tree `edges` (upstream,
/// downstream) and its lab host: in the seed lab a POP's only neighbour
/// is a relay, so killing the one above it makes that neighbour repair
/// while the POP keeps its upstream.
pub fn relay_two_above(lab: &Lab, edges: &[(String, String)], pop: &str) -> (String, String) {
    let mut above = Vec::new();
    let mut at = pop.to_string();
    while let Some((up, _)) = edges.iter().find(|(_, d)| *d == at) {
        above.push(up.clone());
        at = up.clone();
    }
    let is_relay = |n: &str| lab.roles.iter().any(|r| r.name == n && r.kind == netlab::lab::RoleKind::Node);
    let relay = above
        .get(1)
        .filter(|n| is_relay(n))
        .cloned()
        .unwrap_or_else(|| panic!("no relay two hops above {pop}: {edges:?}"));
    let host = lab.hosts[lab.roles.iter().find(|r| r.name == relay).unwrap().host].name.clone();
    (relay, host)
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    sys::output(&["sh", "-c", &format!("command -v {tool}")], None).is_ok()
}

/// ffmpeg in `host`'s namespace decoding `url` for `secs` seconds: the
/// frames it decoded, and its log.
pub fn ffmpeg_frames(prefix: &str, host: &str, url: &str, secs: u32, transport: &str) -> (u64, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns_name(prefix, host), "timeout", &(secs + 20).to_string()])
        .args(["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "info", "-rtsp_transport", transport, "-i", url])
        .args(["-t", &secs.to_string(), "-map", "0:v", "-f", "null", "-", "-progress", "pipe:1"])
        .stdin(Stdio::null())
        .output()
        .expect("ffmpeg runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stderr), stdout);
    let frames =
        stdout.lines().filter_map(|l| l.strip_prefix("frame=")).filter_map(|v| v.trim().parse().ok()).next_back();
    assert!(out.status.success(), "ffmpeg on {host} for {url} failed ({}):\n{log}", out.status);
    (frames.unwrap_or(0), log)
}

/// Sends raw RTSP requests from `host` (python3's socket) to `addr`:8554
/// and returns what came back.
pub fn raw_rtsp(prefix: &str, host: &str, addr: &str, requests: &[String]) -> String {
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
