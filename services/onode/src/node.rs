//! The node driver: owns the protocol core's state behind one mutex (never
//! held across an await), the data-plane relay, the gRPC clients to the
//! neighbours and the periodic tasks (pings, STATUS probes). It carries out
//! what the core decides. This file holds the node itself (its state, its
//! start and shutdown); its work is split by concern: [`peers`] (heartbeats,
//! probes, link notices, losses), [`trees`] (joins, leaves, repairs, moves),
//! [`pipelines`] (a server's own streams), [`viewers`] (sessions and the
//! forwarding table) and [`inspect`] (metrics, the map, `onode inspect`).

mod inspect;
mod peers;
mod pipelines;
mod trees;
mod viewers;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use media::{SourceSpec, StreamSource};
use overlay_core::engine::{Effect, Engine, EngineConfig, Level};
use overlay_core::routing::{RouteTable, RoutingConfig};
use overlay_core::session::{SessionLimits, Sessions};
use overlay_core::silence;
use overlay_core::tree::{Nak, NakReason, Requester, Source, StreamDesc};
use overlay_proto as pb;
use overlay_proto::overlay_client::OverlayClient;
use relay::{Accept, ForwardTable, Heard, Relay, Route, SharedContinuity, SplitDest, Tally};
use serde_json::json;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument};

use crate::convert;
use crate::link::{Incoming, Links};
use crate::net;
use crate::tls::Tls;

/// The role a node was started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Node,
    Pop,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Node => "node",
            Role::Pop => "pop",
        }
    }
}

/// Settings of one node process.
#[derive(Debug, Clone)]
pub struct Settings {
    pub role: Role,
    pub bind: IpAddr,
    pub control_port: u16,
    pub data_port: u16,
    pub tie_floor_us: u64,
    pub join_timeout: Duration,
    /// Neighbour heartbeat period; three missed beats declare it lost.
    pub heartbeat: Duration,
    /// A stream this silent gets its upstream checked at once (None: off).
    pub silence: Option<Duration>,
    /// A branch keeps an upstream this long before it may move to a better
    /// one (None: trees never move).
    pub settle: Option<Duration>,
    /// A client session not heard from for this long is torn down.
    pub session_timeout: Duration,
    /// This node's certificate and the overlay's CA (None: plain TCP and
    /// nobody is authenticated).
    pub tls: Option<Tls>,
    /// Bounds on client sessions (POPs).
    pub session_limits: SessionLimits,
    /// Checks viewers' tokens (None: anyone may watch).
    pub tokens: Option<Arc<crate::token::Verifier>>,
}

/// A neighbour as the node reaches it.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub name: String,
    pub address: IpAddr,
    pub server: bool,
    /// Key of the link to it, when the control plane runs over mutual TLS.
    pub link_key: Option<crate::link::LinkKey>,
}

/// What the bootstrapper told the node about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub names: Vec<IpAddr>,
    pub pop_addresses: Vec<IpAddr>,
    pub server: bool,
    pub neighbours: Vec<Neighbour>,
    pub probe_interval: Duration,
}

type JoinResult = Result<StreamDesc, Nak>;

/// A stream that brought no packet for this long (ms) starves its viewers.
const STARVED_MS: u64 = 1500;
/// How long a downstream that missed heartbeats keeps its branch (it may be
/// a lossy link, not a dead node).
const DOWNSTREAM_GRACE: Duration = Duration::from_secs(3);
/// How long a viewer's SETUP may wait for the upstream's GOP after a join.
const VIEWER_REFRESH_WAIT: Duration = Duration::from_millis(300);
/// How long a stream request waits for its answer before its upstream is
/// pinged (and pinged again while the wait goes on).
const JOIN_WATCH: Duration = Duration::from_millis(250);

/// The tick of one of the node's periodic tasks: [`Ticker::next`] waits
/// for the next one and says false once the node is shutting down. A tick
/// missed under load is delayed, not bunched with the next.
struct Ticker<'a> {
    interval: tokio::time::Interval,
    cancel: &'a CancellationToken,
}

impl Ticker<'_> {
    async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

struct State {
    /// The tree protocol (with the route table): see overlay-core's
    /// engine. Its effects are carried out by [`Node::drive`].
    engine: Engine,
    sessions: Sessions,
    /// Stream requests waiting for the engine's answer, by ticket.
    waiters: HashMap<u64, oneshot::Sender<JoinResult>>,
    /// Data port of each downstream neighbour (from its join request).
    data_ports: HashMap<String, u16>,
    /// Data port of each upstream neighbour (from its join answers).
    upstream_ports: HashMap<String, u16>,
    /// Per stream repairing: when its last packet came before the repair
    /// (on [`relay::clock_ms`]), the start of the media gap.
    repair_from: HashMap<String, Option<u64>>,
    pipelines: HashMap<String, StreamSource>,
    /// Streams published live to this server (see `publish`): offered
    /// while a publisher sends or within its grace period.
    published: std::collections::BTreeSet<String>,
    /// Neighbours whose control connection is open (or being opened).
    connected: std::collections::HashSet<String>,
    /// One-off checks of a neighbour under way (see [`Node::check`]), by
    /// the beat's number.
    checks: HashMap<u64, oneshot::Sender<bool>>,
    /// Per stream: the upstream it is heard from, and when it last was.
    heard: HashMap<String, (Source, Heard)>,
    /// Per stream and track: the one RTP line RTSP players see, whatever
    /// upstream or server the stream comes from.
    lines: HashMap<(String, usize), SharedContinuity>,
    /// Per stream carried: what the data plane took in and sent on.
    tallies: HashMap<String, StreamTallies>,
    /// Per stream: its repairs since start and the last one's media gap.
    repairs: HashMap<String, Repairs>,
}

/// What one stream's packets did at this node (metrics).
#[derive(Debug, Default)]
struct StreamTallies {
    received: Tally,
    /// By destination: a neighbour's name, or [`VIEWERS`].
    sent: BTreeMap<String, Tally>,
}

/// Most streams whose figures are kept once they are no longer carried.
const KEPT_STREAMS: usize = 256;

/// The destination name of a stream's viewers at this POP, whatever their
/// protocol, in [`StreamTallies::sent`].
pub const VIEWERS: &str = "viewers";

impl StreamTallies {
    fn to(&mut self, dest: &str) -> Tally {
        self.sent.entry(dest.to_string()).or_default().clone()
    }
}

/// A stream's repairs at this node (metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Repairs {
    pub count: u64,
    /// From the last packet before the upstream was lost to the first one
    /// after the repair; None until that first packet comes.
    pub last_gap: Option<Duration>,
}

/// A running overlay node.
pub struct Node {
    pub id: Identity,
    pub settings: Settings,
    pub relay: Arc<Relay>,
    pub catalogue: BTreeMap<String, SourceSpec>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    state: Mutex<State>,
    clients: HashMap<String, OverlayClient<Channel>>,
    links: Links,
    tickets: AtomicU64,
    relay_stop: Arc<AtomicBool>,
    /// The relay's socket loop, joined at shutdown.
    relay_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Wakes the engine's timer task: an input may have moved its next
    /// deadline.
    wake: tokio::sync::Notify,
    /// What came to the RTSP edge's RTCP port.
    pub rtcp_intake: crate::rtsp::RtcpCounters,
    /// What the WebRTC edge (WHEP) answered, refused and dropped.
    pub webrtc: crate::webrtc::Counters,
    /// A server's publishers, once its publish edges run.
    publishing: std::sync::OnceLock<Arc<crate::publish::Publishing>>,
    /// Bumped whenever what the overlay map shows of this node may have
    /// changed (trees, viewers, neighbours); observers wait on it.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Control requests answered, by method and status.
    pub requests: Arc<crate::metrics::RequestCounts>,
}

/// Locks `m`, also after a panic elsewhere poisoned it.
pub fn lock_unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The RTP clock of a track of a stream (video first, then sound).
pub fn track_clock_rate(track: usize) -> u32 {
    if track == 0 {
        media::VIDEO_CLOCK_RATE
    } else {
        media::AUDIO_CLOCK_RATE
    }
}

/// The RTP line of a track of `stream` (made on first use).
fn line(lines: &mut HashMap<(String, usize), SharedContinuity>, stream: &str, track: usize) -> SharedContinuity {
    lines.entry((stream.to_string(), track)).or_insert_with(|| SharedContinuity::new(track_clock_rate(track))).clone()
}

impl Node {
    pub fn new(
        id: Identity,
        settings: Settings,
        catalogue: BTreeMap<String, SourceSpec>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Node>> {
        let data_addr = SocketAddr::new(settings.bind, settings.data_port);
        let relay = Relay::bind(data_addr)
            .map_err(|e| anyhow::anyhow!("node {}: cannot bind the data socket {data_addr}: {e}", id.name))?;
        // Streams come only from neighbours: nobody else's packets are held
        // for a join's answer.
        relay.hold_early_from(id.neighbours.iter().map(|n| n.address).collect());
        let link_addr = SocketAddr::new(settings.bind, settings.control_port);
        let links = Links::bind(link_addr, &id.name, &id.neighbours, settings.control_port).map_err(|e| {
            anyhow::anyhow!("node {}: cannot bind the heartbeat socket {link_addr} (udp): {e}", id.name)
        })?;
        let config = RoutingConfig {
            tie_floor_us: settings.tie_floor_us,
            stale_after: id.probe_interval * 3 + Duration::from_millis(200),
            ..RoutingConfig::default()
        };
        let names: Vec<String> = id.neighbours.iter().map(|n| n.name.clone()).collect();
        let offered: Vec<String> = if id.server { catalogue.keys().cloned().collect() } else { Vec::new() };
        let mut clients = HashMap::new();
        let local = Some(settings.bind);
        for n in &id.neighbours {
            let addr = SocketAddr::new(n.address, settings.control_port);
            let timeout = settings.join_timeout.max(Duration::from_secs(2));
            let tls = settings.tls.as_ref().map(|t| (t, n.name.as_str()));
            clients.insert(n.name.clone(), OverlayClient::new(net::channel(addr, local, timeout, tls)?));
        }
        let engine_config = EngineConfig {
            join_timeout: settings.join_timeout,
            retry: settings.heartbeat,
            probe_interval: id.probe_interval,
            downstream_grace: DOWNSTREAM_GRACE,
            silence: settings.silence,
            settle: settings.settle,
            heartbeat: Some(settings.heartbeat),
        };
        let routes = RouteTable::new(id.name.clone(), names, config);
        let state = State {
            engine: Engine::new(routes, offered, engine_config, Instant::now()).numbering_from(net::unix_us()),
            sessions: Sessions::new(settings.session_limits),
            waiters: HashMap::new(),
            data_ports: HashMap::new(),
            upstream_ports: HashMap::new(),
            repair_from: HashMap::new(),
            pipelines: HashMap::new(),
            published: Default::default(),
            connected: Default::default(),
            checks: HashMap::new(),
            heard: HashMap::new(),
            lines: HashMap::new(),
            tallies: HashMap::new(),
            repairs: HashMap::new(),
        };
        Ok(Arc::new(Node {
            id,
            settings,
            relay,
            catalogue,
            cancel,
            tasks: TaskTracker::new(),
            state: Mutex::new(state),
            clients,
            links,
            tickets: AtomicU64::new(1),
            relay_stop: Arc::new(AtomicBool::new(false)),
            relay_thread: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            rtcp_intake: Default::default(),
            webrtc: Default::default(),
            publishing: Default::default(),
            changes: tokio::sync::watch::Sender::new(0),
            requests: Default::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn neighbour(&self, name: &str) -> Option<&Neighbour> {
        self.id.neighbours.iter().find(|n| n.name == name)
    }

    /// Starts the relay thread and the periodic tasks.
    pub fn start(self: &Arc<Self>) {
        let relay = self.relay.clone();
        let stop = self.relay_stop.clone();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || relay.run(&stop))
            .expect("spawn the relay thread");
        *lock_unpoisoned(&self.relay_thread) = Some(thread);
        let me = self.clone();
        self.tasks.spawn(async move { me.datagram_loop().await });
        let me = self.clone();
        self.tasks.spawn(async move { me.engine_loop().await });
        if self.id.server {
            let me = self.clone();
            self.tasks.spawn(async move { me.probe_loop().await });
        }
        if self.settings.role == Role::Pop {
            let me = self.clone();
            self.tasks.spawn(async move { me.expire_loop().await });
        }
        info!(
            node = %self.id.name,
            role = self.settings.role.as_str(),
            data = %self.relay.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            neighbours = ?self.id.neighbours.iter().map(|n| &n.name).collect::<Vec<_>>(),
            "node started"
        );
    }

    /// Ends the node's work: prunes every stream upstream, stops pipelines
    /// and the relay.
    pub async fn shutdown(self: &Arc<Self>) {
        let (upstreams, pipelines) = {
            let mut st = self.lock();
            let ups = st.engine.upstreams();
            let pipes: Vec<StreamSource> = st.pipelines.drain().map(|(_, p)| p).collect();
            (ups, pipes)
        };
        let mut leaves = tokio::task::JoinSet::new();
        for (stream, up) in upstreams {
            let me = self.clone();
            leaves.spawn(async move { me.send_leave(stream, up).await });
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), leaves.join_all()).await;
        for p in pipelines {
            tokio::task::spawn_blocking(move || p.stop()).await.ok();
        }
        self.relay_stop.store(true, Ordering::Relaxed);
        // The loop sees the flag within its 100 ms receive timeout.
        let thread = lock_unpoisoned(&self.relay_thread).take();
        if let Some(thread) = thread {
            if tokio::task::spawn_blocking(move || thread.join()).await.is_ok_and(|r| r.is_err()) {
                warn!(node = %self.id.name, "the relay thread had panicked");
            }
        }
    }

    /// A period that ends with the node; see [`Ticker`].
    fn ticker(&self, period: Duration) -> Ticker<'_> {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval, cancel: &self.cancel }
    }
}
