//! The container deployment: `just images` builds every role image, `just
//! compose-up` brings the original topology up as a compose project, every
//! client container decodes frames (c2 of the `test` stream), rtspwatch from
//! the client image plays `test` over RTSP at c1's POP, and `just
//! compose-down` leaves no container, network or volume of the project.
//! The deployment's control plane runs over mutual TLS with certificates
//! compose-up issues.
//! Skipped, saying so, where no Docker daemon runs.
//!
//! The images are built from the binaries this test run built (BIN_DIR):
//! a release build on top would double the test's time.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const PROJECT: &str = "overlay";
/// Client name, stream: as in netns/labs/seed.json.
const CLIENTS: &[(&str, &str)] = &[("c1", "test"), ("c2", "test"), ("c3", "test"), ("c4", "clip"), ("c5", "clip")];
/// How long each client watches.
const CLIENT_SECS: u32 = 8;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn docker_running() -> Result<(), String> {
    match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("docker info: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("docker: {e}")),
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn just(args: &[&str]) -> Command {
    let mut cmd = Command::new("just");
    cmd.args(args).current_dir(repo()).env("CLIENT_DURATION_S", CLIENT_SECS.to_string());
    cmd
}

/// Containers, networks and volumes of the project, one per line.
fn leftovers() -> String {
    let label = format!("label=com.docker.compose.project={PROJECT}");
    let mut all = String::new();
    for (what, format) in
        [(&["ps", "-a"][..], "{{.Names}}"), (&["network", "ls"][..], "{{.Name}}"), (&["volume", "ls"][..], "{{.Name}}")]
    {
        let out = run(Command::new("docker").args(what).args(["--filter", &label, "--format", format]));
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    all
}

/// Takes the deployment down when the test ends, also on panic.
struct Deployment {
    up: bool,
}

impl Deployment {
    fn down(&mut self) {
        if std::mem::take(&mut self.up) {
            run(&mut just(&["compose-down"]));
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.up {
            let _ = Command::new(repo().join("deploy/compose.sh")).arg("down").output();
        }
    }
}

/// deploy/compose.yml is what deploy/gen-compose.py makes of the seed lab
/// with netlab's routes.
#[test]
fn compose_file_is_generated_from_the_lab() {
    let netlab = common::bin("onode").with_file_name("netlab");
    if !netlab.exists() {
        eprintln!("skipped: {} is not built (cargo build -p netlab)", netlab.display());
        return;
    }
    run(Command::new("python3").arg(repo().join("deploy/gen-compose.py")).arg("--check").arg("--netlab").arg(&netlab));
}

#[test]
fn compose_deployment_of_the_original_topology() {
    if let Err(why) = docker_running() {
        eprintln!("skipped: no Docker daemon runs here ({why})");
        return;
    }
    let existing = leftovers();
    assert!(
        existing.trim().is_empty(),
        "project {PROJECT} already exists (`just compose-down` removes it):\n{existing}"
    );
    let started = Instant::now();
    let bin_dir = common::bin("onode").parent().unwrap().to_path_buf();

    run(just(&["images"]).env("BIN_DIR", &bin_dir));
    let images_done = started.elapsed();
    for role in ["server", "node", "pop", "client"] {
        run(Command::new("docker").args(["image", "inspect", &format!("overlay-{role}:latest")]));
    }

    let mut deployment = Deployment { up: true };
    let up = run(&mut just(&["compose-up"]));
    let overview = String::from_utf8_lossy(&up.stdout);
    assert!(overview.contains("\"ready\": true"), "the overlay is not ready after compose-up:\n{overview}");
    let up_done = started.elapsed();
    // The control plane is mutual TLS: without the operator's certificate
    // the bootstrapper answers nothing.
    let bare = Command::new("docker")
        .args(["exec", &format!("{PROJECT}_s1_1"), "env", "-u", "OVERLAY_TLS_DIR", "onode", "overview", "10.0.25.10"])
        .output()
        .unwrap();
    assert!(
        !bare.status.success(),
        "overview without a certificate was answered:\n{}",
        String::from_utf8_lossy(&bare.stdout)
    );

    let compose = repo().join("deploy/compose.sh");
    for (client, stream) in CLIENTS {
        let waited = Command::new(&compose).args(["wait", client, "90"]).output().unwrap();
        let logs = || {
            let out = Command::new("docker").args(["logs", "--tail", "30", &format!("{PROJECT}_{client}_1")]).output();
            out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default()
        };
        assert!(waited.status.success(), "client {client} failed ({}):\n{}", waited.status, logs());
        let stats = run(Command::new(&compose).args(["stats", client]));
        let stats: Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
        assert_eq!(stats["stream"], *stream);
        let frames = stats["frames_decoded"].as_u64().unwrap_or(0);
        assert!(frames > 0, "client {client} decoded no frame of {stream}: {stats}");
        eprintln!("{client}: {stream} via POP {} from {}: {frames} frames", stats["pop_name"], stats["server"]);
    }
    // A standard RTSP player (rtspwatch: GStreamer's rtspsrc, in the client
    // image) on c1's network watches at its POP, as README shows.
    let format = "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}\n{{end}}";
    let nets = run(Command::new("docker").args(["inspect", "-f", format, &format!("{PROJECT}_c1_1")]));
    let nets = String::from_utf8_lossy(&nets.stdout).into_owned();
    let lan = nets.lines().map(str::trim).find(|n| !n.is_empty() && !n.contains("telemetry"));
    let lan = lan.unwrap_or_else(|| panic!("c1 is on no LAN network: {nets:?}"));
    let watched = run(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        lan,
        "--entrypoint",
        "rtspwatch",
        "overlay-client:latest",
        "rtsp://10.0.6.2:8554/test",
        "--duration",
        "4",
    ]));
    let watched: Value = serde_json::from_slice(&watched.stdout).expect("rtspwatch JSON");
    let frames = watched["frames_decoded"].as_u64().unwrap_or(0);
    assert!(frames >= 30, "rtspwatch on {lan} decoded {frames} frames over RTSP from o5: {watched}");
    eprintln!("rtspwatch on {lan}: {frames} frames over RTSP from o5, first after {} ms", watched["first_frame_ms"]);
    // The operator's view: the live map on the host's loopback shows every
    // node alive, and each node's metrics are there for the Prometheus of
    // the `metrics` profile (deploy/prometheus.yml) to scrape.
    let map: Value = serde_json::from_str(&common::http_get("127.0.0.1:9997", "/state")).expect("map state JSON");
    let nodes = map["nodes"].as_array().cloned().unwrap_or_default();
    let dead: Vec<&Value> = nodes.iter().filter(|n| n["alive"] != true).collect();
    assert!(
        nodes.len() == 10 && dead.is_empty(),
        "the map at 127.0.0.1:9997 shows {} nodes, not alive: {dead:?}",
        nodes.len()
    );
    let prometheus = std::fs::read_to_string(repo().join("deploy/prometheus.yml")).expect("deploy/prometheus.yml");
    let targets: Vec<&str> =
        prometheus.lines().filter_map(|l| l.trim().strip_prefix("- targets: [\"")?.strip_suffix("\"]")).collect();
    assert_eq!(targets.len(), 10, "deploy/prometheus.yml names {} targets:\n{prometheus}", targets.len());
    for target in &targets {
        let text = common::http_get(target, "/metrics");
        assert!(text.contains("overlay_node_info{"), "no node info in the metrics at {target}:\n{text}");
    }
    eprintln!("map: {} nodes alive; metrics scraped at {} targets", nodes.len(), targets.len());
    let clients_done = started.elapsed();

    deployment.down();
    let left = leftovers();
    assert!(left.trim().is_empty(), "compose-down left these behind:\n{left}");
    assert!(!repo().join("deploy/tls").exists(), "compose-down left deploy/tls behind");
    eprintln!(
        "images {:.0} s, up {:.0} s, clients {:.0} s, down {:.0} s",
        images_done.as_secs_f64(),
        (up_done - images_done).as_secs_f64(),
        (clients_done - up_done).as_secs_f64(),
        (started.elapsed() - clients_done).as_secs_f64()
    );
    assert!(started.elapsed() < Duration::from_secs(600), "the deployment test took {:?}", started.elapsed());
}
