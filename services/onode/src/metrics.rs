//! Prometheus metrics of a node (`GET /metrics` on `--metrics-port`): a
//! [`Snapshot`] of the node's counters and state is taken at each scrape
//! and encoded with prometheus-client (OpenMetrics text). Labels stay
//! bounded: streams, neighbours, protocols and reasons, never sessions or
//! packets.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::node::Node;

/// What a scrape reports, taken from the node at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub node: String,
    pub role: String,
    pub relay: relay::CounterSnapshot,
    /// What the route protocol told and heard.
    pub routes: overlay_core::routing::RouteCounters,
    pub streams: Vec<StreamFigures>,
    pub neighbours: Vec<NeighbourFigures>,
    /// Open sessions by phase.
    pub sessions: Vec<(String, u64)>,
    pub session_counts: overlay_core::session::SessionCounts,
    /// Control requests answered: (method, status, count).
    pub requests: Vec<(&'static str, &'static str, u64)>,
    pub rtcp_report_blocks: u64,
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamFigures {
    pub stream: String,
    pub server: String,
    /// Empty at the stream's server.
    pub upstream: String,
    pub downstream: u64,
    /// Playing viewers by protocol ("grpc", "rtsp", "webrtc").
    pub viewers: Vec<(String, u64)>,
    pub gop_packets: u64,
    /// "root" (its server), "branch" (feeds neighbours) or "leaf"; empty
    /// when the stream is no longer carried (its counters stay).
    pub tree_role: &'static str,
    /// Packets and bytes taken in (from upstream, or the server's own
    /// pipeline).
    pub received: (u64, u64),
    /// Packets and bytes sent, by destination: a neighbour, or "viewers".
    pub sent: Vec<(String, (u64, u64))>,
    pub repairs: u64,
    pub last_repair_gap_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NeighbourFigures {
    pub neighbour: String,
    pub up: bool,
    pub delay_seconds: Option<f64>,
    pub heartbeats_sent: u64,
    pub heartbeats_missed: u64,
}

#[derive(Debug)]
struct Figures(Snapshot);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// One counter family: a series per label set.
fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge family: a series per label set.
fn gauges<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, i64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Figures {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let info = ConstGauge::new(1i64);
        let mut m =
            e.encode_descriptor("overlay_node_info", "This node: its name and role.", None, info.metric_type())?;
        info.encode(m.encode_family(&[("node", s.node.as_str()), ("role", s.role.as_str())])?)?;
        let r = &s.relay;
        counter(&mut e, "overlay_relay_received_packets", "Datagrams the data plane received.", r.received)?;
        counter(&mut e, "overlay_relay_received_bytes", "Bytes the data plane received.", r.received_bytes)?;
        counter(&mut e, "overlay_relay_sent_packets", "Datagrams the data plane sent.", r.sent)?;
        counter(&mut e, "overlay_relay_sent_bytes", "Bytes the data plane sent.", r.sent_bytes)?;
        counter(&mut e, "overlay_relay_injected_packets", "Packets of this node's own pipelines.", r.injected)?;
        counter(&mut e, "overlay_relay_send_errors", "Sends that failed.", r.send_errors)?;
        counter(
            &mut e,
            "overlay_relay_held_early_packets",
            "Packets of a stream not yet in the table, from a neighbour, held for the join's answer.",
            r.held_early,
        )?;
        counters(
            &mut e,
            "overlay_relay_dropped_packets",
            "Datagrams the data plane dropped, by reason.",
            [
                ("not_rtp", r.dropped_not_rtp),
                ("unknown_ssrc", r.dropped_unknown_ssrc),
                ("wrong_source", r.dropped_wrong_source),
                ("duplicate", r.dropped_duplicate),
            ]
            .map(|(reason, v)| (vec![("reason", reason)], v)),
        )?;

        let rc = &s.routes;
        counters(
            &mut e,
            "overlay_route_messages_sent",
            "Route messages this node sent its neighbours: a round's refresh, an update between rounds, a withdrawal.",
            [("refresh", rc.refreshes), ("update", rc.updates), ("withdrawal", rc.withdrawals)]
                .map(|(kind, v)| (vec![("kind", kind)], v)),
        )?;
        counters(
            &mut e,
            "overlay_link_notices",
            "Link notices (a link dead or back): started by this node for its own links, or heard first from a neighbour.",
            [("started", rc.notices_started), ("heard", rc.notices_heard)].map(|(event, v)| (vec![("event", event)], v)),
        )?;
        counter(
            &mut e,
            "overlay_node_failures_heard",
            "Nodes the bootstrapper reported failed (their neighbours flood no link notice when this comes first).",
            rc.failures_heard,
        )?;
        counter(
            &mut e,
            "overlay_route_copies_unmeasured",
            "Route messages not learnt: they came over a link whose delay was not measured yet.",
            rc.unmeasured,
        )?;
        gauges(
            &mut e,
            "overlay_stream_info",
            "A stream this node carries: its server, upstream (empty at the server) and role in its tree.",
            s.streams.iter().filter(|st| !st.tree_role.is_empty()).map(|st| {
                (
                    vec![
                        ("stream", st.stream.as_str()),
                        ("server", st.server.as_str()),
                        ("upstream", st.upstream.as_str()),
                        ("tree_role", st.tree_role),
                    ],
                    1,
                )
            }),
        )?;
        gauges(
            &mut e,
            "overlay_stream_downstream_neighbours",
            "Neighbours this node feeds the stream to.",
            s.streams
                .iter()
                .filter(|st| !st.tree_role.is_empty())
                .map(|st| (vec![("stream", st.stream.as_str())], st.downstream as i64)),
        )?;
        gauges(
            &mut e,
            "overlay_stream_viewers",
            "Viewers playing the stream at this POP, by protocol.",
            s.streams.iter().flat_map(|st| {
                st.viewers.iter().map(|(protocol, n)| {
                    (vec![("stream", st.stream.as_str()), ("protocol", protocol.as_str())], *n as i64)
                })
            }),
        )?;
        gauges(
            &mut e,
            "overlay_stream_gop_cache_packets",
            "Packets of the stream's video since its last keyframe, cached for new viewers.",
            s.streams
                .iter()
                .filter(|st| !st.tree_role.is_empty())
                .map(|st| (vec![("stream", st.stream.as_str())], st.gop_packets as i64)),
        )?;
        counters(
            &mut e,
            "overlay_stream_received_packets",
            "Packets of the stream this node took in (from upstream, or its own pipeline at the server).",
            s.streams.iter().map(|st| (vec![("stream", st.stream.as_str())], st.received.0)),
        )?;
        counters(
            &mut e,
            "overlay_stream_received_bytes",
            "Bytes of the stream this node took in.",
            s.streams.iter().map(|st| (vec![("stream", st.stream.as_str())], st.received.1)),
        )?;
        counters(
            &mut e,
            "overlay_stream_sent_packets",
            "Packets of the stream this node sent, by destination: a neighbour, or its viewers.",
            s.streams.iter().flat_map(|st| {
                st.sent.iter().map(|(to, (p, _))| (vec![("stream", st.stream.as_str()), ("to", to.as_str())], *p))
            }),
        )?;
        counters(
            &mut e,
            "overlay_stream_sent_bytes",
            "Bytes of the stream this node sent, by destination.",
            s.streams.iter().flat_map(|st| {
                st.sent.iter().map(|(to, (_, b))| (vec![("stream", st.stream.as_str()), ("to", to.as_str())], *b))
            }),
        )?;
        counters(
            &mut e,
            "overlay_stream_repairs",
            "Times this node's branch of the stream found a new upstream after losing its own.",
            s.streams.iter().map(|st| (vec![("stream", st.stream.as_str())], st.repairs)),
        )?;
        let gap = ConstGauge::new(0.0f64);
        let mut m = e.encode_descriptor(
            "overlay_stream_last_repair_gap",
            "Media gap of the stream's last repair here: last packet before the loss to first packet after.",
            Some(&Unit::Seconds),
            gap.metric_type(),
        )?;
        for st in &s.streams {
            if let Some(g) = st.last_repair_gap_seconds {
                ConstGauge::new(g).encode(m.encode_family(&[("stream", st.stream.as_str())])?)?;
            }
        }
        gauges(
            &mut e,
            "overlay_neighbour_up",
            "1 while the neighbour answers, 0 once it is declared lost.",
            s.neighbours.iter().map(|n| (vec![("neighbour", n.neighbour.as_str())], i64::from(n.up))),
        )?;
        let delay = ConstGauge::new(0.0f64);
        let mut m = e.encode_descriptor(
            "overlay_neighbour_link_delay",
            "Measured one-way delay of the link to the neighbour.",
            Some(&Unit::Seconds),
            delay.metric_type(),
        )?;
        for n in &s.neighbours {
            if let Some(d) = n.delay_seconds {
                ConstGauge::new(d).encode(m.encode_family(&[("neighbour", n.neighbour.as_str())])?)?;
            }
        }
        counters(
            &mut e,
            "overlay_neighbour_heartbeats",
            "Periodic heartbeats sent to the neighbour.",
            s.neighbours.iter().map(|n| (vec![("neighbour", n.neighbour.as_str())], n.heartbeats_sent)),
        )?;
        counters(
            &mut e,
            "overlay_neighbour_heartbeats_missed",
            "Heartbeats the neighbour did not answer in time.",
            s.neighbours.iter().map(|n| (vec![("neighbour", n.neighbour.as_str())], n.heartbeats_missed)),
        )?;
        gauges(
            &mut e,
            "overlay_sessions",
            "Open viewer sessions, by phase.",
            s.sessions.iter().map(|(phase, n)| (vec![("phase", phase.as_str())], *n as i64)),
        )?;
        let c = &s.session_counts;
        counter(&mut e, "overlay_sessions_opened", "Viewer sessions opened.", c.opened)?;
        counters(
            &mut e,
            "overlay_sessions_refused",
            "Viewer sessions refused, by reason.",
            [(vec![("reason", "pop_full")], c.refused_full), (vec![("reason", "address_limit")], c.refused_address)],
        )?;
        counter(
            &mut e,
            "overlay_sessions_timed_out",
            "Viewer sessions ended because their client went silent.",
            c.timed_out,
        )?;
        counters(
            &mut e,
            "overlay_control_requests",
            "Control-plane (gRPC) requests answered, by method and status.",
            s.requests.iter().map(|(method, status, n)| (vec![("method", *method), ("status", *status)], *n)),
        )?;
        counter(
            &mut e,
            "overlay_rtsp_receiver_report_blocks",
            "RTCP receiver report blocks taken in from RTSP players.",
            s.rtcp_report_blocks,
        )?;

        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(e.encode_descriptor(
            "process_cpu",
            "User and system CPU time of this process.",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(s.resident_bytes as i64);
        rss.encode(e.encode_descriptor(
            "process_resident_memory",
            "Resident memory of this process.",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Control-plane requests answered, by method and status. Both labels
/// come from fixed lists: a path that names no method of ours counts as
/// "other", whatever a caller sends.
#[derive(Debug, Default)]
pub struct RequestCounts(std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>);

/// The methods of our gRPC services (proto/overlay/v1).
const METHODS: &[&str] = &[
    "Ping",
    "Join",
    "Leave",
    "Refresh",
    "Reroot",
    "Inspect",
    "Observe",
    "ConnectPop",
    "Setup",
    "Play",
    "Pause",
    "Teardown",
    "Keepalive",
    "Register",
    "Watch",
    "Login",
    "Overview",
];

impl RequestCounts {
    pub fn add(&self, method: &'static str, status: &'static str) {
        *crate::node::lock_unpoisoned(&self.0).entry((method, status)).or_default() += 1;
    }

    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        crate::node::lock_unpoisoned(&self.0).iter().map(|((m, s), n)| (*m, *s, *n)).collect()
    }
}

/// The method label of a gRPC request path (`/overlay.v1.Overlay/Join`).
pub fn method_of(path: &str) -> &'static str {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", ""));
    if !service.starts_with("overlay.v1.") {
        return "other";
    }
    METHODS.iter().find(|m| **m == method).copied().unwrap_or("other")
}

/// The status label of a gRPC answer: its `grpc-status` header when the
/// answer is an error at once (trailers-only), "OK" otherwise (a stream
/// that fails later is counted by how it started).
pub fn status_of(headers: &axum::http::HeaderMap) -> &'static str {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A tower layer for the gRPC server that counts every answer in
/// [`RequestCounts`].
#[derive(Debug, Clone)]
pub struct CountRequests(pub Arc<RequestCounts>);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, counts: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    counts: Arc<RequestCounts>,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for Counted<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let method = method_of(request.uri().path());
        let counts = self.counts.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let out = answer.await;
            counts.add(method, out.as_ref().map_or("TRANSPORT_ERROR", |r| status_of(r.headers())));
            out
        })
    }
}

/// The OpenMetrics text of a snapshot.
pub fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures(snapshot)));
    let mut out = String::new();
    // Writing into a String does not fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// CPU seconds (user + system) and resident bytes of this process.
pub fn process_figures() -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 / tick.max(1) as f64)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page.max(1) as u64);
    (cpu, rss)
}

/// Serves `GET /metrics` on `listener` until the node stops.
pub async fn serve(node: Arc<Node>, listener: TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let node = node.clone();
            move || {
                let node = node.clone();
                async move {
                    let text = encode(node.metrics());
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }
        }),
    );
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(node = %node.id.name, "metrics at http://{}/metrics", addr.map(|a| a.to_string()).unwrap_or_default());
    let cancel = node.cancel.clone();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await {
        debug!(node = %node.id.name, "metrics server ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_encoded_with_bounded_labels() {
        let s = Snapshot {
            node: "o5".into(),
            role: "pop".into(),
            relay: relay::CounterSnapshot { sent: 7, dropped_duplicate: 2, held_early: 9, ..Default::default() },
            routes: overlay_core::routing::RouteCounters {
                refreshes: 20,
                updates: 3,
                withdrawals: 1,
                notices_started: 1,
                notices_heard: 4,
                failures_heard: 2,
                unmeasured: 6,
            },
            streams: vec![StreamFigures {
                stream: "test".into(),
                server: "s1".into(),
                upstream: "o4".into(),
                downstream: 0,
                viewers: vec![("grpc".into(), 1), ("rtsp".into(), 2)],
                gop_packets: 40,
                tree_role: "leaf",
                received: (100, 120_000),
                sent: vec![("viewers".into(), (300, 360_000))],
                repairs: 1,
                last_repair_gap_seconds: Some(0.25),
            }],
            neighbours: vec![NeighbourFigures {
                neighbour: "o4".into(),
                up: true,
                delay_seconds: Some(0.004),
                heartbeats_sent: 50,
                heartbeats_missed: 3,
            }],
            sessions: vec![("PLAYING".into(), 3)],
            session_counts: overlay_core::session::SessionCounts {
                opened: 4,
                refused_full: 0,
                refused_address: 2,
                timed_out: 1,
            },
            requests: vec![("Setup", "OK", 4), ("other", "UNIMPLEMENTED", 1)],
            rtcp_report_blocks: 5,
            cpu_seconds: 1.5,
            resident_bytes: 4096,
        };
        let text = encode(s);
        for line in [
            "overlay_node_info{node=\"o5\",role=\"pop\"} 1",
            "overlay_relay_sent_packets_total 7",
            "overlay_relay_dropped_packets_total{reason=\"duplicate\"} 2",
            "overlay_relay_held_early_packets_total 9",
            "overlay_route_messages_sent_total{kind=\"update\"} 3",
            "overlay_route_messages_sent_total{kind=\"withdrawal\"} 1",
            "overlay_link_notices_total{event=\"heard\"} 4",
            "overlay_node_failures_heard_total 2",
            "overlay_route_copies_unmeasured_total 6",
            "overlay_stream_info{stream=\"test\",server=\"s1\",upstream=\"o4\",tree_role=\"leaf\"} 1",
            "overlay_stream_received_bytes_total{stream=\"test\"} 120000",
            "overlay_stream_sent_packets_total{stream=\"test\",to=\"viewers\"} 300",
            "overlay_stream_repairs_total{stream=\"test\"} 1",
            "overlay_stream_last_repair_gap_seconds{stream=\"test\"} 0.25",
            "overlay_neighbour_heartbeats_missed_total{neighbour=\"o4\"} 3",
            "overlay_sessions_opened_total 4",
            "overlay_sessions_refused_total{reason=\"address_limit\"} 2",
            "overlay_sessions_timed_out_total 1",
            "overlay_control_requests_total{method=\"Setup\",status=\"OK\"} 4",
            "overlay_stream_viewers{stream=\"test\",protocol=\"rtsp\"} 2",
            "overlay_stream_gop_cache_packets{stream=\"test\"} 40",
            "overlay_neighbour_up{neighbour=\"o4\"} 1",
            "overlay_neighbour_link_delay_seconds{neighbour=\"o4\"} 0.004",
            "overlay_sessions{phase=\"PLAYING\"} 3",
            "overlay_rtsp_receiver_report_blocks_total 5",
            "process_cpu_seconds_total 1.5",
            "process_resident_memory_bytes 4096",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert_eq!(method_of("/overlay.v1.Session/Setup"), "Setup");
        assert_eq!(method_of("/overlay.v1.Session/Nonsense"), "other");
        assert_eq!(method_of("/evil.v1.X/Setup"), "other");
        assert_eq!(method_of("garbage"), "other");
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(status_of(&h), "OK");
        h.insert("grpc-status", "7".parse().unwrap());
        assert_eq!(status_of(&h), "PERMISSION_DENIED");
        let (cpu, rss) = process_figures();
        assert!(cpu >= 0.0 && rss > 0, "this process: {cpu} s, {rss} bytes");
    }
}
