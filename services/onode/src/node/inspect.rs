//! What the node shows of itself: metrics, the map's view, `onode inspect`.

use super::*;

impl Node {
    /// What a metrics scrape reports, taken at once.
    pub fn metrics(&self) -> crate::metrics::Snapshot {
        use crate::metrics::{NeighbourFigures, Snapshot, StreamFigures};
        let st = self.lock();
        // Playing viewers per stream and protocol, and sessions per phase.
        let mut playing: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut sessions: BTreeMap<String, u64> = BTreeMap::new();
        for (_, s) in st.sessions.iter() {
            *sessions.entry(s.phase.to_string()).or_default() += 1;
            if let (overlay_core::session::Phase::Playing, Some(stream)) = (s.phase, s.stream.as_deref()) {
                let protocol = if s.tracks.is_empty() {
                    "grpc"
                } else if s.client.starts_with("webrtc ") {
                    "webrtc"
                } else {
                    "rtsp"
                };
                *playing.entry((stream, protocol)).or_default() += 1;
            }
        }
        // Streams carried now, and those carried before (their counters
        // stay, as counters do).
        let names: std::collections::BTreeSet<String> = st
            .engine
            .trees
            .active()
            .map(|b| b.desc.stream.clone())
            .chain(st.tallies.keys().cloned())
            .chain(st.repairs.keys().cloned())
            .collect();
        let streams = names
            .into_iter()
            .map(|stream| {
                let branch = st.engine.trees.branch(&stream);
                let viewers = playing
                    .range((stream.as_str(), "")..)
                    .take_while(|((s, _), _)| *s == stream)
                    .map(|((_, protocol), n)| (protocol.to_string(), *n))
                    .collect();
                let tallies = st.tallies.get(&stream);
                let repairs = st.repairs.get(&stream).copied().unwrap_or_default();
                StreamFigures {
                    upstream: match branch.map(|b| &b.source) {
                        Some(Source::Neighbour(n)) => n.clone(),
                        _ => String::new(),
                    },
                    tree_role: match branch.map(|b| (&b.source, b.downstream.is_empty())) {
                        None => "",
                        Some((Source::Local, _)) => "root",
                        Some((_, false)) => "branch",
                        Some((_, true)) => "leaf",
                    },
                    server: branch.map(|b| b.desc.server.clone()).unwrap_or_default(),
                    downstream: branch.map_or(0, |b| b.downstream.len() as u64),
                    viewers,
                    gop_packets: branch.and_then(|b| b.desc.ssrcs.first()).map_or(0, |v| self.relay.gop_len(*v) as u64),
                    received: tallies.map(|t| t.received.get()).unwrap_or_default(),
                    sent: tallies
                        .map(|t| t.sent.iter().map(|(to, tally)| (to.clone(), tally.get())).collect())
                        .unwrap_or_default(),
                    repairs: repairs.count,
                    last_repair_gap_seconds: repairs.last_gap.map(|g| g.as_secs_f64()),
                    stream,
                }
            })
            .collect();
        let neighbours = self
            .id
            .neighbours
            .iter()
            .map(|n| {
                let beats = st.engine.beat_totals(&n.name);
                NeighbourFigures {
                    neighbour: n.name.clone(),
                    up: !st.engine.routes.is_down(&n.name),
                    delay_seconds: st.engine.routes.link_delay_us(&n.name).map(|us| us as f64 / 1e6),
                    heartbeats_sent: beats.sent,
                    heartbeats_missed: beats.missed,
                }
            })
            .collect();
        let session_counts = st.sessions.counts;
        let routes = st.engine.routes.counters();
        drop(st);
        let (cpu_seconds, resident_bytes) = crate::metrics::process_figures();
        Snapshot {
            node: self.id.name.clone(),
            role: self.settings.role.as_str().to_string(),
            relay: self.relay.counters(),
            routes,
            streams,
            neighbours,
            sessions: sessions.into_iter().collect(),
            session_counts,
            requests: self.requests.snapshot(),
            rtcp_report_blocks: self.rtcp_intake.blocks.load(Ordering::Relaxed),
            cpu_seconds,
            resident_bytes,
        }
    }

    /// What the overlay map shows of this node ([`pb::NodeView`]).
    pub fn view(&self) -> pb::NodeView {
        let st = self.lock();
        let mut viewers: HashMap<&str, u32> = HashMap::new();
        for (_, s) in st.sessions.iter() {
            if let (overlay_core::session::Phase::Playing, Some(stream)) = (s.phase, s.stream.as_deref()) {
                *viewers.entry(stream).or_default() += 1;
            }
        }
        let neighbours = self
            .id
            .neighbours
            .iter()
            .map(|n| pb::NeighbourView {
                name: n.name.clone(),
                delay_us: st.engine.routes.link_delay_us(&n.name).unwrap_or(0),
                down: st.engine.routes.is_down(&n.name),
            })
            .collect();
        let branches = st
            .engine
            .trees
            .active()
            .map(|b| pb::BranchView {
                stream: b.desc.stream.clone(),
                server: b.desc.server.clone(),
                upstream: match &b.source {
                    Source::Local => String::new(),
                    Source::Neighbour(n) => n.clone(),
                },
                downstream: b.downstream.iter().cloned().collect(),
                viewers: viewers.get(b.desc.stream.as_str()).copied().unwrap_or(0),
                repairing: b.repairing,
            })
            .collect();
        pb::NodeView {
            node: self.id.name.clone(),
            role: match self.settings.role {
                Role::Node => "relay".into(),
                role => role.as_str().into(),
            },
            neighbours,
            branches,
        }
    }

    /// The node's state as JSON, for `onode inspect` and tests.
    pub fn inspect(&self) -> serde_json::Value {
        let now = Instant::now();
        let st = self.lock();
        let neighbours: Vec<_> = self
            .id
            .neighbours
            .iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "address": n.address.to_string(),
                    "server": n.server,
                    "link_delay_us": st.engine.routes.link_delay_us(&n.name),
                    "down": st.engine.routes.is_down(&n.name),
                })
            })
            .collect();
        let mut routes = serde_json::Map::new();
        for (server, entries) in st.engine.routes.entries(now) {
            let best = st.engine.routes.best_next_hop(&server, now, &[]);
            let entries: Vec<_> = entries
                .iter()
                .map(|(via, e)| {
                    json!({
                        "via": via, "delay_us": e.delay_us, "hops": e.hops, "seq": e.seq,
                        "age_ms": now.saturating_duration_since(e.received).as_millis() as u64,
                        "clock_delay_us": e.clock_delay_us,
                    })
                })
                .collect();
            routes.insert(
                server,
                json!({
                    "best": best.as_ref().map(|r| r.via.clone()),
                    "delay_us": best.as_ref().map(|r| r.delay_us),
                    "hops": best.as_ref().map(|r| r.hops),
                    "entries": entries,
                }),
            );
        }
        let streams: Vec<_> = st
            .engine
            .trees
            .active()
            .map(|b| {
                json!({
                    "stream": b.desc.stream,
                    "server": b.desc.server,
                    "depth": b.desc.depth,
                    "tree_delay_ms": b.desc.delay_us as f64 / 1000.0,
                    "ssrcs": b.desc.ssrcs,
                    "upstream": match &b.source { Source::Local => None, Source::Neighbour(n) => Some(n.clone()) },
                    "downstream": b.downstream,
                    "repairing": b.repairing,
                    "local_viewers": b.local_viewers,
                    "playing_clients": st.sessions.playing(&b.desc.stream).count(),
                })
            })
            .collect();
        let sessions: Vec<_> = st
            .sessions
            .iter()
            .map(|(id, s)| {
                let reception: serde_json::Map<String, serde_json::Value> = s
                    .reception
                    .iter()
                    .map(|(track, r)| {
                        let figures = json!({
                            "reports": r.reports,
                            "fraction_lost": f64::from(r.fraction_lost) / 256.0,
                            "cumulative_lost": r.cumulative_lost,
                            "highest_seq": r.highest_seq,
                            "jitter_ms": r.jitter_us as f64 / 1000.0,
                        });
                        (track.to_string(), figures)
                    })
                    .collect();
                json!({
                    "id": &id[..8.min(id.len())], "client": s.client, "phase": s.phase.to_string(),
                    "stream": s.stream, "reception": reception,
                })
            })
            .collect();
        let mut pipelines: Vec<&String> = st.pipelines.keys().collect();
        pipelines.sort();
        json!({
            "name": self.id.name,
            "role": self.settings.role.as_str(),
            "server": self.id.server,
            "neighbours": neighbours,
            "routes": routes,
            "streams": streams,
            "joining": st.engine.trees.joining(),
            "sessions": sessions,
            "pipelines": pipelines,
            "catalogue": self.catalogue.keys().collect::<Vec<_>>(),
            "relay": self.relay.counters(),
            "datagrams": self.links.counters_json(),
            "rtcp_intake": self.rtcp_intake.json(),
            "webrtc": self.webrtc.json(),
            "published": self.publishing.get().map(|p| p.json()),
        })
    }
}
