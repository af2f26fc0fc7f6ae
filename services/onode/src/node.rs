//! The node driver: owns the protocol core's state behind one mutex (never
//! held across an await), the data-plane relay, the gRPC clients to the
//! neighbours and the periodic tasks (pings, STATUS probes). It carries out
//! what the core decides.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use media::{SourceSpec, StreamSource};
use overlay_core::moves::{self, Move, Moves};
use overlay_core::repair::{Repair, Step};
use overlay_core::routing::{RouteTable, RoutingConfig};
use overlay_core::session::{SessionLimits, Sessions};
use overlay_core::silence::{self, Silence};
use overlay_core::tree::{JoinDecision, Nak, NakReason, Prune, Requester, Source, StreamDesc, Trees};
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

/// The reroot notice that says "I found no way to the root" (empty route).
fn gave_up(stream: &str) -> StreamDesc {
    StreamDesc { stream: stream.to_string(), server: String::new(), ssrcs: Vec::new(), depth: 0, route: Vec::new() }
}

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
/// A failed stream request is tried another way only if this much of its
/// time is left.
const JOIN_RETRY_FLOOR: Duration = Duration::from_millis(100);
/// A request refused as a loop because the upstream's own request for the
/// stream crossed it (each went to the other) is tried once more after
/// this pause: the other side has gone another way by then.
const CROSSING_PAUSE: Duration = Duration::from_millis(150);

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
    routes: RouteTable,
    trees: Trees,
    sessions: Sessions,
    waiters: HashMap<u64, oneshot::Sender<JoinResult>>,
    /// Data port of each downstream neighbour (from its join request).
    data_ports: HashMap<String, u16>,
    /// Data address of each stream's upstream.
    upstream_data: HashMap<String, SocketAddr>,
    pipelines: HashMap<String, StreamSource>,
    /// Streams published live to this server (see `publish`): offered
    /// while a publisher sends or within its grace period.
    published: std::collections::BTreeSet<String>,
    /// Neighbours whose control connection is open (or being opened).
    connected: std::collections::HashSet<String>,
    /// Per stream: the upstream it is heard from, and when it last was.
    heard: HashMap<String, (Source, Heard)>,
    /// Per stream and track: the one RTP line RTSP players see, whatever
    /// upstream or server the stream comes from.
    lines: HashMap<(String, usize), SharedContinuity>,
    /// When each stream's branch last got a new upstream (join, repair,
    /// move): it is not moved again before it settles.
    moves: Moves,
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
    started: Instant,
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
        let state = State {
            routes: RouteTable::new(id.name.clone(), names, config),
            trees: Trees::new(id.name.clone(), offered),
            sessions: Sessions::new(settings.session_limits),
            waiters: HashMap::new(),
            data_ports: HashMap::new(),
            upstream_data: HashMap::new(),
            pipelines: HashMap::new(),
            published: Default::default(),
            connected: Default::default(),
            heard: HashMap::new(),
            lines: HashMap::new(),
            moves: Moves::new(settings.settle.unwrap_or(Duration::MAX)),
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
            started: Instant::now(),
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
        self.tasks.spawn(async move { me.heartbeat_loop().await });
        let me = self.clone();
        self.tasks.spawn(async move { me.datagram_loop().await });
        if self.settings.settle.is_some() {
            let me = self.clone();
            self.tasks.spawn(async move { me.improve_loop().await });
        }
        if let Some(silence) = self.settings.silence {
            let me = self.clone();
            self.tasks.spawn(async move { me.silence_loop(silence).await });
        }
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
            let ups: Vec<(String, String)> = st
                .trees
                .active()
                .filter_map(|b| match &b.source {
                    Source::Neighbour(up) => Some((b.desc.stream.clone(), up.clone())),
                    Source::Local => None,
                })
                .collect();
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

    /// Sends the periodic heartbeat to every neighbour and, on the same
    /// tick, ends the beats whose time is up: a neighbour that missed three
    /// in a row is lost. (One tick for both keeps a node at rest to a few
    /// wake-ups a second.)
    async fn heartbeat_loop(self: Arc<Self>) {
        let limit = (self.settings.heartbeat * 2).max(Duration::from_millis(250));
        let mut tick = self.ticker(self.settings.heartbeat);
        while tick.next().await {
            let now = Instant::now();
            for neighbour in self.links.expire(now) {
                if self.lock().routes.is_down(&neighbour) {
                    continue;
                }
                warn!(node = %self.id.name, %neighbour, "neighbour missed 3 heartbeats: declared lost");
                self.neighbour_lost(&neighbour, false);
            }
            self.links.beat_all(now, limit);
        }
    }

    /// Takes in the neighbours' datagrams: answers heartbeats, learns link
    /// delays and carried streams from the answers, floods probes on.
    async fn datagram_loop(self: Arc<Self>) {
        let mut buf = Vec::new();
        loop {
            let incoming = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.links.recv(&mut buf) => r,
            };
            match incoming {
                Ok(Incoming::Heartbeat { seq, reply_to }) => self.links.answer(reply_to, seq, self.carrying()),
                Ok(Incoming::Answer { from, answer, carrying }) => self.on_answer(&from, answer.rtt, carrying),
                Ok(Incoming::Probe(probe)) => self.on_probe(probe),
                Ok(Incoming::LinkNotice { from, notice }) => self.on_link_notice(from, notice),
                Err(e) => {
                    warn!(node = %self.id.name, "heartbeat socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A neighbour answered a heartbeat after `rtt`.
    fn on_answer(self: &Arc<Self>, neighbour: &str, rtt: Duration, carrying: Vec<String>) {
        let (connect, notices) = {
            let mut st = self.lock();
            st.routes.on_link_rtt(neighbour, rtt.as_micros() as u64);
            st.routes.set_carrying(neighbour, carrying);
            let notices = if st.routes.is_down(neighbour) {
                st.routes.neighbour_up(neighbour);
                info!(node = %self.id.name, %neighbour, "neighbour answers again");
                self.changes.send_modify(|v| *v += 1);
                st.routes.announce_link(neighbour, true, net::unix_us())
            } else {
                Vec::new()
            };
            (st.connected.insert(neighbour.to_string()), notices)
        };
        self.send_link_notices(notices);
        if connect {
            let me = self.clone();
            let neighbour = neighbour.to_string();
            self.tasks.spawn(async move { me.open_control(neighbour).await });
        }
    }

    /// Opens the control connection to a neighbour that answers
    /// heartbeats, so that a stream request does not wait for handshakes.
    async fn open_control(self: Arc<Self>, neighbour: String) {
        let Some(mut client) = self.clients.get(&neighbour).cloned() else { return };
        let request = pb::PingRequest { sender: self.id.name.clone() };
        if let Err(e) = client.ping(request).await {
            debug!(node = %self.id.name, %neighbour, "control connection not open yet: {}", e.message());
            self.lock().connected.remove(&neighbour);
        }
    }

    /// Keeps established trees on good routes: a branch whose routes now
    /// offer a clearly better way to its server than its upstream (a link
    /// got slower, a node came back) moves there, make-before-break: the
    /// new upstream is joined first, then the old one left.
    async fn improve_loop(self: Arc<Self>) {
        let mut tick = self.ticker((self.id.probe_interval * 2).max(Duration::from_millis(500)));
        while tick.next().await {
            let now = Instant::now();
            let due = {
                let mut st = self.lock();
                let st = &mut *st;
                st.moves.due(&st.trees, &st.routes, now)
            };
            for m in due {
                let me = self.clone();
                self.tasks.spawn(async move { me.move_upstream(m).await });
            }
        }
    }

    async fn move_upstream(self: Arc<Self>, m: Move) {
        let started = Instant::now();
        let (desc, data_addr) = match self
            .request_upstream(&m.stream, &m.to, vec![self.id.name.clone()], self.settings.join_timeout)
            .await
        {
            Ok(joined) => joined,
            Err(nak) => {
                debug!(node = %self.id.name, stream = %m.stream, via = %m.to, "move to a better upstream refused: {}", nak.detail);
                return;
            }
        };
        let outcome = {
            let mut st = self.lock();
            // Meanwhile the branch may have been repaired, moved or pruned.
            let out = match moves::accept(&st.trees, &m, &desc.server) {
                moves::Verdict::Take => st.trees.repaired(&m.to, desc),
                moves::Verdict::Stale => None,
                moves::Verdict::OtherRoot { root } => {
                    info!(
                        node = %self.id.name, stream = %m.stream, via = %m.to, root = %root, offered = %desc.server,
                        "move not made: the better upstream feeds the stream from another server"
                    );
                    None
                }
            };
            if out.is_some() {
                st.upstream_data.insert(m.stream.clone(), data_addr);
                st.moves.changed(&m.stream, Instant::now());
                self.republish(&mut st);
            }
            out.and_then(|(down, old)| Some((down, old, st.trees.branch(&m.stream)?.desc.clone())))
        };
        let Move { stream, from, to } = m;
        let Some((downstream, old, desc)) = outcome else {
            let me = self.clone();
            self.tasks.spawn(async move { me.send_leave(stream, to).await });
            return;
        };
        info!(
            node = %self.id.name, %stream, from = %from, upstream = %to,
            took_ms = started.elapsed().as_millis() as u64, "moved to a better upstream"
        );
        if let Some(old) = old {
            let me = self.clone();
            let s2 = stream.clone();
            self.tasks.spawn(async move { me.send_leave(s2, old).await });
        }
        for d in downstream {
            let me = self.clone();
            let desc = desc.clone();
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    /// Watches the streams this node receives: one gone silent gets its
    /// upstream pinged at once, with a timeout of a few link round trips;
    /// no answer means the upstream (or the link) is lost, long before
    /// three heartbeats would say so. An upstream that answers is left
    /// alone (it may be repairing its own way up) and asked again later.
    async fn silence_loop(self: Arc<Self>, silence: Duration) {
        let mut watcher = Silence::new(silence);
        let mut tick = self.ticker(watcher.period());
        while tick.next().await {
            let watch = {
                let mut st = self.lock();
                let st = &mut *st;
                let heard = &st.heard;
                let silent_ms = |stream: &str| heard.get(stream).and_then(|(_, h)| h.silent_ms());
                watcher.tick(&mut st.trees, &st.routes, silent_ms, Instant::now())
            };
            for (stream, up) in watch.rejoin {
                warn!(
                    node = %self.id.name, %stream, upstream = %up, silent_ms = silence::REJOIN_AFTER.as_millis() as u64,
                    "upstream answers but no longer feeds the stream: joining again"
                );
                let me = self.clone();
                self.tasks.spawn(async move { me.repair(stream, Vec::new()).await });
            }
            for (up, limit) in watch.ping {
                let me = self.clone();
                self.tasks.spawn(async move { me.check_silent_upstream(up, limit).await });
            }
        }
    }

    async fn check_silent_upstream(self: Arc<Self>, up: String, limit: Duration) {
        if self.links.check(&up, limit).await {
            debug!(node = %self.id.name, upstream = %up, "a stream went quiet but its upstream answers");
            return;
        }
        if self.lock().routes.is_down(&up) {
            return;
        }
        warn!(
            node = %self.id.name, upstream = %up, timeout_ms = limit.as_millis() as u64,
            "a stream went silent and its upstream does not answer: declared lost"
        );
        self.neighbour_lost(&up, false);
    }

    /// A neighbour (or the link to it) is gone: forget routes through it
    /// and repair the branches it fed, at once. The branches it was fed by
    /// us are pruned at once only when the loss is certain (the
    /// bootstrapper's notice); after missed heartbeats, which a lossy link
    /// also causes, only if it is still silent a few seconds later.
    pub fn neighbour_lost(self: &Arc<Self>, neighbour: &str, certain: bool) {
        let (repairs, notices, probes) = {
            let mut st = self.lock();
            let news = !st.routes.is_down(neighbour);
            st.routes.neighbour_down(neighbour);
            // Every route through the link dies at once, everywhere.
            let notices = if news { st.routes.announce_link(neighbour, false, net::unix_us()) } else { Vec::new() };
            let probes = st.routes.tell_changes(Instant::now());
            st.connected.remove(neighbour);
            self.links.mark_lost(neighbour);
            (st.trees.upstream_lost(neighbour), notices, probes)
        };
        self.send_link_notices(notices);
        self.send_probes(probes);
        for stream in repairs {
            warn!(node = %self.id.name, %stream, upstream = %neighbour, "upstream lost: repairing the tree");
            let me = self.clone();
            self.tasks.spawn(async move { me.repair(stream, Vec::new()).await });
        }
        if certain {
            self.prune_downstream(neighbour);
        } else {
            let me = self.clone();
            let neighbour = neighbour.to_string();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = me.cancel.cancelled() => {}
                    _ = tokio::time::sleep(DOWNSTREAM_GRACE) => {
                        if me.lock().routes.is_down(&neighbour) {
                            me.prune_downstream(&neighbour);
                        }
                    }
                }
            });
        }
        let mut st = self.lock();
        self.republish(&mut st);
    }

    fn prune_downstream(self: &Arc<Self>, neighbour: &str) {
        let prunes = self.lock().trees.downstream_lost(neighbour);
        for (stream, prune) in prunes {
            info!(node = %self.id.name, %stream, downstream = %neighbour, "downstream lost: pruned");
            // Should it be alive after all, it learns it lost its upstream.
            let me = self.clone();
            let desc = gave_up(&stream);
            let to = neighbour.to_string();
            self.tasks.spawn(async move { me.send_reroot(to, desc).await });
            self.carry_out_prune(&stream, prune, None);
        }
    }

    /// Finds a new upstream for a repairing branch, through any neighbour
    /// but its own downstreams, retrying until it succeeds or the branch
    /// is gone.
    async fn repair(self: Arc<Self>, stream: String, avoid: Vec<String>) {
        let started = Instant::now();
        // When the stream's last packet came, on the clock the data plane
        // marks packets with: the repair's gap is measured from there.
        let last_packet_ms = {
            let st = self.lock();
            st.heard.get(&stream).and_then(|(_, h)| h.silent_ms()).map(|ms| relay::clock_ms().saturating_sub(ms))
        };
        let mut repair = Repair::new(stream.clone(), avoid);
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let step = {
                let st = self.lock();
                repair.next(&st.trees, &st.routes, Instant::now())
            };
            let (to, path) = match step {
                Step::Done => return,
                Step::Wait { orphan } => {
                    debug!(node = %self.id.name, %stream, "no repair target left this round");
                    if orphan {
                        self.orphan(&stream);
                    }
                    tokio::time::sleep(self.settings.heartbeat).await;
                    continue;
                }
                Step::Ask { to, path } => (to, path),
            };
            match self.request_upstream(&stream, &to, path, self.settings.join_timeout).await {
                Ok((desc, data_addr)) => {
                    let outcome = {
                        let mut st = self.lock();
                        let out = st.trees.repaired(&to, desc);
                        if out.is_some() {
                            st.upstream_data.insert(stream.clone(), data_addr);
                            st.moves.changed(&stream, Instant::now());
                            self.republish(&mut st);
                        }
                        out.map(|(down, old)| (down, old, st.trees.branch(&stream).map(|b| b.desc.clone())))
                    };
                    match outcome {
                        Some((downstream, old, Some(desc))) => {
                            if let Some(old) = old {
                                let me = self.clone();
                                let s2 = stream.clone();
                                self.tasks.spawn(async move { me.send_leave(s2, old).await });
                            }
                            info!(
                                node = %self.id.name, %stream, upstream = %to, server = %desc.server,
                                took_ms = started.elapsed().as_millis() as u64, "tree repaired"
                            );
                            let me = self.clone();
                            let s2 = stream.clone();
                            self.tasks.spawn(async move { me.measure_repair(s2, last_packet_ms).await });
                            let me = self.clone();
                            let (s2, t2) = (stream.clone(), to.clone());
                            self.tasks.spawn(async move {
                                me.request_refresh(s2, t2).await;
                            });
                            for d in downstream {
                                let me = self.clone();
                                let desc = desc.clone();
                                self.tasks.spawn(async move { me.send_reroot(d, desc).await });
                            }
                            return;
                        }
                        _ => {
                            // Attached below ourselves, or pruned meanwhile: undo.
                            let me = self.clone();
                            let (s2, t2) = (stream.clone(), to.clone());
                            self.tasks.spawn(async move { me.send_leave(s2, t2).await });
                            repair.undone(&to);
                        }
                    }
                }
                Err(nak) => {
                    debug!(node = %self.id.name, %stream, via = %to, "repair attempt refused: {}", nak.detail);
                    let after = repair.refused(&to, nak.reason);
                    if after.orphan {
                        self.orphan(&stream);
                    }
                    if after.wait {
                        tokio::time::sleep(self.settings.heartbeat).await;
                    }
                }
            }
        }
    }

    /// Counts a repair of `stream` and, once the first packet comes through
    /// the new upstream (within 10 s), its gap: from `last_packet_ms` (the
    /// last one before, on [`relay::clock_ms`]) to that first one.
    async fn measure_repair(self: Arc<Self>, stream: String, last_packet_ms: Option<u64>) {
        let heard = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.repairs.len() > KEPT_STREAMS {
                st.repairs.retain(|s, _| st.trees.branch(s).is_some());
            }
            let repairs = st.repairs.entry(stream.clone()).or_default();
            repairs.count += 1;
            repairs.last_gap = None;
            st.heard.get(&stream).map(|(_, h)| h.clone())
        };
        self.changes.send_modify(|v| *v += 1);
        let (Some(heard), Some(before)) = (heard, last_packet_ms) else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tick = self.ticker(Duration::from_millis(10));
        while tick.next().await && Instant::now() < deadline {
            // The marker holds the latest packet: read at the first tick
            // after the first packet, it is that packet to within a tick.
            if let Some(silent) = heard.silent_ms() {
                let first = relay::clock_ms().saturating_sub(silent);
                let gap = Duration::from_millis(first.saturating_sub(before));
                info!(node = %self.id.name, %stream, gap_ms = gap.as_millis() as u64, "media flows again after the repair");
                if let Some(r) = self.lock().repairs.get_mut(&stream) {
                    r.last_gap = Some(gap);
                }
                return;
            }
        }
    }

    /// Tells the downstreams of a branch that finds no way to the root to
    /// look for one on their own; those that do leave this node, which may
    /// then repair through them.
    fn orphan(self: &Arc<Self>, stream: &str) {
        let downstream = self.lock().trees.orphan(stream);
        if downstream.is_empty() {
            return;
        }
        warn!(node = %self.id.name, stream, ?downstream, "no way to the root: downstreams asked to look on their own");
        for d in downstream {
            let me = self.clone();
            let desc = gave_up(stream);
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    async fn send_reroot(self: Arc<Self>, to: String, desc: StreamDesc) {
        let Some(mut client) = self.clients.get(&to).cloned() else { return };
        let request = pb::RerootRequest {
            stream: desc.stream,
            sender: self.id.name.clone(),
            route: desc.route,
            server: desc.server,
        };
        match tokio::time::timeout(Duration::from_secs(2), client.reroot(request)).await {
            Ok(Ok(_)) => {}
            // A refusal is a bug or a misconfiguration, never the network:
            // say so, or the downstream waits for a notice that never comes.
            Ok(Err(status)) if status.code() != tonic::Code::Unavailable => {
                warn!(node = %self.id.name, downstream = %to, "reroot notice refused: {}", status.message())
            }
            Ok(Err(status)) => {
                debug!(node = %self.id.name, downstream = %to, "reroot notice not delivered: {}", status.message())
            }
            Err(_) => debug!(node = %self.id.name, downstream = %to, "reroot notice timed out"),
        }
    }

    /// The upstream's route to the root changed: update ours, pass it on.
    pub fn rerooted(self: &Arc<Self>, stream: &str, from: &str, server: &str, route: &[String]) {
        if route.is_empty() {
            if self.lock().trees.upstream_abandoned(stream, from) {
                warn!(node = %self.id.name, stream, upstream = %from, "upstream gave up: repairing the tree");
                let me = self.clone();
                let (s, f) = (stream.to_string(), from.to_string());
                self.tasks.spawn(async move { me.repair(s, vec![f]).await });
            }
            return;
        }
        let (downstream, desc) = {
            let mut st = self.lock();
            let down = st.trees.rerooted(stream, from, server, route);
            (down, st.trees.branch(stream).map(|b| b.desc.clone()))
        };
        let Some(desc) = desc else { return };
        for d in downstream {
            let me = self.clone();
            let desc = desc.clone();
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    /// Tears down the sessions of clients that went silent (crashed, or
    /// lost their network) so their branches are pruned.
    async fn expire_loop(self: Arc<Self>) {
        let mut tick = self.ticker(Duration::from_secs(1));
        while tick.next().await {
            // A stream that brought nothing here for a while (a publisher
            // between connections, a repair under way) gives its viewers
            // nothing to report on: they are not judged silent meanwhile.
            let starved: std::collections::HashSet<String> = {
                let st = self.lock();
                st.heard
                    .iter()
                    .filter(|(_, (_, heard))| heard.silent_ms().is_none_or(|ms| ms > STARVED_MS))
                    .map(|(stream, _)| stream.clone())
                    .collect()
            };
            let gone = self.with_sessions(|s| {
                s.expire(Instant::now(), self.settings.session_timeout, |stream| starved.contains(stream))
            });
            for (id, session) in gone {
                warn!(pop = %self.id.name, client = %session.client, session = &id[..8.min(id.len())], "client silent: session expired");
                if let Some(stream) = session.stream {
                    self.leave(&stream, Requester::Local);
                }
            }
        }
    }

    async fn probe_loop(self: Arc<Self>) {
        let mut seq = net::unix_us();
        let files: Vec<String> = self.catalogue.keys().cloned().collect();
        let mut tick = self.ticker(self.id.probe_interval);
        while tick.next().await {
            seq += 1;
            let out = {
                let st = &mut *self.lock();
                let streams = files.iter().chain(st.published.iter()).cloned().collect();
                st.routes.originate(seq, net::unix_us(), streams)
            };
            self.send_probes(out);
        }
    }

    fn send_probes(&self, out: Vec<(String, overlay_core::routing::Probe)>) {
        for (to, probe) in out {
            self.links.send_probe(&to, convert::probe_to_wire(probe));
        }
    }

    fn send_link_notices(&self, out: Vec<(String, overlay_core::routing::LinkNotice)>) {
        for (to, notice) in out {
            self.links.send_link_notice(&to, convert::link_notice_to_wire(notice));
        }
    }

    /// A link notice from a neighbour: passed on once; routes through a
    /// dead link are withdrawn.
    pub fn on_link_notice(self: &Arc<Self>, from: String, notice: pb::LinkNotice) {
        let notice = convert::link_notice_from_wire(notice, from);
        let (notices, probes) = {
            let mut st = self.lock();
            let notices = st.routes.on_link_notice(&notice, Instant::now());
            let probes = if notices.is_empty() { Vec::new() } else { st.routes.tell_changes(Instant::now()) };
            (notices, probes)
        };
        if !notices.is_empty() {
            let (a, b) = (&notice.a, &notice.b);
            if notice.up {
                info!(node = %self.id.name, %a, %b, "link notice: the link is back");
            } else {
                info!(node = %self.id.name, %a, %b, "link notice: the link is dead, routes through it withdrawn");
            }
        }
        self.send_link_notices(notices);
        self.send_probes(probes);
    }

    /// A STATUS probe from a neighbour.
    pub fn on_probe(self: &Arc<Self>, probe: pb::Probe) {
        let probe = convert::probe_from_wire(probe);
        let out = self.lock().routes.on_probe(&probe, Instant::now(), net::unix_us());
        self.send_probes(out);
    }

    /// Streams this node carries, for heartbeat answers.
    pub fn carrying(&self) -> Vec<String> {
        self.lock().trees.carrying()
    }

    /// Joins `stream` on behalf of `requester` (a neighbour or a local
    /// viewer); resolves when the requester is attached or refused.
    pub async fn join(
        self: &Arc<Self>,
        stream: &str,
        requester: Requester,
        path: Vec<String>,
        data_port: u16,
    ) -> JoinResult {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        // Right after start, routes are still being learnt, and a neighbour
        // that missed heartbeats comes back with the next probe: a request
        // that finds no way yet waits a few probe periods before its NAK.
        let starting_until = self.started + self.id.probe_interval * 4;
        let route_wait_until = Instant::now() + self.id.probe_interval * 3;
        let decision = loop {
            let d = {
                let mut st = self.lock();
                if let Requester::Neighbour(n) = &requester {
                    st.data_ports.insert(n.clone(), data_port);
                }
                let st = &mut *st;
                let d = st.trees.request(stream, requester.clone(), &path, ticket, &st.routes, Instant::now());
                match &d {
                    JoinDecision::Attached(_) => self.republish(st),
                    JoinDecision::Nak(_) => {}
                    _ => {
                        st.waiters.insert(ticket, tx.take().expect("one waiter per request"));
                    }
                }
                d
            };
            let wait_until = match &d {
                JoinDecision::Nak(n) if n.reason == NakReason::NoRoute => route_wait_until.max(starting_until),
                JoinDecision::Nak(n) if n.reason == NakReason::UnknownStream => starting_until,
                _ => Instant::now(),
            };
            if Instant::now() < wait_until {
                tokio::time::sleep(self.id.probe_interval / 2).await;
                continue;
            }
            break d;
        };
        match decision {
            JoinDecision::Attached(desc) => {
                info!(node = %self.id.name, stream, ?requester, "attached to the existing tree");
                return Ok(desc);
            }
            JoinDecision::Nak(nak) => {
                info!(node = %self.id.name, stream, ?requester, reason = ?nak.reason, "stream request refused: {}", nak.detail);
                return Err(nak);
            }
            JoinDecision::Wait => {
                debug!(node = %self.id.name, stream, "waiting for the join under way")
            }
            JoinDecision::Forward { to, path } => {
                info!(node = %self.id.name, stream, upstream = %to, ?path, "stream request sent upstream");
                let me = self.clone();
                let stream = stream.to_string();
                let span = tracing::Span::current();
                self.tasks.spawn(async move { me.forward_join(stream, to, path).await }.instrument(span));
            }
            JoinDecision::ServeLocal => {
                self.serve_local(stream);
            }
        }
        let timeout = self.settings.join_timeout + Duration::from_millis(500);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(Nak {
                reason: NakReason::Timeout,
                detail: format!("node {}: stream {stream:?}: join did not complete in {timeout:?}", self.id.name),
            }),
        }
    }

    async fn forward_join(self: Arc<Self>, stream: String, mut to: String, path: Vec<String>) {
        // The requester waits for one join timeout: ways that fail inside
        // it (a refusal, or an upstream that stopped answering) are tried
        // one after another, each neighbour once.
        let deadline = Instant::now() + self.settings.join_timeout;
        let mut tried = Vec::new();
        let mut crossed = false;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = self.request_upstream(&stream, &to, path.clone(), left).await;
            let Err(nak) = &result else { break result };
            tried.push(to.clone());
            let next = {
                let mut st = self.lock();
                let st = &mut *st;
                (deadline.saturating_duration_since(Instant::now()) > JOIN_RETRY_FLOOR)
                    .then(|| st.trees.redirect(&stream, &path, &tried, &st.routes, Instant::now()))
                    .flatten()
            };
            let next = match next {
                Some(next) => next,
                // Crossing requests: the upstream asked this node for the
                // stream as this node asked it (a stale view of who
                // carries it), and each refused the other as a loop. The
                // upstream tries another way; once it has one, the same
                // way works. Tried once, while time is left.
                None if nak.reason == NakReason::Loop
                    && !crossed
                    && deadline.saturating_duration_since(Instant::now()) > CROSSING_PAUSE + JOIN_RETRY_FLOOR =>
                {
                    crossed = true;
                    tokio::time::sleep(CROSSING_PAUSE).await;
                    to.clone()
                }
                None => break result,
            };
            info!(node = %self.id.name, %stream, failed = %to, upstream = %next, "stream request failed ({}): trying another way", nak.detail);
            to = next;
        };
        let mut st = self.lock();
        let st = &mut *st;
        let (waiters, answer) = match result {
            Ok((desc, data_addr)) => {
                st.upstream_data.insert(stream.clone(), data_addr);
                st.moves.changed(&stream, Instant::now());
                let mut waiters = st.trees.joined(Source::Neighbour(to.clone()), desc);
                let answer = Ok(st.trees.branch(&stream).map(|b| b.desc.clone()).expect("just joined"));
                info!(node = %self.id.name, %stream, upstream = %to, "joined the tree");
                // The upstream's last GOP is on its way before a viewer of
                // this POP is answered: otherwise PLAY could come first, the
                // viewer would get live packets from mid-GOP, and the GOP
                // arriving after them would be too old for its jitter buffer
                // (it would wait for the next keyframe). Neighbours are
                // answered at once; they ask for their own refresh.
                let viewers: Vec<_> = waiters
                    .extract_if(.., |w| w.requester == Requester::Local)
                    .filter_map(|w| st.waiters.remove(&w.ticket))
                    .collect();
                let me = self.clone();
                let (stream2, to2, answer2) = (stream.clone(), to.clone(), answer.clone());
                self.tasks.spawn(async move {
                    let deadline = tokio::time::Instant::now() + VIEWER_REFRESH_WAIT;
                    let video = answer2.as_ref().ok().and_then(|d| d.ssrcs.first().copied());
                    let mut refresh = Box::pin(me.clone().request_refresh(stream2, to2));
                    let sent = tokio::time::timeout_at(deadline, refresh.as_mut()).await;
                    let done = sent.is_ok();
                    // The upstream has sent its GOP when it answers; the
                    // packets are ours once our relay has taken them in.
                    if let (Ok(Some(packets)), Some(video)) = (sent, video) {
                        while me.relay.gop_len(video) < packets && tokio::time::Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    for tx in viewers {
                        let _ = tx.send(answer2.clone());
                    }
                    if !done {
                        refresh.await;
                    }
                });
                (waiters, answer)
            }
            Err(nak) => {
                warn!(node = %self.id.name, %stream, upstream = %to, "join failed: {}", nak.detail);
                (st.trees.failed(&stream), Err(nak))
            }
        };
        for w in waiters {
            if let Some(tx) = st.waiters.remove(&w.ticket) {
                let _ = tx.send(answer.clone());
            }
        }
        self.republish(st);
    }

    async fn request_upstream(
        &self,
        stream: &str,
        to: &str,
        path: Vec<String>,
        timeout: Duration,
    ) -> Result<(StreamDesc, SocketAddr), Nak> {
        let nak =
            |reason, why: String| Nak { reason, detail: format!("node {}: stream {stream:?}: {why}", self.id.name) };
        let (Some(mut client), Some(neighbour)) = (self.clients.get(to).cloned(), self.neighbour(to)) else {
            return Err(nak(NakReason::NoRoute, format!("{to} is not a neighbour")));
        };
        let mut request = tonic::Request::new(pb::JoinRequest {
            stream: stream.to_string(),
            sender: self.id.name.clone(),
            path,
            data_port: u32::from(self.settings.data_port),
        });
        telemetry::inject(request.metadata_mut());
        request.set_timeout(timeout);
        let answer = client.join(request);
        tokio::pin!(answer);
        // An upstream that is wedged (stopped, or its control plane stuck)
        // would hold the request for the whole timeout, and every node
        // below with it: while no answer comes, it is pinged, and two pings
        // in a row without an answer end the wait.
        let mut unanswered = 0;
        let reply = loop {
            if unanswered == 0 {
                tokio::select! {
                    r = &mut answer => break r,
                    _ = tokio::time::sleep(JOIN_WATCH) => {}
                }
            }
            let limit = silence::ping_limit(&self.lock().routes, to) * 2;
            tokio::select! {
                r = &mut answer => break r,
                alive = self.links.check(to, limit) => unanswered = if alive { 0 } else { unanswered + 1 },
            }
            if unanswered == 2 {
                return Err(nak(
                    NakReason::Timeout,
                    format!("{to} does not answer pings while the stream request waits"),
                ));
            }
        };
        match reply {
            Ok(reply) => match reply.into_inner().result {
                Some(pb::join_reply::Result::Joined(info)) => {
                    let addr = SocketAddr::new(neighbour.address, info.data_port as u16);
                    Ok((convert::desc_from_wire(&info), addr))
                }
                Some(pb::join_reply::Result::Nak(n)) => Err(convert::nak_from_wire(&n)),
                None => Err(nak(NakReason::NoRoute, format!("{to} sent an empty reply"))),
            },
            Err(status)
                if status.code() == tonic::Code::DeadlineExceeded || status.code() == tonic::Code::Cancelled =>
            {
                Err(nak(NakReason::Timeout, format!("{to} did not answer the stream request")))
            }
            Err(status) => {
                Err(nak(NakReason::NoRoute, format!("{to} failed the stream request: {}", status.message())))
            }
        }
    }

    fn serve_local(self: &Arc<Self>, stream: &str) {
        // A published stream's ingest runs already: its packets go into
        // the relay whether or not anyone watches.
        let live = self.lock().published.contains(stream);
        let started = if live {
            Ok(None)
        } else {
            let spec = self.catalogue.get(stream).cloned();
            let relay = self.relay.clone();
            spec.ok_or_else(|| format!("stream {stream:?} vanished from the catalogue")).and_then(|spec| {
                StreamSource::start(stream, &spec, move |pkt| relay.inject(pkt)).map(Some).map_err(|e| e.to_string())
            })
        };
        let mut st = self.lock();
        let st = &mut *st;
        let (waiters, answer) = match started {
            Ok(source) => {
                if let Some(source) = source {
                    st.pipelines.insert(stream.to_string(), source);
                }
                let desc = StreamDesc {
                    stream: stream.to_string(),
                    server: self.id.name.clone(),
                    ssrcs: media::stream_ssrcs(stream).to_vec(),
                    depth: 0,
                    route: Vec::new(),
                };
                info!(node = %self.id.name, stream, live, "this server roots the tree");
                let waiters = st.trees.joined(Source::Local, desc);
                (waiters, Ok(st.trees.branch(stream).map(|b| b.desc.clone()).expect("just joined")))
            }
            Err(e) => {
                warn!(node = %self.id.name, stream, "pipeline failed to start: {e}");
                let nak = Nak {
                    reason: NakReason::NoRoute,
                    detail: format!("server {}: stream {stream:?}: pipeline failed: {e}", self.id.name),
                };
                (st.trees.failed(stream), Err(nak))
            }
        };
        for w in waiters {
            if let Some(tx) = st.waiters.remove(&w.ticket) {
                let _ = tx.send(answer.clone());
            }
        }
        self.republish(st);
    }

    /// Registers the server's publishers (for inspect).
    pub fn set_publishing(&self, p: Arc<crate::publish::Publishing>) {
        let _ = self.publishing.set(p);
    }

    /// Whether another server offers `stream` (by this node's routes).
    pub fn offered_elsewhere(&self, stream: &str) -> bool {
        self.lock().routes.offered(stream)
    }

    /// A publisher began sending `stream` here: the server offers it (in
    /// its probes, and to joins). False if the name is one of the server's
    /// files or the test stream, which a publisher cannot take.
    pub fn offer_published(&self, stream: &str) -> bool {
        if self.catalogue.contains_key(stream) {
            return false;
        }
        let mut st = self.lock();
        st.published.insert(stream.to_string());
        st.trees.offer(stream);
        self.republish(&mut st);
        true
    }

    /// `stream`'s publisher is gone for good: the server stops offering it,
    /// drops the tree it rooted and tells each downstream that this root
    /// gave up (they look for another server that offers it, or end).
    pub fn withdraw_published(self: &Arc<Self>, stream: &str) {
        let downstream = {
            let mut st = self.lock();
            st.published.remove(stream);
            let (downstream, waiting) = st.trees.withdraw(stream);
            let nak = Nak {
                reason: NakReason::UnknownStream,
                detail: format!("server {}: stream {stream:?}: its publisher went away", self.id.name),
            };
            for w in waiting {
                if let Some(tx) = st.waiters.remove(&w.ticket) {
                    let _ = tx.send(Err(nak.clone()));
                }
            }
            st.upstream_data.remove(stream);
            self.republish(&mut st);
            downstream
        };
        info!(node = %self.id.name, stream, ?downstream, "published stream withdrawn");
        for d in downstream {
            let me = self.clone();
            let desc = gave_up(stream);
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    /// `requester` leaves `stream`; prunes upstream or stops the pipeline
    /// when it was the last.
    pub fn leave(self: &Arc<Self>, stream: &str, requester: Requester) {
        let prune = self.lock().trees.leave(stream, &requester);
        self.carry_out_prune(stream, prune, Some(requester));
    }

    /// Carries out what leaving a stream requires: a prune upstream or
    /// stopping the pipeline, and a new forwarding table.
    fn carry_out_prune(self: &Arc<Self>, stream: &str, prune: Prune, requester: Option<Requester>) {
        let pipeline = {
            let mut st = self.lock();
            let pipeline = if prune == Prune::StopLocal { st.pipelines.remove(stream) } else { None };
            if !matches!(prune, Prune::Nothing) {
                st.upstream_data.remove(stream);
            }
            self.republish(&mut st);
            pipeline
        };
        match prune {
            Prune::Nothing => {
                debug!(node = %self.id.name, stream, ?requester, "left; others still watch")
            }
            Prune::Upstream(up) => {
                info!(node = %self.id.name, stream, upstream = %up, "last viewer left: pruning upstream");
                let me = self.clone();
                let stream = stream.to_string();
                self.tasks.spawn(async move { me.send_leave(stream, up).await });
            }
            Prune::StopLocal => {
                let what = if pipeline.is_some() { "pipeline stopped" } else { "the publisher's ingest goes on" };
                info!(node = %self.id.name, stream, "last branch pruned: {what}");
                if let Some(p) = pipeline {
                    self.tasks.spawn_blocking(move || p.stop());
                }
            }
        }
    }

    /// Asks the upstream for the stream's last GOP (our table is ready now);
    /// the packets it sent.
    async fn request_refresh(self: Arc<Self>, stream: String, up: String) -> Option<usize> {
        let mut client = self.clients.get(&up).cloned()?;
        let request = pb::RefreshRequest { stream: stream.clone(), sender: self.id.name.clone() };
        match tokio::time::timeout(Duration::from_secs(2), client.refresh(request)).await {
            Ok(Ok(r)) => {
                let packets = r.into_inner().packets;
                debug!(node = %self.id.name, %stream, upstream = %up, packets, "GOP refreshed");
                Some(packets as usize)
            }
            _ => {
                debug!(node = %self.id.name, %stream, upstream = %up, "GOP refresh failed");
                None
            }
        }
    }

    /// A downstream asks for the last GOP of `stream`.
    pub fn refresh(&self, stream: &str, sender: &str) -> usize {
        let target = {
            let mut st = self.lock();
            let branch = st.trees.branch(stream);
            let ssrc = branch.filter(|b| b.downstream.contains(sender)).and_then(|b| b.desc.ssrcs.first().copied());
            let addr = self.neighbour(sender).map(|n| n.address);
            match (ssrc, addr) {
                (Some(ssrc), Some(addr)) => {
                    let port = *st.data_ports.get(sender).unwrap_or(&self.settings.data_port);
                    let tally = st.tallies.entry(stream.to_string()).or_default().to(sender);
                    Some((ssrc, SocketAddr::new(addr, port), tally))
                }
                _ => None,
            }
        };
        target.map(|(ssrc, dest, tally)| self.relay.send_gop(ssrc, dest, &tally)).unwrap_or(0)
    }

    async fn send_leave(self: &Arc<Self>, stream: String, up: String) {
        let Some(mut client) = self.clients.get(&up).cloned() else {
            return;
        };
        let request = pb::LeaveRequest { stream: stream.clone(), sender: self.id.name.clone() };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), client.leave(request)).await {
            warn!(node = %self.id.name, %stream, upstream = %up, "prune not acknowledged: {e}");
        }
    }

    /// The bootstrapper says `node` failed. It may only have lost its way
    /// to the bootstrapper (a partition): a neighbour is asked once more,
    /// and one that answers is believed over the notice.
    pub fn node_failed(self: &Arc<Self>, node: &str) {
        if self.neighbour(node).is_none() {
            self.forget_failed(node);
            return;
        }
        let me = self.clone();
        let node = node.to_string();
        self.tasks.spawn(async move {
            let limit = (me.settings.heartbeat * 2).max(Duration::from_millis(250));
            if me.links.check(&node, limit).await {
                warn!(node = %me.id.name, failed = %node, "bootstrapper reports it failed but it answers: kept");
                return;
            }
            me.forget_failed(&node);
            me.neighbour_lost(&node, true);
        });
    }

    /// Routes through a failed node die here, and the neighbours hear what
    /// that changes.
    fn forget_failed(&self, node: &str) {
        let probes = {
            let mut st = self.lock();
            st.routes.node_failed(node, Instant::now());
            st.routes.tell_changes(Instant::now())
        };
        self.send_probes(probes);
    }

    /// Rebuilds the forwarding table from the trees and sessions and
    /// publishes it to the relay.
    fn republish(&self, st: &mut State) {
        let mut table = ForwardTable::default();
        st.heard.retain(|stream, (source, _)| st.trees.branch(stream).is_some_and(|b| b.source == *source));
        st.moves.retain_carried(&st.trees);
        // The figures of streams no longer carried stay (counters do), up
        // to a bound.
        if st.tallies.len() > KEPT_STREAMS {
            st.tallies.retain(|stream, _| st.trees.branch(stream).is_some());
        }
        // A line outlives a repair (the branch may be gone meanwhile): it
        // ends when no session watches its stream any more.
        let watched: std::collections::HashSet<&str> =
            st.sessions.iter().filter_map(|(_, s)| s.stream.as_deref()).collect();
        st.lines.retain(|(stream, _), _| watched.contains(stream.as_str()));
        for branch in st.trees.active() {
            let stream = &branch.desc.stream;
            // A new upstream starts unheard: silence is judged from its
            // first packet on.
            let heard =
                st.heard.entry(stream.clone()).or_insert_with(|| (branch.source.clone(), Heard::default())).1.clone();
            let accept = match &branch.source {
                Source::Local => Accept::Local,
                Source::Neighbour(_) => match st.upstream_data.get(stream) {
                    Some(a) => Accept::From(*a),
                    None => continue,
                },
            };
            let tallies = st.tallies.entry(stream.clone()).or_default();
            let (mut downstream, mut sent): (Vec<SocketAddr>, Vec<Tally>) = branch
                .downstream
                .iter()
                .filter_map(|n| {
                    let addr = self.neighbour(n)?.address;
                    let port = *st.data_ports.get(n).unwrap_or(&self.settings.data_port);
                    Some((SocketAddr::new(addr, port), tallies.to(n)))
                })
                .unzip();
            let received = tallies.received.clone();
            let players: Vec<SocketAddr> = st.sessions.playing(stream).collect();
            let tracks: Vec<_> = st.sessions.playing_tracks(stream).collect();
            // A tally for viewers only where there are some.
            let viewers = if players.is_empty() && tracks.is_empty() { Tally::default() } else { tallies.to(VIEWERS) };
            for addr in players {
                downstream.push(addr);
                sent.push(viewers.clone());
            }
            for (i, ssrc) in branch.desc.ssrcs.iter().enumerate() {
                // Every node keeps the video's last GOP for downstreams and
                // viewers who start now.
                let cache_gop = i == 0;
                let split: Vec<SplitDest> =
                    tracks.iter().filter(|t| t.track == i).map(|t| SplitDest { rtp: t.rtp, rtcp: t.rtcp }).collect();
                let continuity = (!split.is_empty()).then(|| line(&mut st.lines, stream, i));
                let route = Route {
                    accept,
                    downstream: downstream.clone(),
                    split,
                    continuity,
                    cache_gop,
                    heard: heard.clone(),
                    received: received.clone(),
                    sent: sent.clone(),
                    split_sent: viewers.clone(),
                };
                table.insert(*ssrc, route);
            }
        }
        // A published stream nobody watches still fills the relay's GOP
        // cache, so that its first viewer starts at once.
        for stream in &st.published {
            let [video, _] = media::stream_ssrcs(stream);
            if table.get(video).is_none() {
                let route = Route { cache_gop: true, ..Route::plain(Accept::Local, Vec::new()) };
                table.insert(video, route);
            }
        }
        self.relay.publish(table);
        self.changes.send_modify(|v| *v += 1);
    }

    /// PLAY: the session's client first gets the cached GOP of the video
    /// (so it decodes at once), then the live packets.
    pub fn play(&self, id: &str) -> Result<overlay_core::session::Phase, overlay_core::session::SessionError> {
        let (phase, burst) = {
            let mut st = self.lock();
            st.sessions.touch(id, Instant::now())?;
            let phase = st.sessions.play(id)?;
            let session = st.sessions.iter().find(|(sid, _)| *sid == id).map(|(_, s)| s.clone());
            let burst = session.and_then(|s| {
                let stream = s.stream.as_deref()?;
                let ssrc = *st.trees.branch(stream)?.desc.ssrcs.first()?;
                let video = s.tracks.iter().find(|t| t.track == 0);
                let tally = st.tallies.entry(stream.to_string()).or_default().to(VIEWERS);
                match (s.rtp_dest, video) {
                    (Some(d), _) => Some((ssrc, SplitDest { rtp: d, rtcp: d }, None, tally)),
                    (None, Some(t)) => Some((
                        ssrc,
                        SplitDest { rtp: t.rtp, rtcp: t.rtcp },
                        Some(line(&mut st.lines, stream, 0)),
                        tally,
                    )),
                    (None, None) => None,
                }
            });
            (phase, burst)
        };
        if let Some((ssrc, dest, line, tally)) = burst {
            let n = self.relay.send_gop_on(ssrc, dest, line.as_ref(), &tally);
            info!(node = %self.id.name, dest = %dest.rtp, "PLAY starts with the cached GOP: {n} packets");
        }
        let mut st = self.lock();
        self.republish(&mut st);
        Ok(phase)
    }

    /// What RTSP players of `stream` see: per track, the SSRC of its line
    /// (None before its first packet went out).
    pub fn line_ssrcs(&self, stream: &str, tracks: usize) -> Vec<Option<u32>> {
        let st = self.lock();
        (0..tracks).map(|t| st.lines.get(&(stream.to_string(), t)).and_then(|l| l.lock().ssrc())).collect()
    }

    /// Where a player starting now picks up the video line of `stream`:
    /// the sequence number and timestamp of the cached GOP's first packet
    /// on it (for RTP-Info).
    pub fn line_start(&self, stream: &str) -> Option<(u16, u32)> {
        let (ssrc, line) = {
            let mut st = self.lock();
            let ssrc = *st.trees.branch(stream)?.desc.ssrcs.first()?;
            (ssrc, line(&mut st.lines, stream, 0))
        };
        let mut first =
            self.relay.gop(ssrc).into_iter().find(|p| {
                overlay_core::rtp::Packet::parse(p).is_ok_and(|p| p.kind() == overlay_core::rtp::Kind::Rtp)
            })?;
        let rewritten = line.lock().rewrite(&mut first);
        let p = overlay_core::rtp::Packet::parse(&first).ok().filter(|_| rewritten)?;
        Some((p.sequence(), p.timestamp()))
    }

    /// The H.264 parameter sets (SPS, PPS) and payload type of the video
    /// SSRC `video`, from the cached GOP; waits up to `wait` for a keyframe
    /// (a stream just joined has none yet).
    pub async fn parameter_sets(&self, video: u32, wait: Duration) -> Option<(Vec<u8>, Vec<u8>, u8)> {
        let until = Instant::now() + wait;
        loop {
            let gop = self.relay.gop(video);
            if let Some((sps, pps)) = relay::gop::parameter_sets(gop.iter().map(Vec::as_slice)) {
                let pt = gop.iter().find_map(|p| {
                    overlay_core::rtp::Packet::parse(p)
                        .ok()
                        .filter(|p| p.kind() == overlay_core::rtp::Kind::Rtp)
                        .map(|p| p.payload_type())
                });
                return Some((sps, pps, pt.unwrap_or(media::VIDEO_PT)));
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stream as this node carries it now, if it does.
    pub fn desc(&self, stream: &str) -> Option<overlay_core::tree::StreamDesc> {
        self.lock().trees.branch(stream).map(|b| b.desc.clone())
    }

    /// [`Node::with_sessions`] for changes that leave every destination
    /// as it was (keepalives, reports): the forwarding table stays.
    pub fn note_sessions<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        f(&mut self.lock().sessions)
    }

    /// Runs `f` on the session table and republishes the forwarding table.
    pub fn with_sessions<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        let mut st = self.lock();
        let out = f(&mut st.sessions);
        self.republish(&mut st);
        out
    }

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
            .trees
            .active()
            .map(|b| b.desc.stream.clone())
            .chain(st.tallies.keys().cloned())
            .chain(st.repairs.keys().cloned())
            .collect();
        let streams = names
            .into_iter()
            .map(|stream| {
                let branch = st.trees.branch(&stream);
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
                let beats = self.links.beat_totals(&n.name);
                NeighbourFigures {
                    neighbour: n.name.clone(),
                    up: !st.routes.is_down(&n.name),
                    delay_seconds: st.routes.link_delay_us(&n.name).map(|us| us as f64 / 1e6),
                    heartbeats_sent: beats.sent,
                    heartbeats_missed: beats.missed,
                }
            })
            .collect();
        let session_counts = st.sessions.counts;
        let routes = st.routes.counters();
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
                delay_us: st.routes.link_delay_us(&n.name).unwrap_or(0),
                down: st.routes.is_down(&n.name),
            })
            .collect();
        let branches = st
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
                    "link_delay_us": st.routes.link_delay_us(&n.name),
                    "down": st.routes.is_down(&n.name),
                })
            })
            .collect();
        let mut routes = serde_json::Map::new();
        for (server, entries) in st.routes.entries(now) {
            let best = st.routes.best_next_hop(&server, now, &[]);
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
            .trees
            .active()
            .map(|b| {
                json!({
                    "stream": b.desc.stream,
                    "server": b.desc.server,
                    "depth": b.desc.depth,
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
            "joining": st.trees.joining(),
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
