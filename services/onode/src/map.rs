//! The live map of the overlay, served by the bootstrapper
//! (`http://BOOTSTRAPPER:9997/`, `--map-port`): the nodes by role, the
//! links with their measured delays, and each stream's tree drawn over
//! them with the direction of the media and the viewers per POP; failed
//! nodes and links are marked.
//!
//! The bootstrapper holds one `Observe` stream (gRPC, the control plane)
//! open to every node of the topology; each node sends its view at once
//! and again whenever its trees, viewers or neighbours change. A node
//! whose stream breaks is shown failed until it answers again. The page
//! (plain HTML, JavaScript and SVG, no build step) takes the overlay's
//! state from `/state` and then from server-sent events on `/events`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use overlay_core::topology::Topology;
use overlay_proto as pb;
use overlay_proto::overlay_client::OverlayClient;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::node::{lock_unpoisoned, Node};

const PAGE: &str = include_str!("map/index.html");
const SCRIPT: &str = include_str!("map/map.js");

/// How long a broken observe stream waits before it is opened again.
const RETRY: Duration = Duration::from_secs(1);
/// Changes that come closer together go to the page as one event.
const EVENT_COALESCE: Duration = Duration::from_millis(100);

/// What the bootstrapper knows of one node.
#[derive(Debug, Clone, Default)]
struct Seen {
    view: Option<pb::NodeView>,
    /// Its observe stream is open.
    alive: bool,
}

/// The overlay as the map shows it.
pub struct Map {
    topology: Topology,
    nodes: Mutex<BTreeMap<String, Seen>>,
    version: watch::Sender<u64>,
}

/// A node's role on the map.
fn role(spec: &overlay_core::topology::NodeSpec) -> &'static str {
    if spec.server {
        "server"
    } else if spec.is_pop() {
        "pop"
    } else {
        "relay"
    }
}

impl Map {
    pub fn new(topology: Topology) -> Arc<Map> {
        let nodes = topology.nodes().map(|n| (n.name.clone(), Seen::default())).collect();
        Arc::new(Map { topology, nodes: Mutex::new(nodes), version: watch::Sender::new(0) })
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut Seen)) {
        if let Some(seen) = lock_unpoisoned(&self.nodes).get_mut(node) {
            f(seen);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The overlay's state as the page draws it.
    pub fn state(&self) -> Value {
        let nodes = lock_unpoisoned(&self.nodes).clone();
        state_of(&self.topology, &nodes)
    }
}

/// The map's JSON: nodes, links and trees (pure, for tests).
fn state_of(topology: &Topology, seen: &BTreeMap<String, Seen>) -> Value {
    let alive = |n: &str| seen.get(n).is_some_and(|s| s.alive);
    let nodes: Vec<Value> = topology
        .nodes()
        .map(|spec| {
            let s = seen.get(&spec.name);
            let viewers: u32 =
                s.and_then(|s| s.view.as_ref()).map_or(0, |v| v.branches.iter().map(|b| b.viewers).sum());
            json!({ "name": spec.name, "role": role(spec), "alive": alive(&spec.name), "viewers": viewers })
        })
        .collect();
    // A link's delay and state as either end last saw them; a link is
    // down when an end is dead or either end declared the other lost.
    let side = |a: &str, b: &str| {
        seen.get(a)
            .filter(|s| s.alive)
            .and_then(|s| s.view.as_ref())
            .and_then(|v| v.neighbours.iter().find(|n| n.name == b))
            .map(|n| (n.delay_us, n.down))
    };
    let links: Vec<Value> = topology
        .edges()
        .into_iter()
        .map(|(a, b)| {
            let (ab, ba) = (side(&a, &b), side(&b, &a));
            let delays: Vec<u64> = [ab, ba].iter().flatten().map(|(d, _)| *d).filter(|d| *d > 0).collect();
            let delay_us = (!delays.is_empty()).then(|| delays.iter().sum::<u64>() / delays.len() as u64);
            let down = !alive(&a) || !alive(&b) || [ab, ba].iter().flatten().any(|(_, down)| *down);
            json!({ "a": a, "b": b, "delay_us": delay_us, "down": down })
        })
        .collect();
    // Each stream's tree: an edge from every live node's upstream to it.
    let mut streams: BTreeMap<String, Value> = BTreeMap::new();
    for (name, s) in seen.iter().filter(|(_, s)| s.alive) {
        let Some(view) = &s.view else { continue };
        for b in &view.branches {
            let tree = streams.entry(b.stream.clone()).or_insert_with(
                || json!({ "stream": b.stream, "server": b.server, "edges": [], "viewers": {}, "repairing": [] }),
            );
            if b.upstream.is_empty() {
                tree["server"] = json!(name);
            } else if let Some(edges) = tree["edges"].as_array_mut() {
                edges.push(json!({ "from": b.upstream, "to": name }));
            }
            if b.viewers > 0 {
                tree["viewers"][name] = json!(b.viewers);
            }
            if b.repairing {
                if let Some(r) = tree["repairing"].as_array_mut() {
                    r.push(json!(name));
                }
            }
        }
    }
    json!({ "nodes": nodes, "links": links, "streams": streams.into_values().collect::<Vec<_>>() })
}

/// Keeps an observe stream open to every node of the topology.
pub fn observe_all(map: &Arc<Map>, node: &Arc<Node>) {
    let port = node.settings.control_port;
    for spec in map.topology.nodes() {
        let Some(ip) = spec.names.first().copied() else { continue };
        let name = spec.name.clone();
        let tls = node.settings.tls.as_ref().map(|t| (t, name.as_str()));
        let channel = match crate::net::channel(SocketAddr::new(ip, port), Some(node.settings.bind), RETRY * 5, tls) {
            Ok(c) => c,
            Err(e) => {
                warn!(node = %name, "map: no channel to it: {e:#}");
                continue;
            }
        };
        let (map, me) = (map.clone(), node.clone());
        node.tasks.spawn(async move { observe(map, me, name, OverlayClient::new(channel)).await });
    }
}

async fn observe(map: Arc<Map>, me: Arc<Node>, name: String, mut client: OverlayClient<tonic::transport::Channel>) {
    let mut said = false;
    loop {
        let opened = tokio::select! {
            _ = me.cancel.cancelled() => return,
            r = client.observe(pb::ObserveRequest {}) => r,
        };
        match opened {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let next = tokio::select! {
                        _ = me.cancel.cancelled() => return,
                        r = stream.message() => r,
                    };
                    match next {
                        Ok(Some(view)) => {
                            if !said {
                                debug!(node = %name, "map: observing");
                                said = true;
                            }
                            map.update(&name, |s| {
                                s.alive = true;
                                s.view = Some(view);
                            });
                        }
                        Ok(None) => break,
                        Err(e) => {
                            debug!(node = %name, "map: observe stream broke: {}", e.message());
                            break;
                        }
                    }
                }
            }
            Err(e) => debug!(node = %name, "map: cannot observe: {}", e.message()),
        }
        if map.nodes.lock().map(|n| n.get(&name).is_some_and(|s| s.alive)).unwrap_or(false) {
            info!(node = %name, "map: node no longer answers: shown failed");
        }
        said = false;
        map.update(&name, |s| s.alive = false);
        tokio::select! {
            _ = me.cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Serves the map page, `/state` and `/events` on `listener` until the
/// node stops.
pub async fn serve(map: Arc<Map>, node: Arc<Node>, listener: TcpListener) {
    let state = {
        let map = map.clone();
        move || {
            let map = map.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "application/json")], map.state().to_string()).into_response()
            }
        }
    };
    let events = {
        let map = map.clone();
        move || {
            let map = map.clone();
            async move { events(map) }
        }
    };
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { Html(PAGE) }))
        .route(
            "/map.js",
            axum::routing::get(|| async {
                ([(axum::http::header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
            }),
        )
        .route("/state", axum::routing::get(state))
        .route("/events", axum::routing::get(events));
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(node = %node.id.name, "overlay map at http://{addr}/");
    let cancel = node.cancel.clone();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await {
        debug!(node = %node.id.name, "map server ended: {e}");
    }
}

/// The state at once, then again after every change (changes within
/// [`EVENT_COALESCE`] go together).
fn events(map: Arc<Map>) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let mut version = map.version.subscribe();
    let stream = async_stream(move |tx| async move {
        loop {
            version.borrow_and_update();
            let event = Event::default().event("state").data(map.state().to_string());
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            if version.changed().await.is_err() {
                return;
            }
            tokio::time::sleep(EVENT_COALESCE).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A stream fed by a task (ends when the task does or the reader goes).
fn async_stream<T, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(stream: &str, upstream: &str, viewers: u32) -> pb::BranchView {
        pb::BranchView {
            stream: stream.into(),
            server: "s1".into(),
            upstream: upstream.into(),
            downstream: Vec::new(),
            viewers,
            repairing: false,
        }
    }

    fn seen(node: &str, branches: Vec<pb::BranchView>, neighbours: &[(&str, u64, bool)]) -> Seen {
        let neighbours = neighbours
            .iter()
            .map(|(n, d, down)| pb::NeighbourView { name: n.to_string(), delay_us: *d, down: *down })
            .collect();
        Seen { view: Some(pb::NodeView { node: node.into(), role: String::new(), neighbours, branches }), alive: true }
    }

    #[test]
    fn trees_links_and_failures_come_from_the_nodes_views() {
        let topology = Topology::parse(
            r#"{
                "s1": {"neighbours": ["10.0.0.2"], "names": ["10.0.0.1"]},
                "r1": {"neighbours": ["10.0.0.1s", "10.0.0.3"], "names": ["10.0.0.2"], "pop": []},
                "p1": {"neighbours": ["10.0.0.2"], "names": ["10.0.0.3", "10.0.1.1"], "pop": ["10.0.1.1"]}
            }"#,
        )
        .unwrap();
        let mut nodes = BTreeMap::new();
        nodes.insert("s1".to_string(), seen("s1", vec![branch("test", "", 0)], &[("r1", 4000, false)]));
        nodes.insert("r1".to_string(), seen("r1", vec![branch("test", "s1", 0)], &[("s1", 6000, false)]));
        nodes.insert("p1".to_string(), seen("p1", vec![branch("test", "r1", 2)], &[("r1", 0, false)]));
        let s = state_of(&topology, &nodes);
        let tree = &s["streams"][0];
        assert_eq!(tree["stream"], "test");
        assert_eq!(tree["server"], "s1");
        let edges: Vec<(String, String)> = tree["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["from"].as_str().unwrap().to_string(), e["to"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(edges, vec![("r1".into(), "p1".into()), ("s1".into(), "r1".into())]);
        assert_eq!(tree["viewers"]["p1"], 2);
        // The link's delay is the mean of both ends' measurements.
        let links = s["links"].as_array().unwrap();
        let link = links.iter().find(|l| [&l["a"], &l["b"]].contains(&&json!("s1"))).unwrap();
        assert_eq!(link["delay_us"], 5000);
        assert_eq!(link["down"], false);
        let roles: Vec<(&str, &str)> = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["name"].as_str().unwrap(), n["role"].as_str().unwrap()))
            .collect();
        assert_eq!(roles, [("p1", "pop"), ("r1", "relay"), ("s1", "server")]);

        // r1 dies: it and its links are marked, and its part of the tree
        // is gone until a live node reports a new upstream.
        nodes.get_mut("r1").unwrap().alive = false;
        let s = state_of(&topology, &nodes);
        let r1 = s["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "r1").unwrap().clone();
        assert_eq!(r1["alive"], false);
        assert!(s["links"].as_array().unwrap().iter().all(|l| l["down"] == true));
        let edges = s["streams"][0]["edges"].as_array().unwrap().clone();
        assert_eq!(edges, vec![json!({"from": "r1", "to": "p1"})], "p1 still names r1 until it repairs");
    }
}
