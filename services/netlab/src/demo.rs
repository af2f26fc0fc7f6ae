//! The demo scenario on a lab that is up: media counters on every overlay
//! link, the lab's clients started on their schedule (so each stream gets a
//! cold first viewer and warm later ones), a steady window measured while
//! all watch, then the report. The lab tests run the same scenario.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::analysis::{self, ClientOutcome, ClientStats, TreeReport};
use crate::cpu;
use crate::lab::{Lab, RoleKind};
use crate::media::{self, LinkCount};
use crate::run::{self, Bins, ClientRun};
use crate::state::LabState;
use crate::sys;

/// The stream every server offers without a file.
pub const BUILTIN_STREAM: &str = "test";

/// Makes `<dir>/<stream>.mkv` (10 s of H.264 main profile and Opus from test sources)
/// for every stream but the built-in one.
pub fn make_media(dir: &Path, streams: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for s in streams.iter().filter(|s| s.as_str() != BUILTIN_STREAM) {
        let file = dir.join(format!("{s}.mkv"));
        let location = format!("location={}", file.display());
        let pipeline = [
            "gst-launch-1.0",
            "-q",
            "-e",
            "videotestsrc",
            "num-buffers=250",
            "pattern=ball",
            "!",
            "video/x-raw,format=I420,width=640,height=360,framerate=25/1",
            "!",
            "x264enc",
            "tune=zerolatency",
            "speed-preset=veryfast",
            "key-int-max=25",
            "bitrate=800",
            "!",
            // Main: what browsers' WebRTC takes, so the servers pass the
            // file through.
            "video/x-h264,profile=main",
            "!",
            "h264parse",
            "!",
            "queue",
            "!",
            "mux.",
            "audiotestsrc",
            "num-buffers=500",
            "samplesperbuffer=960",
            "wave=sine",
            "freq=440",
            "!",
            "audio/x-raw,rate=48000,channels=2",
            "!",
            "audioconvert",
            "!",
            "opusenc",
            "!",
            "queue",
            "!",
            "mux.",
            "matroskamux",
            "name=mux",
            "!",
            "filesink",
            &location,
        ];
        sys::output(&pipeline, None)
            .with_context(|| format!("making the {s} stream's file {} with GStreamer", file.display()))?;
    }
    Ok(())
}

/// Makes `path`: what an encoder would publish, 10 s of H.264 (main
/// profile, B-frames, a keyframe a second) and AAC sound, with ffmpeg.
pub fn make_encoder_file(path: &Path) -> Result<()> {
    let out = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", "10", "-c:v", "libx264", "-profile:v", "main", "-g", "30", "-pix_fmt", "yuv420p"])
        .args(["-b:v", "800k", "-c:a", "aac", "-b:a", "96k", "-ac", "2"])
        .arg(path)
        .output()
        .context("running ffmpeg")?;
    if !out.status.success() {
        bail!("making {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The streams the lab's clients watch, in order of first use.
pub fn client_streams(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in lab.roles.iter().filter(|r| r.kind == RoleKind::Client) {
        let s = r.stream.clone().unwrap_or_default();
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

/// What a scenario measured.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub streams: Vec<String>,
    pub clients: Vec<ClientOutcome>,
    /// Counts over the whole run.
    pub whole: Vec<LinkCount>,
    /// Counts over the steady window, when the schedule left one.
    pub window: Option<(f64, Vec<LinkCount>)>,
    pub trees: TreeReport,
    /// CPU per process over the clients' run (lab roles, link emulators
    /// and clients).
    pub cpu: Vec<cpu::Usage>,
    /// Busy share of the whole machine over the same time (0..1).
    pub machine_busy: f64,
}

impl Scenario {
    /// Every problem found: clients, warm starts, then trees.
    pub fn problems(&self) -> Vec<String> {
        let mut p = analysis::client_problems(&self.clients);
        p.extend(analysis::warm_start_problems(&self.clients));
        p.extend(self.trees.problems.iter().cloned());
        p
    }
}

/// CPU per process over the clients' run: the lab's processes, and the
/// clients' own reports.
fn cpu_usage(spent: &[cpu::Spent], trees: &TreeReport, clients: &[ClientOutcome]) -> Vec<cpu::Usage> {
    let on_tree =
        |name: &str| trees.trees.iter().flat_map(|t| &t.links).any(|(d, _, _)| d.from == name || d.to == name);
    let mut out = cpu::classify(spent, on_tree);
    out.extend(clients.iter().filter_map(|c| {
        let us_per_s = c.stats.as_ref()?.cpu_us_per_s?;
        Some(cpu::Usage { name: c.label.clone(), kind: cpu::Kind::Client, us_per_s })
    }));
    out
}

enum Event {
    Start(usize),
    WindowOpens,
    WindowCloses,
}

struct Planned {
    outcome: ClientOutcome,
    duration_s: f64,
    stats: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Runs the lab's clients and measures. The lab must be up and ready.
pub fn play(lab: &Lab, st: &mut LabState, bins: &Bins) -> Result<Scenario> {
    let streams = client_streams(lab);
    if streams.is_empty() {
        bail!("the lab has no client roles");
    }
    let ids = streams.iter().map(|s| media::stream_ids(&bins.onode, s)).collect::<Result<Vec<_>>>()?;
    media::install(lab, &st.prefix, &ids)?;
    st.counted_streams = ids.clone();
    st.save()?;

    let clients_dir = st.dir().join("clients");
    std::fs::create_dir_all(&clients_dir)?;
    let mut planned: Vec<Planned> = Vec::new();
    for r in lab.roles.iter().filter(|r| r.kind == RoleKind::Client) {
        let host = lab.hosts[r.host].name.clone();
        let n = planned.iter().filter(|p| p.outcome.host == host).count();
        let label = if n == 0 { host.clone() } else { format!("{host}#{}", n + 1) };
        let file = label.replace('#', "-");
        planned.push(Planned {
            outcome: ClientOutcome {
                label,
                host: host.clone(),
                stream: r.stream.clone().unwrap_or_default(),
                start_s: r.start_s,
                expected_pop: lab.local_pop(r.host),
                expected_pop_node: lab
                    .local_pop(r.host)
                    .and_then(|a| lab.overlay.as_ref()?.owner_of(a.into()))
                    .map(|n| n.name.clone()),
                pop_node: None,
                stats: None,
                failure: None,
                path_delay_ms: None,
            },
            duration_s: r.duration_s,
            stats: clients_dir.join(format!("{file}.json")),
            log: st.dir().join("logs").join(format!("{file}-client.log")),
            child: None,
        });
    }
    planned.sort_by(|a, b| a.outcome.start_s.total_cmp(&b.outcome.start_s));

    let last_start = planned.iter().map(|p| p.outcome.start_s).fold(0.0, f64::max);
    let first_end = planned.iter().map(|p| p.outcome.start_s + p.duration_s).fold(f64::INFINITY, f64::min);
    let last_end = planned.iter().map(|p| p.outcome.start_s + p.duration_s).fold(0.0, f64::max);
    let (win_start, win_end) = (last_start + 2.0, first_end - 1.0);
    let has_window = win_end - win_start >= 2.0;

    let before = media::read(lab, &st.prefix, &ids)?;
    let tracked = cpu::track(st);
    let machine_before = cpu::machine_ticks();
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let sleep_until = |t: Instant| sys::sleep(t.saturating_duration_since(Instant::now()));
    let mut win_before: Option<Vec<LinkCount>> = None;
    let mut window = None;

    let mut events: Vec<(f64, Event)> =
        (0..planned.len()).map(|i| (planned[i].outcome.start_s, Event::Start(i))).collect();
    if has_window {
        events.push((win_start, Event::WindowOpens));
        events.push((win_end, Event::WindowCloses));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let result = (|| -> Result<()> {
        for (t, what) in events {
            sleep_until(at(t))?;
            match what {
                Event::Start(i) => {
                    let p = &mut planned[i];
                    let run = ClientRun {
                        host: p.outcome.host.clone(),
                        stream: p.outcome.stream.clone(),
                        duration_s: Some(p.duration_s),
                        headless: true,
                        stats: p.stats.clone(),
                        log: Some(p.log.clone()),
                    };
                    let _ = std::fs::remove_file(&p.stats);
                    eprintln!(
                        "netlab: t={:>4.1}s client {} watches {} (POP expected {})",
                        t0.elapsed().as_secs_f64(),
                        p.outcome.label,
                        p.outcome.stream,
                        p.outcome.expected_pop.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
                    );
                    match run::start_client(st, bins, &run) {
                        Ok(c) => p.child = Some(c),
                        Err(e) => p.outcome.failure = Some(format!("{e:#}")),
                    }
                }
                Event::WindowOpens => win_before = Some(media::read(lab, &st.prefix, &ids)?),
                Event::WindowCloses => {
                    let after = media::read(lab, &st.prefix, &ids)?;
                    let b = win_before.take().unwrap_or_default();
                    window = Some((win_end - win_start, media::difference(&after, &b)));
                }
            }
        }
        // Wait for the clients, then give up on stragglers.
        let deadline = at(last_end + 30.0);
        while planned.iter_mut().any(|p| p.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())) {
            if Instant::now() > deadline {
                break;
            }
            sys::sleep(Duration::from_millis(200))?;
        }
        Ok(())
    })();
    let cpu_wall = t0.elapsed();
    let machine_busy = machine_before.zip(cpu::machine_ticks()).map(|(a, b)| cpu::machine_busy(a, b)).unwrap_or(0.0);
    let spent = cpu::spent(tracked, cpu_wall);
    for p in &mut planned {
        let Some(mut child) = p.child.take() else {
            continue;
        };
        match child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                p.outcome.failure =
                    Some(format!("oclient exited with {status}; {}:\n{}", p.log.display(), run::log_tail(&p.log, 6)));
            }
            Ok(Some(_)) => {}
            _ => {
                sys::stop_processes(&[child.id() as i32], Duration::from_secs(2));
                let _ = child.wait();
                p.outcome.failure = Some(format!("oclient did not finish in time (killed); {}", p.log.display()));
            }
        }
    }
    result?;

    let after = media::read(lab, &st.prefix, &ids)?;
    let whole = media::difference(&after, &before);
    let mut clients = Vec::new();
    for p in planned {
        let mut o = p.outcome;
        match std::fs::read_to_string(&p.stats) {
            Ok(text) => match serde_json::from_str::<ClientStats>(&text) {
                Ok(s) => {
                    o.pop_node =
                        s.pop_addr().and_then(|a| lab.overlay.as_ref()?.owner_of(a.into())).map(|n| n.name.clone());
                    o.stats = Some(s);
                }
                Err(e) => {
                    o.failure.get_or_insert_with(|| format!("stats file {} unreadable: {e}", p.stats.display()));
                }
            },
            Err(_) => {
                o.failure.get_or_insert_with(|| format!("no stats file {}", p.stats.display()));
            }
        }
        clients.push(o);
    }

    let servers = lab.server_names();
    // POPs that served a stream must be on its tree.
    let viewed: Vec<BTreeSet<String>> = streams
        .iter()
        .map(|s| {
            clients
                .iter()
                .filter(|c| &c.stream == s && c.stats.as_ref().is_some_and(|s| s.frames_decoded > 0))
                .filter_map(|c| c.pop_node.clone())
                .collect()
        })
        .collect();
    let win_counts = window.as_ref().map(|(_, w)| w.as_slice()).unwrap_or(&whole);
    let trees = analysis::check_trees(&streams, win_counts, &whole, &servers, &viewed);
    if let Ok(delays) = crate::delays::OverlayDelays::of(lab) {
        for c in &mut clients {
            let tree = trees.trees.iter().find(|t| t.stream == c.stream);
            c.path_delay_ms = tree.zip(c.pop_node.as_deref()).and_then(|(t, pop)| path_delay_ms(t, pop, &delays));
        }
    }
    let cpu = cpu_usage(&spent, &trees, &clients);
    Ok(Scenario { streams, clients, whole, window, trees, cpu, machine_busy })
}

/// Walks up a stream's tree from `pop` to the root, summing the link
/// delays (ms) of the overlay links the stream came down.
fn path_delay_ms(tree: &analysis::StreamTree, pop: &str, delays: &crate::delays::OverlayDelays) -> Option<f64> {
    let mut at = pop.to_string();
    let mut total = 0.0;
    for _ in 0..=tree.links.len() {
        let Some((d, _, _)) = tree.links.iter().find(|(d, _, _)| d.to == at) else {
            return Some(total);
        };
        total += delays.link_ms.get(&(d.to.clone(), d.from.clone())).copied()?;
        at = d.from.clone();
    }
    None
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The demo report.
pub fn report(sc: &Scenario) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== Clients");
    let _ = writeln!(
        out,
        "{:<7} {:<6} {:>6}  {:<15} {:>7} {:>8} {:>10} {:>7} {:>6} {:>13} {:>7} {:>8} {:>6} {:>6}",
        "client",
        "stream",
        "start",
        "POP",
        "RTT ms",
        "setup ms",
        "1st frame",
        "frames",
        "audio",
        "lost/received",
        "jitter",
        "g2g ms",
        "path",
        "A/V ms"
    );
    for c in &sc.clients {
        let s = c.stats.clone().unwrap_or_default();
        let have = c.stats.is_some();
        let pop = if have { format!("{} {}", c.pop_node.as_deref().unwrap_or("?"), s.pop) } else { "-".into() };
        let not_local = have && c.expected_pop_node.is_some() && c.pop_node != c.expected_pop_node;
        let _ = writeln!(
            out,
            "{:<7} {:<6} {:>5.1}s  {:<15} {:>7} {:>8} {:>7} ms {:>7} {:>6} {:>13} {:>7} {:>8} {:>6} {:>6}{}{}",
            c.label,
            c.stream,
            c.start_s,
            pop,
            fmt_opt(s.pop_rtt(), 2),
            fmt_opt(s.setup_ms, 0),
            fmt_opt(s.first_frame_ms, 0),
            s.frames_decoded,
            s.audio_buffers,
            format!("{}/{}", s.packets_lost, s.packets_received),
            fmt_opt(have.then_some(s.jitter_ms), 1),
            fmt_opt(s.glass_to_glass_ms.as_ref().map(|l| l.median), 0),
            fmt_opt(c.path_delay_ms, 1),
            fmt_opt(s.av_skew_ms, 0),
            if not_local {
                format!("  (not the POP on its LAN: {})", c.expected_pop_node.as_deref().unwrap_or("?"))
            } else {
                String::new()
            },
            c.failure.as_ref().map(|f| format!("  FAILED: {}", f.lines().next().unwrap_or(""))).unwrap_or_default()
        );
    }

    let _ = writeln!(
        out,
        "(g2g: median glass-to-glass latency, capture at the server to presentation by the client's video \
         sink, from RTCP sender reports; path: one-way link delays from the root server down the tree to the \
         POP; A/V: how far the sound trails (+) or leads (-) the picture, median)"
    );
    let _ = writeln!(
        out,
        "\n== Time to first frame (cold: first viewer of a stream, the tree is built; warm: later viewers)"
    );
    for (stream, ff) in analysis::cold_and_warm(&sc.clients) {
        let (cold, warm) = (ff.cold, ff.warm);
        let cold = cold.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
        let warm = if warm.is_empty() {
            "-".to_string()
        } else {
            warm.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(out, "{stream:<8} cold {cold}; warm {warm}");
    }

    let _ = writeln!(out, "\n== Overlay links: bytes per stream over the whole run (direction of the media)");
    let mut header = format!("{:<10}", "link");
    for s in &sc.streams {
        let _ = write!(header, " {:>12} {:<9}", format!("{s} bytes"), "");
    }
    let _ = write!(header, " {:>12} {:>7}", "all RTP", "stress");
    let _ = writeln!(out, "{header}");
    let mut totals = vec![0u64; sc.streams.len()];
    let mut total_all = 0u64;
    for pair in sc.whole.chunks(2) {
        let [ab, ba] = pair else { continue };
        let mut line = format!("{:<10}", format!("{}-{}", ab.dir.from, ab.dir.to));
        for (k, total) in totals.iter_mut().enumerate() {
            let x = ab.streams.get(k).copied().unwrap_or_default().bytes;
            let y = ba.streams.get(k).copied().unwrap_or_default().bytes;
            *total += x + y;
            let arrow = match (x > 0, y > 0) {
                (true, false) => format!("{}>{}", ab.dir.from, ab.dir.to),
                (false, true) => format!("{}>{}", ba.dir.from, ba.dir.to),
                (true, true) => "both ways".into(),
                (false, false) => String::new(),
            };
            let _ = write!(line, " {:>12} {:<9}", x + y, arrow);
        }
        total_all += ab.all.bytes + ba.all.bytes;
        let stress = sc
            .trees
            .trees
            .iter()
            .flat_map(|t| t.links.iter())
            .filter(|(d, _, _)| *d == ab.dir || *d == ba.dir)
            .map(|(_, _, s)| *s)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        let _ = writeln!(out, "{line} {:>12} {:>7}", ab.all.bytes + ba.all.bytes, fmt_opt(stress, 2));
    }
    let mut line = format!("{:<10}", "total");
    for t in &totals {
        let _ = write!(line, " {:>12} {:<9}", t, "");
    }
    let _ = writeln!(out, "{line} {total_all:>12}");
    match &sc.window {
        Some((secs, _)) => {
            let _ = writeln!(out, "(stress: packets on a link / packets into its sender, over a {secs:.0} s window with every client watching)");
        }
        None => {
            let _ =
                writeln!(out, "(stress over the whole run: the schedule left no window with every client watching)");
        }
    }

    let _ = writeln!(
        out,
        "\n== CPU while the clients ran (µs of CPU per second; machine {:.0}% busy on {} cores)",
        sc.machine_busy * 100.0,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let _ = write!(out, "{}", cpu::table(&sc.cpu));

    let problems = sc.problems();
    let _ = writeln!(out, "\n== Checks");
    if problems.is_empty() {
        let _ = writeln!(out, "ok: every client decoded from the POP on its LAN; warm starts no slower than cold ones; each stream crossed each overlay link at most once; links off the trees carried no media");
    } else {
        for p in &problems {
            let _ = writeln!(out, "PROBLEM: {p}");
        }
        let _ = writeln!(
            out,
            "(while the clients ran the machine was {:.0}% busy; busiest processes: {})",
            sc.machine_busy * 100.0,
            cpu::busiest(&sc.cpu, 5)
        );
    }
    out
}
