//! Judging a run from what was measured: the clients' stats files and the
//! per-link media counters. Pure functions, so the checks themselves are
//! tested without a lab.
//!
//! The distribution trees are read off the counters of a window in which
//! every client watches: for each stream, the directions that carried it
//! must form a tree rooted at a server (every node gets the stream from at
//! most one neighbour, no link carries it both ways, no cycle), every POP
//! with viewers must be in it, and each link must carry it once: its packet
//! count is compared with the count on the link that feeds its sender (for
//! a server's links, with the median of the tree). Links that carried no
//! counted stream must have carried no RTP at all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::media::{Count, Direction, LinkCount};

/// Highest accepted ratio between a link's packets and its feeder's.
pub const MAX_STRESS: f64 = 1.25;

/// The stats file `oclient --stats-json` writes (fields it may lack are
/// left at their defaults).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClientStats {
    pub client: String,
    pub stream: String,
    /// The chosen POP's address.
    pub pop: String,
    /// Measured RTT per POP address.
    pub pop_rtt_ms: BTreeMap<String, f64>,
    pub frames_decoded: u64,
    pub audio_buffers: u64,
    pub packets_received: u64,
    pub packets_lost: i64,
    pub jitter_ms: f64,
    pub first_frame_ms: Option<f64>,
    /// From starting to the end of SETUP, when oclient reports it.
    pub setup_ms: Option<f64>,
    pub bytes_received: u64,
    /// From the first request to the POP (CONNECT_POP) to the first frame.
    pub request_to_first_frame_ms: Option<f64>,
    /// Capture-to-presentation latency of the video, when oclient reports it.
    pub glass_to_glass_ms: Option<Latency>,
    /// How far the sound trails (positive) or leads the picture, ms.
    pub av_skew_ms: Option<f64>,
    /// CPU the client used, µs per second of its run.
    pub cpu_us_per_s: Option<f64>,
}

/// Audio may trail the picture by this much (ms) before viewers notice
/// (ITU-R BT.1359 detectability threshold).
pub const AUDIO_LAG_NOTICED_MS: f64 = 125.0;
/// Audio may lead the picture by this much (ms) before viewers notice.
pub const AUDIO_LEAD_NOTICED_MS: f64 = 45.0;

/// A latency distribution as oclient reports it (ms).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub median: f64,
    pub p95: f64,
    pub max: f64,
    pub samples: u64,
}

impl ClientStats {
    /// The chosen POP's address, without a port if one is given.
    pub fn pop_addr(&self) -> Option<Ipv4Addr> {
        let host = self.pop.rsplit_once(':').map_or(self.pop.as_str(), |(h, _)| h);
        host.parse().ok()
    }

    /// The RTT measured to the chosen POP.
    pub fn pop_rtt(&self) -> Option<f64> {
        self.pop_rtt_ms.get(&self.pop).copied().or_else(|| {
            let a = self.pop_addr()?.to_string();
            self.pop_rtt_ms.iter().find(|(k, _)| k.split(':').next() == Some(a.as_str())).map(|(_, v)| *v)
        })
    }
}

/// One client of a run and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientOutcome {
    /// Host name (with `#n` when a host runs several clients).
    pub label: String,
    pub host: String,
    pub stream: String,
    pub start_s: f64,
    /// The POP address on the client's LAN, and the POP's overlay name.
    pub expected_pop: Option<Ipv4Addr>,
    pub expected_pop_node: Option<String>,
    /// The overlay name of the POP the client chose (a POP may have
    /// several addresses: any of them is the same POP).
    pub pop_node: Option<String>,
    pub stats: Option<ClientStats>,
    /// Why there are no stats, or how oclient failed.
    pub failure: Option<String>,
    /// Sum of the one-way link delays from the stream's server down the
    /// tree to the client's POP, as the lab file sets them (ms).
    pub path_delay_ms: Option<f64>,
}

/// Problems with the clients: no frames, no stats, a POP not on the LAN,
/// sound noticeably out of sync with the picture.
pub fn client_problems(clients: &[ClientOutcome]) -> Vec<String> {
    let mut out = Vec::new();
    for c in clients {
        match &c.stats {
            None => out.push(format!(
                "client {} ({}): no stats: {}",
                c.label,
                c.stream,
                c.failure.as_deref().unwrap_or("oclient wrote none")
            )),
            Some(s) => {
                if s.frames_decoded == 0 {
                    out.push(format!("client {} ({}): decoded no frame", c.label, c.stream));
                }
                if let Some(want) = &c.expected_pop_node {
                    if c.pop_node.as_ref() != Some(want) {
                        out.push(format!(
                            "client {} ({}): chose POP {} ({}), not {want} on its LAN ({})",
                            c.label,
                            c.stream,
                            c.pop_node.as_deref().unwrap_or("unknown"),
                            s.pop,
                            c.expected_pop.map(|a| a.to_string()).unwrap_or_default()
                        ));
                    }
                }
                if let Some(skew) = s.av_skew_ms.filter(|k| *k > AUDIO_LAG_NOTICED_MS || *k < -AUDIO_LEAD_NOTICED_MS) {
                    out.push(format!(
                        "client {} ({}): sound {} the picture by {:.0} ms, enough for a viewer to notice",
                        c.label,
                        c.stream,
                        if skew > 0.0 { "trails" } else { "leads" },
                        skew.abs()
                    ));
                }
                if let Some(f) = &c.failure {
                    out.push(format!("client {} ({}): {f}", c.label, c.stream));
                }
            }
        }
    }
    out
}

/// Whether any client got no frame (the demo's exit status).
pub fn any_without_frames(clients: &[ClientOutcome]) -> bool {
    clients.iter().any(|c| c.stats.as_ref().is_none_or(|s| s.frames_decoded == 0))
}

/// How much later than the cold start a warm one may come before it is a
/// problem: a busy machine moves both by tens of ms; a warm start that
/// missed the POP's cached GOP waits for the next keyframe, hundreds more.
pub const WARM_START_MARGIN_MS: f64 = 250.0;

/// Warm starts slower than the cold one: a viewer at a POP that already
/// carried the stream (an earlier viewer of it chose the same POP) must get
/// its first frame, from its request at the POP, no later than the first
/// viewer of the stream, for whom the tree had to be built (give or take
/// [`WARM_START_MARGIN_MS`]).
pub fn warm_start_problems(clients: &[ClientOutcome]) -> Vec<String> {
    let mut out = Vec::new();
    let from_request = |c: &ClientOutcome| c.stats.as_ref().and_then(|s| s.request_to_first_frame_ms);
    let mut sorted: Vec<&ClientOutcome> = clients.iter().collect();
    sorted.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    let streams: BTreeSet<&str> = sorted.iter().map(|c| c.stream.as_str()).collect();
    for stream in streams {
        let viewers: Vec<&&ClientOutcome> = sorted.iter().filter(|c| c.stream == stream).collect();
        let Some(cold) = viewers.first() else { continue };
        let Some(cold_ms) = from_request(cold) else { continue };
        for (i, c) in viewers.iter().enumerate().skip(1) {
            let pop = c.pop_node.as_deref();
            let carried = pop.is_some() && viewers[..i].iter().any(|e| e.pop_node.as_deref() == pop);
            let Some(ms) = from_request(c).filter(|ms| carried && *ms > cold_ms + WARM_START_MARGIN_MS) else {
                continue;
            };
            out.push(format!(
                "client {} ({stream}): first frame {ms:.0} ms after its request at {}, which already carried \
                 the stream, over {WARM_START_MARGIN_MS:.0} ms later than the cold start of {} ({cold_ms:.0} ms)",
                c.label,
                pop.unwrap_or("?"),
                cold.label
            ));
        }
    }
    out
}

/// One viewer's time to first frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstFrame {
    pub client: String,
    /// From the client's start (LOGIN and POP choice included), ms.
    pub from_start_ms: f64,
    /// From the client's first request to its POP, ms.
    pub from_request_ms: Option<f64>,
}

impl std::fmt::Display for FirstFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} ms ({}", self.from_start_ms, self.client)?;
        if let Some(ms) = self.from_request_ms {
            write!(f, "; {ms:.0} ms from the request at its POP")?;
        }
        write!(f, ")")
    }
}

/// Times to first frame of one stream's viewers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FirstFrames {
    /// The first viewer: the tree had to be built.
    pub cold: Option<FirstFrame>,
    /// The later viewers, in start order.
    pub warm: Vec<FirstFrame>,
}

/// Time to first frame of the first client of each stream (cold) and of the
/// later ones (warm), in start order.
pub fn cold_and_warm(clients: &[ClientOutcome]) -> BTreeMap<String, FirstFrames> {
    let mut by_stream: BTreeMap<String, Vec<&ClientOutcome>> = BTreeMap::new();
    for c in clients {
        by_stream.entry(c.stream.clone()).or_default().push(c);
    }
    by_stream
        .into_iter()
        .map(|(s, mut cs)| {
            cs.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
            let ttff = |c: &ClientOutcome| {
                let s = c.stats.as_ref()?;
                Some(FirstFrame {
                    client: c.label.clone(),
                    from_start_ms: s.first_frame_ms?,
                    from_request_ms: s.request_to_first_frame_ms,
                })
            };
            let cold = cs.first().and_then(|c| ttff(c));
            let warm = cs.iter().skip(1).filter_map(|c| ttff(c)).collect();
            (s, FirstFrames { cold, warm })
        })
        .collect()
}

/// One stream's tree as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamTree {
    pub stream: String,
    /// Directions that carried the stream in the window, with their count
    /// and stress (packets relative to the feeding link).
    pub links: Vec<(Direction, Count, f64)>,
}

/// The trees and what is wrong with them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TreeReport {
    pub trees: Vec<StreamTree>,
    pub problems: Vec<String>,
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// Checks the trees. `window` counts a steady period with every client
/// watching; `whole` the entire run; `servers` are overlay node names;
/// `viewed` is, per stream index, the POP nodes with viewers.
pub fn check_trees(
    streams: &[String],
    window: &[LinkCount],
    whole: &[LinkCount],
    servers: &[String],
    viewed: &[BTreeSet<String>],
) -> TreeReport {
    let mut report = TreeReport::default();
    for (k, stream) in streams.iter().enumerate() {
        let carrying: Vec<(&Direction, Count)> = window
            .iter()
            .filter_map(|l| {
                let c = l.streams.get(k).copied().unwrap_or_default();
                (c.packets > 0).then_some((&l.dir, c))
            })
            .collect();
        let mut parent: BTreeMap<&str, Vec<(&str, Count)>> = BTreeMap::new();
        for (d, c) in &carrying {
            parent.entry(d.to.as_str()).or_default().push((d.from.as_str(), *c));
            if carrying.iter().any(|(e, _)| e.from == d.to && e.to == d.from) && d.from < d.to {
                report.problems.push(format!("stream {stream}: link {}-{} carried it both ways", d.from, d.to));
            }
        }
        for (node, ps) in &parent {
            if ps.len() > 1 {
                report.problems.push(format!(
                    "stream {stream}: {node} got it from {} neighbours ({})",
                    ps.len(),
                    ps.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        // Every sender must be a server or be fed itself; no cycle.
        for (d, _) in &carrying {
            let mut at = d.from.as_str();
            let mut seen = BTreeSet::new();
            loop {
                if servers.iter().any(|s| s == at) {
                    break;
                }
                if !seen.insert(at) {
                    report.problems.push(format!("stream {stream}: the links into {} form a cycle", d.from));
                    break;
                }
                match parent.get(at).and_then(|ps| ps.first()) {
                    Some((p, _)) => at = p,
                    None => {
                        report
                            .problems
                            .push(format!("stream {stream}: {at} sent it on without receiving it (not a server)"));
                        break;
                    }
                }
            }
        }
        if let Some(pops) = viewed.get(k) {
            for pop in pops {
                if !parent.contains_key(pop.as_str()) {
                    report.problems.push(format!(
                        "stream {stream}: POP {pop} has viewers but received no packet of it in the window"
                    ));
                }
            }
        }
        let tree_median = median(carrying.iter().map(|(_, c)| c.packets).collect());
        let mut links = Vec::new();
        for (d, c) in &carrying {
            let feed =
                parent.get(d.from.as_str()).and_then(|ps| ps.first()).map(|(_, c)| c.packets).unwrap_or(tree_median);
            let stress = if feed == 0 { f64::INFINITY } else { c.packets as f64 / feed as f64 };
            if stress > MAX_STRESS {
                report.problems.push(format!(
                    "stream {stream}: link {} -> {} carried {} packets for {} fed in (stress {stress:.2})",
                    d.from, d.to, c.packets, feed
                ));
            }
            links.push(((*d).clone(), *c, stress));
        }
        report.trees.push(StreamTree { stream: stream.clone(), links });
    }
    // Off every tree: no RTP at all over the whole run.
    for l in whole {
        let counted: u64 = l.streams.iter().map(|c| c.packets).sum();
        if counted == 0 && l.all.packets > 0 {
            report.problems.push(format!(
                "link {} -> {} is on no tree but carried {} RTP packets",
                l.dir.from, l.dir.to, l.all.packets
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(a: &str, b: &str) -> Direction {
        Direction { from: a.into(), to: b.into() }
    }

    fn link(a: &str, b: &str, all: u64, per: &[u64]) -> LinkCount {
        LinkCount {
            dir: dir(a, b),
            all: Count { packets: all, bytes: all * 1000 },
            streams: per.iter().map(|p| Count { packets: *p, bytes: p * 1000 }).collect(),
        }
    }

    fn pops(names: &[&str]) -> Vec<BTreeSet<String>> {
        vec![names.iter().map(|s| s.to_string()).collect()]
    }

    #[test]
    fn a_clean_tree_passes() {
        let w = vec![
            link("s1", "o2", 100, &[100]),
            link("o2", "o3", 100, &[100]),
            link("o3", "o7", 99, &[99]),
            link("o2", "o9", 0, &[0]),
        ];
        let r = check_trees(&["test".into()], &w, &w, &["s1".into()], &pops(&["o7"]));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.trees[0].links.len(), 3);
        assert!((r.trees[0].links[2].2 - 0.99).abs() < 1e-9);
    }

    #[test]
    fn double_copies_and_two_parents_are_found() {
        let w = vec![
            link("s1", "o2", 100, &[100]),
            link("o2", "o3", 200, &[200]),
            link("s1", "o9", 100, &[100]),
            link("o9", "o3", 100, &[100]),
        ];
        let r = check_trees(&["test".into()], &w, &w, &["s1".into()], &pops(&["o3"]));
        let text = r.problems.join("\n");
        assert!(text.contains("o3 got it from 2 neighbours (o2, o9)"), "{text}");
        assert!(text.contains("link o2 -> o3 carried 200 packets for 100 fed in (stress 2.00)"), "{text}");
    }

    #[test]
    fn off_tree_media_missing_pop_and_orphans_are_found() {
        let w = vec![link("s1", "o2", 100, &[100]), link("o4", "o5", 100, &[100]), link("o8", "o9", 5, &[0])];
        let r = check_trees(&["test".into()], &w, &w, &["s1".into()], &pops(&["o7"]));
        let text = r.problems.join("\n");
        assert!(text.contains("o4 sent it on without receiving it"), "{text}");
        assert!(text.contains("POP o7 has viewers but received no packet"), "{text}");
        assert!(text.contains("link o8 -> o9 is on no tree but carried 5 RTP packets"), "{text}");
    }

    #[test]
    fn both_ways_is_found() {
        let w = vec![link("s1", "o2", 100, &[100]), link("o2", "o3", 100, &[100]), link("o3", "o2", 100, &[100])];
        let r = check_trees(&["test".into()], &w, &w, &["s1".into()], &pops(&[]));
        assert!(r.problems.iter().any(|p| p.contains("carried it both ways")), "{:?}", r.problems);
    }

    fn outcome(label: &str, stream: &str, start: f64, frames: u64, pop: &str, ttff: f64) -> ClientOutcome {
        let pop_node = if pop.starts_with("10.0.7.2") || pop == "10.0.8.2" { "o6" } else { "o5" };
        ClientOutcome {
            label: label.into(),
            host: label.into(),
            stream: stream.into(),
            start_s: start,
            expected_pop: Some("10.0.7.2".parse().unwrap()),
            expected_pop_node: Some("o6".into()),
            pop_node: Some(pop_node.into()),
            stats: Some(ClientStats {
                frames_decoded: frames,
                pop: pop.into(),
                first_frame_ms: Some(ttff),
                pop_rtt_ms: [(pop.to_string(), 0.4)].into_iter().collect(),
                ..Default::default()
            }),
            failure: None,
            path_delay_ms: None,
        }
    }

    #[test]
    fn a_warm_start_at_a_pop_that_carries_the_stream_is_no_slower_than_the_cold_one() {
        let with_request = |mut c: ClientOutcome, ms: f64| {
            c.stats.as_mut().unwrap().request_to_first_frame_ms = Some(ms);
            c
        };
        let cs = vec![
            with_request(outcome("c2", "test", 0.0, 250, "10.0.7.2", 300.0), 120.0),
            // Another POP: joins the tree, may take as long as it takes.
            with_request(outcome("c1", "test", 3.0, 250, "10.0.6.2", 300.0), 150.0),
            // c2's POP already carries it: may not be much slower than c2
            // (this one waited for a keyframe).
            with_request(outcome("c3", "test", 5.0, 250, "10.0.7.2", 300.0), 620.0),
        ];
        let p = warm_start_problems(&cs);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("client c3 (test): first frame 620 ms after its request at o6"), "{}", p[0]);
        // Quicker, or later only by what a busy machine adds: fine.
        for ms in [10.0, 120.0, 300.0] {
            let fine = vec![cs[0].clone(), with_request(cs[2].clone(), ms)];
            assert!(warm_start_problems(&fine).is_empty(), "{ms} ms");
        }
    }

    #[test]
    fn clients_are_judged() {
        let cs = vec![
            outcome("c2", "test", 0.0, 250, "10.0.7.2", 300.0),
            outcome("c3", "test", 5.0, 200, "10.0.7.2:7070", 80.0),
            outcome("c4", "clip", 1.0, 0, "10.0.6.2", 0.0),
            outcome("c9", "clip", 1.0, 10, "10.0.8.2", 0.0),
        ];
        let p = client_problems(&cs);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("c4 (clip): decoded no frame"));
        assert_eq!(p[1], "client c4 (clip): chose POP o5 (10.0.6.2), not o6 on its LAN (10.0.7.2)");
        assert!(any_without_frames(&cs));
        assert_eq!(cs[1].stats.as_ref().unwrap().pop_rtt(), Some(0.4));
        let cw = cold_and_warm(&cs);
        let cold = cw["test"].cold.as_ref().unwrap();
        assert_eq!((cold.client.as_str(), cold.from_start_ms), ("c2", 300.0));
        assert_eq!(cw["test"].warm.iter().map(|f| f.to_string()).collect::<Vec<_>>(), ["80 ms (c3)"]);
    }

    #[test]
    fn stats_file_parses_with_missing_fields() {
        let s: ClientStats = serde_json::from_str(
            r#"{"client": "c1", "stream": "test", "pop": "10.0.6.2", "pop_rtt_ms": {"10.0.6.2": 0.3, "10.0.7.2": 1.1},
                "frames_decoded": 240, "packets_lost": 0, "first_frame_ms": 212.5, "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(s.frames_decoded, 240);
        assert_eq!(s.pop_rtt(), Some(0.3));
        assert_eq!(s.bytes_received, 0);
    }
}
