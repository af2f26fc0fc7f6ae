//! `onode`: one overlay node. `server` streams media (and, given the
//! topology file, is the bootstrapper); `node` relays; `pop` relays and
//! serves clients. Tool subcommands check a topology file and inspect
//! running nodes.

mod bootstrap;
mod convert;
mod link;
mod map;
mod metrics;
mod net;
mod node;
mod publish;
mod rtsp;
mod services;
mod tls;
mod token;
mod webrtc;
mod whip;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use media::SourceSpec;
use overlay_core::topology::Topology;
use overlay_proto as pb;
use overlay_proto::bootstrap_client::BootstrapClient;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bootstrap::{BootstrapService, Bootstrapper};
use crate::link::{LinkKey, LinkMaster};
use crate::node::{Identity, Neighbour, Node, Role, Settings};
use crate::services::{OverlayService, SessionService};

#[derive(Parser)]
#[command(
    name = "onode",
    version,
    about = "A node of the streaming overlay: bootstrapper, streaming server, relay or POP",
    long_about = "A node of the streaming overlay.\n\nThe bootstrapper is the server started with the topology file; every other node is given only the bootstrapper's address, registers with it and learns its neighbours. Servers flood STATUS probes; every node keeps routes toward the servers and joins stream trees on demand; POPs serve clients."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Streaming server; with --topology it is also the bootstrapper.
    Server(ServerArgs),
    /// Relay node: forwards STATUS and media, joins trees for its neighbours.
    Node(NodeArgs),
    /// Point of presence: a relay that also serves client sessions.
    Pop(NodeArgs),
    /// Topology file tools.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Print a running node's state (routes, trees, sessions, counters) as
    /// JSON. With TLS on, this needs the operator certificate.
    Inspect {
        /// The node's control address, IP or IP:PORT.
        addr: String,
        #[command(flatten)]
        tls: ToolTls,
    },
    /// Print the bootstrapper's view of the overlay as JSON. With TLS on,
    /// this needs the operator certificate.
    Overview {
        /// The bootstrapper's address, IP or IP:PORT.
        addr: String,
        #[command(flatten)]
        tls: ToolTls,
    },
    /// Create the overlay's CA (or reuse the one in OUT) and issue a
    /// certificate to every node of the topology and to the operator.
    ///
    /// Writes OUT/ca.pem and OUT/ca.key (keep this one private: whoever has
    /// it can add nodes), OUT/NAME.pem and OUT/NAME.key for every node, and
    /// OUT/operator.pem and OUT/operator.key for `onode inspect` and
    /// `onode overview`. Give each node the folder (or a copy holding
    /// ca.pem and its own two files) with --tls-dir; viewers need ca.pem only.
    Certs {
        /// The overlay topology file (original JSON format).
        #[arg(long)]
        topology: PathBuf,
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// How long the node and operator certificates are valid (the CA: ten times as long).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Make a new CA even if OUT holds one (every certificate issued before stops being valid).
        #[arg(long)]
        new_ca: bool,
    },
    /// Viewer and publisher tokens (JWT): make a signing key, sign tokens.
    ///
    /// POPs and servers given --token-key take media requests only with a
    /// token that grants the stream; viewers pass it with `oclient --token`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the two RTP SSRCs (video, audio) a stream is sent with.
    StreamSsrcs { stream: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write a new random shared secret (HS256) to FILE, readable by its
    /// owner only. Nodes check tokens with it (--token-key FILE) and
    /// `onode token mint --key FILE` signs with it.
    NewSecret { file: PathBuf },
    /// Write a new Ed25519 key pair into OUT: token.key signs tokens (keep
    /// it with whoever mints), token.pub checks them (give it to the nodes
    /// with --token-key). Nodes holding only the public key cannot mint.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a token and print it.
    Mint {
        /// The signing key: a shared secret file or token.key.
        #[arg(long)]
        key: PathBuf,
        /// Who holds the token (shown in the nodes' logs).
        #[arg(long, default_value = "viewer")]
        sub: String,
        /// A stream name pattern it may watch (`*` matches any run of characters); repeatable.
        #[arg(long = "read", value_name = "PATTERN")]
        read: Vec<String>,
        /// A stream name pattern it may publish; repeatable.
        #[arg(long = "publish", value_name = "PATTERN")]
        publish: Vec<String>,
        /// How long it is valid, in seconds from now.
        #[arg(long, default_value_t = 3600)]
        valid_for_s: u64,
    },
}

#[derive(Args, Clone)]
struct ToolTls {
    /// TLS folder made by `onode certs`: the tools use its operator certificate.
    #[arg(long, env = "OVERLAY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
}

impl ToolTls {
    /// A channel to `addr` for an operator tool.
    fn channel(&self, addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
        let tls = self.tls_dir.as_deref().map(|d| tls::Tls::load(d, tls::OPERATOR)).transpose()?;
        let server_name = addr.ip().to_string();
        net::channel(addr, None, Duration::from_secs(3), tls.as_ref().map(|t| (t, server_name.as_str())))
    }
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Validate a topology file and print a summary; exit 1 naming the fault.
    Check { file: PathBuf },
}

#[derive(Args, Clone)]
struct Common {
    /// This node's name in the topology (default: found from the address it registers from).
    #[arg(long)]
    name: Option<String>,
    /// Local address to bind the control (TCP) and data (UDP) sockets to.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// gRPC control port, the same on every node.
    #[arg(long, default_value_t = 7070)]
    control_port: u16,
    /// UDP port for RTP.
    #[arg(long, default_value_t = 7071)]
    data_port: u16,
    /// Route delays closer than this (µs) count as a tie, decided by hops.
    #[arg(long, default_value_t = 500)]
    tie_floor_us: u64,
    /// How long a stream request may take before it is NAKed (ms).
    #[arg(long, default_value_t = 3000)]
    join_timeout_ms: u64,
    /// Neighbour heartbeat period (ms); three missed beats declare a neighbour lost.
    #[arg(long, env = "ONODE_HEARTBEAT_MS", default_value_t = 100)]
    heartbeat_ms: u64,
    /// A stream silent this long (ms) gets its upstream pinged at once; an
    /// upstream that does not answer is declared lost without waiting for
    /// three heartbeats (0: off).
    #[arg(long, env = "ONODE_SILENCE_MS", default_value_t = 150)]
    silence_ms: u64,
    /// A branch keeps an upstream at least this long (s) before moving to a
    /// clearly better route to the same server (0: trees never move).
    #[arg(long, env = "ONODE_SETTLE_S", default_value_t = 30)]
    settle_s: u64,
    /// POPs: a client session not heard from for this long (s) is torn down.
    #[arg(long, default_value_t = 10)]
    session_timeout_s: u64,
    /// POPs: most open sessions from one client address.
    #[arg(long, env = "ONODE_MAX_SESSIONS_PER_ADDRESS", default_value_t = 16)]
    max_sessions_per_address: usize,
    /// POPs: most open sessions in total.
    #[arg(long, default_value_t = 1024)]
    max_sessions: usize,
    /// TCP port of the Prometheus metrics (http://NODE:PORT/metrics); 0
    /// turns them off. They name the node, its neighbours and its streams
    /// and ask for no certificate: where clients can reach the node, keep
    /// the port to the operators' network with a firewall, or turn it off.
    #[arg(long, env = "ONODE_METRICS_PORT", default_value_t = 9998)]
    metrics_port: u16,
    /// The bootstrapper only: TCP port of the live overlay map
    /// (http://BOOTSTRAPPER:PORT/: nodes, links and delays, each stream's
    /// tree, viewers, failures); 0 turns it off. Like the metrics it asks
    /// for no certificate: keep it to the operators' network.
    #[arg(long, env = "ONODE_MAP_PORT", default_value_t = 9997)]
    map_port: u16,
    /// TCP port of the RTSP server: at POPs players watch
    /// (rtsp://POP:PORT/STREAM), at servers encoders publish
    /// (rtsp://SERVER:PORT/NAME, ANNOUNCE and RECORD over TCP); 0 turns it off.
    #[arg(long, env = "ONODE_RTSP_PORT", default_value_t = 8554)]
    rtsp_port: u16,
    /// Servers: UDP port where encoders publish MPEG-TS over SRT
    /// (srt://SERVER:PORT?streamid=publish:NAME); 0 turns it off.
    #[arg(long, env = "ONODE_SRT_PORT", default_value_t = 8890)]
    srt_port: u16,
    /// Servers: how long (s) a published stream's viewers wait for a
    /// publisher that went away; one back within it goes on seamlessly.
    #[arg(long, env = "ONODE_PUBLISH_GRACE_S", default_value_t = 10.0)]
    publish_grace_s: f64,
    /// Servers: most streams published at once.
    #[arg(long, default_value_t = 16)]
    max_publishers: usize,
    /// Servers: most kbit/s one publisher may send (0: no bound); one over
    /// it for two seconds is dropped.
    #[arg(long, default_value_t = 20_000)]
    max_publish_kbit: u32,
    /// Servers: a publisher of a name already being published replaces the
    /// old one (by default it is refused).
    #[arg(long)]
    publish_replace: bool,
    /// POPs: TCP port of the WebRTC edge for browsers (player page at
    /// http://POP:PORT/STREAM, WHEP at /STREAM/whep); the peers' media
    /// (ICE, DTLS-SRTP) uses the same number over UDP. 0 turns it off.
    #[arg(long, env = "ONODE_WEBRTC_PORT", default_value_t = 8889)]
    webrtc_port: u16,
    /// TLS folder made by `onode certs`: the control plane runs over TLS,
    /// this node proves its name with NAME.pem and accepts overlay calls
    /// only from nodes holding the CA's certificates. Needs --name.
    /// Without it, nothing on the control plane is authenticated.
    #[arg(long, env = "OVERLAY_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// POPs: viewers need a token that grants the stream (`onode token`):
    /// FILE is the shared secret or the public key (token.pub) tokens are
    /// checked with. Without it, any client may watch any stream.
    #[arg(long, env = "OVERLAY_TOKEN_KEY", value_name = "FILE")]
    token_key: Option<PathBuf>,
}

impl Common {
    /// This node's TLS material, when a TLS folder is given.
    fn tls(&self) -> anyhow::Result<Option<tls::Tls>> {
        let Some(dir) = &self.tls_dir else { return Ok(None) };
        let name =
            self.name.as_deref().context("--tls-dir needs --name: the node's certificate is picked by its name")?;
        tls::Tls::load(dir, name).map(Some)
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Overlay topology file (original JSON format): makes this server the bootstrapper.
    #[arg(long, conflicts_with = "bootstrap", required_unless_present = "bootstrap")]
    topology: Option<PathBuf>,
    /// The bootstrapper's address (IP or IP:PORT), for servers that are not the bootstrapper.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Folder of media files; each is a stream named after the file. The stream `test` is always offered.
    #[arg(long)]
    media: Option<PathBuf>,
    /// STATUS probe period in ms (bootstrapper only; the overlay takes it from there).
    #[arg(long, default_value_t = 500)]
    probe_interval_ms: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct NodeArgs {
    /// The bootstrapper's address, IP or IP:PORT.
    #[arg(long)]
    bootstrap: String,
    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("onode: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onode: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topology { command: TopologyCommand::Check { file } } => {
            let topology = load_topology(&file)?;
            println!("{}: ok\n{}", file.display(), topology.summary());
            Ok(())
        }
        Command::StreamSsrcs { stream } => {
            let [v, a] = media::stream_ssrcs(&stream);
            println!("{v} {a}");
            Ok(())
        }
        Command::Certs { topology, out, days, new_ca } => {
            let topo = load_topology(&topology)?;
            let issued = tls::issue(&topo, &out, days, new_ca)?;
            let ca = if issued.new_ca { "a new CA" } else { "the CA already there" };
            println!(
                "{}: {} certificates issued by {ca}, valid {days} days: {}",
                issued.dir.display(),
                issued.names.len(),
                issued.names.join(" ")
            );
            Ok(())
        }
        Command::Token { command } => run_token(command),
        Command::Inspect { addr, tls } => {
            let addr = net::parse_addr(&addr, 7070)?;
            let mut client = overlay_proto::overlay_client::OverlayClient::new(tls.channel(addr)?);
            let reply = client.inspect(pb::InspectRequest {}).await.with_context(|| format!("inspect {addr}"))?;
            let value: serde_json::Value = serde_json::from_str(&reply.into_inner().json)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Command::Overview { addr, tls } => {
            let addr = net::parse_addr(&addr, 7070)?;
            let mut client = BootstrapClient::new(tls.channel(addr)?);
            let o =
                client.overview(pb::OverviewRequest {}).await.with_context(|| format!("overview {addr}"))?.into_inner();
            let value = serde_json::json!({"ready": o.ready, "registered": o.registered, "failed": o.failed, "missing": o.missing});
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Command::Server(args) => {
            let catalogue = {
                media::init().context("GStreamer")?;
                media::catalogue(args.media.as_deref())?
            };
            match (args.topology, args.bootstrap) {
                (Some(file), _) => {
                    let topology = load_topology(&file)?;
                    let interval = Duration::from_millis(args.probe_interval_ms.max(50));
                    run_bootstrapper(topology, interval, args.common, catalogue).await
                }
                (None, Some(addr)) => run_member(Role::Server, &addr, args.common, catalogue).await,
                (None, None) => bail!("give --topology FILE (bootstrapper) or --bootstrap ADDR"),
            }
        }
        Command::Node(args) => run_member(Role::Node, &args.bootstrap, args.common, BTreeMap::new()).await,
        Command::Pop(args) => run_member(Role::Pop, &args.bootstrap, args.common, BTreeMap::new()).await,
    }
}

fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::NewSecret { file } => {
            tls::write_private(&file, &format!("{}\n", token::new_secret()))?;
            println!("{}: a new shared secret (HS256); give it to the nodes with --token-key", file.display());
        }
        TokenCommand::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let (private, public) = token::new_key_pair()?;
            tls::write_private(&out.join("token.key"), &private)?;
            let public_file = out.join("token.pub");
            std::fs::write(&public_file, public).with_context(|| format!("cannot write {}", public_file.display()))?;
            println!(
                "{}: token.key signs tokens (keep it private), token.pub checks them (give it to the nodes with --token-key)",
                out.display()
            );
        }
        TokenCommand::Mint { key, sub, read, publish, valid_for_s } => {
            if read.is_empty() && publish.is_empty() {
                bail!("a token that grants nothing is of no use: give --read PATTERN and/or --publish PATTERN");
            }
            let now = net::unix_us() / 1_000_000;
            let claims = token::Claims { sub, iat: now, exp: now.saturating_add(valid_for_s), read, publish };
            println!("{}", token::mint(&key, &claims)?);
        }
    }
    Ok(())
}

fn load_topology(file: &std::path::Path) -> anyhow::Result<Topology> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read topology file {}", file.display()))?;
    Topology::parse(&text).with_context(|| format!("topology file {}", file.display()))
}

fn settings(role: Role, c: &Common, tls: Option<tls::Tls>) -> anyhow::Result<Settings> {
    let tokens = c.token_key.as_deref().map(token::Verifier::from_file).transpose()?.map(Arc::new);
    Ok(Settings {
        tls,
        tokens,
        session_limits: overlay_core::session::SessionLimits {
            per_address: c.max_sessions_per_address.max(1),
            total: c.max_sessions.max(1),
        },
        role,
        bind: c.bind,
        control_port: c.control_port,
        data_port: c.data_port,
        tie_floor_us: c.tie_floor_us,
        join_timeout: Duration::from_millis(c.join_timeout_ms),
        heartbeat: Duration::from_millis(c.heartbeat_ms.max(10)),
        silence: (c.silence_ms > 0).then(|| Duration::from_millis(c.silence_ms.max(20))),
        settle: (c.settle_s > 0).then(|| Duration::from_secs(c.settle_s)),
        session_timeout: Duration::from_secs(c.session_timeout_s.max(1)),
    })
}

async fn bind_control(c: &Common) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(c.bind, c.control_port);
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (control port)"))
}

/// Trips the token on SIGINT or SIGTERM.
fn on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("signal received: shutting down");
        cancel.cancel();
    });
}

async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    bootstrapper: Option<Arc<Bootstrapper>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let pop = node.settings.role == Role::Pop;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &node.settings.tls {
        builder = builder.tls_config(tls.server_config()?).context("TLS configuration")?;
    } else {
        warn!(node = %node.id.name, "no --tls-dir: the control plane is not authenticated, anyone who reaches this node can send it overlay calls");
    }
    use services::{BOOTSTRAP_MAX_MESSAGE, OVERLAY_MAX_MESSAGE, SESSION_MAX_MESSAGE};
    let router = builder
        .layer(metrics::CountRequests(node.requests.clone()))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)))
        .add_service(
            pb::overlay_server::OverlayServer::new(OverlayService(node.clone()))
                .max_decoding_message_size(OVERLAY_MAX_MESSAGE),
        )
        .add_optional_service(pop.then(|| {
            pb::session_server::SessionServer::new(SessionService(node.clone()))
                .max_decoding_message_size(SESSION_MAX_MESSAGE)
        }))
        .add_optional_service(bootstrapper.map(|b| {
            pb::bootstrap_server::BootstrapServer::new(BootstrapService(b))
                .max_decoding_message_size(BOOTSTRAP_MAX_MESSAGE)
        }));
    let shutdown = cancel.clone();
    let server = tokio::spawn(
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { shutdown.cancelled().await }),
    );
    node.start();
    cancel.cancelled().await;
    node.shutdown().await;
    node.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), node.tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    info!(node = %node.id.name, "stopped");
    Ok(())
}

async fn run_bootstrapper(
    topology: Topology,
    probe_interval: Duration,
    common: Common,
    catalogue: BTreeMap<String, SourceSpec>,
) -> anyhow::Result<()> {
    let name = match &common.name {
        Some(n) => n.clone(),
        None => {
            let mine = net::local_addresses();
            let candidates: Vec<IpAddr> = if common.bind.is_unspecified() { mine } else { vec![common.bind] };
            candidates
                .iter()
                .find_map(|a| topology.owner_of(*a).filter(|n| n.server).map(|n| n.name.clone()))
                .context("none of this host's addresses is among a server's names in the topology; pass --name")?
        }
    };
    let spec = topology.node(&name).with_context(|| format!("node {name:?} is not in the topology"))?;
    bootstrap::check_role(spec, "server").map_err(anyhow::Error::msg)?;
    let mut common = common;
    common.name = Some(name.clone());
    let tls = common.tls()?;
    let telemetry = telemetry::init(&format!("onode-bootstrapper-{name}"));
    let master = || tls.as_ref().map(|t| LinkMaster::from_secret(t.private_key()));
    let identity = bootstrap::identity(spec, probe_interval, master().as_ref());
    let listener = bind_control(&common).await?;
    let bootstrapper = Bootstrapper::new(topology.clone(), probe_interval, common.control_port, master());
    let cancel = CancellationToken::new();
    on_signal(cancel.clone());
    let metrics = bind_metrics(&common).await?;
    let map_listener = if common.map_port == 0 {
        None
    } else {
        let addr = SocketAddr::new(common.bind, common.map_port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the overlay map (--map-port 0 turns it off)"))?;
        Some(listener)
    };
    let publish = bind_publish(&common).await?;
    let webrtc = bind_webrtc(&common).await?;
    let node = Node::new(identity, settings(Role::Server, &common, tls)?, catalogue, cancel.clone())?;
    if let Some(listener) = metrics {
        node.tasks.spawn(metrics::serve(node.clone(), listener));
    }
    if let Some(listener) = map_listener {
        let overlay_map = map::Map::new(topology.clone());
        map::observe_all(&overlay_map, &node);
        node.tasks.spawn(map::serve(overlay_map, node.clone(), listener));
    }
    start_publishing(&node, &common, publish, webrtc)?;
    let mut events = bootstrapper.subscribe();
    bootstrapper.register(&name);
    info!(node = %name, nodes = topology.summary().nodes, "bootstrapper listening on {}", listener.local_addr()?);
    let watcher = node.clone();
    node.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = watcher.cancel.cancelled() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => on_event(&watcher, ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
            }
        }
    });
    let result = serve(node, listener, Some(bootstrapper), cancel).await;
    telemetry.shutdown().await;
    result
}

fn on_event(node: &Arc<Node>, ev: pb::OverlayEvent) {
    use pb::overlay_event::Event;
    match ev.event {
        Some(Event::NodeFailed(f)) if f.name != node.id.name => {
            warn!(node = %node.id.name, failed = %f.name, "bootstrapper reports a failed node");
            node.node_failed(&f.name);
        }
        Some(Event::Ready(_)) => info!(node = %node.id.name, "overlay ready"),
        _ => {}
    }
}

async fn register(
    bootstrap: SocketAddr,
    role: Role,
    common: &Common,
    streams: &[String],
    cancel: &CancellationToken,
) -> anyhow::Result<(BootstrapClient<tonic::transport::Channel>, pb::RegisterReply)> {
    let tls = common.tls()?;
    let server_name = bootstrap.ip().to_string();
    let tls = tls.as_ref().map(|t| (t, server_name.as_str()));
    let mut client = BootstrapClient::new(net::channel(bootstrap, Some(common.bind), Duration::from_secs(3), tls)?);
    let request = pb::RegisterRequest {
        name: common.name.clone().unwrap_or_default(),
        role: role.as_str().into(),
        streams: streams.to_vec(),
    };
    let mut warned = false;
    loop {
        match client.register(request.clone()).await {
            Ok(reply) => return Ok((client, reply.into_inner())),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                bail!("the bootstrapper at {bootstrap} refused the registration: {}", s.message())
            }
            Err(s) => {
                if !warned {
                    eprintln!("onode: bootstrapper {bootstrap} not reachable yet ({}); retrying", s.message());
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => bail!("stopped before registering"),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn identity_from(reply: &pb::RegisterReply) -> anyhow::Result<Identity> {
    let ip = |s: &String| s.parse::<IpAddr>().with_context(|| format!("bootstrapper sent a bad address {s:?}"));
    Ok(Identity {
        name: reply.name.clone(),
        names: reply.names.iter().map(ip).collect::<anyhow::Result<_>>()?,
        pop_addresses: reply.pop_addresses.iter().map(ip).collect::<anyhow::Result<_>>()?,
        server: reply.server,
        neighbours: reply
            .neighbours
            .iter()
            .map(|n| {
                let link_key = LinkKey::from_wire(&n.link_key)
                    .map_err(|e| anyhow::anyhow!("bootstrapper sent a bad key for the link to {}: {e}", n.name))?;
                Ok(Neighbour { name: n.name.clone(), address: ip(&n.address)?, server: n.server, link_key })
            })
            .collect::<anyhow::Result<_>>()?,
        probe_interval: Duration::from_millis(u64::from(reply.probe_interval_ms.max(50))),
    })
}

async fn run_member(
    role: Role,
    bootstrap: &str,
    common: Common,
    catalogue: BTreeMap<String, SourceSpec>,
) -> anyhow::Result<()> {
    let bootstrap = net::parse_addr(bootstrap, common.control_port).context("--bootstrap")?;
    let tls = common.tls()?;
    let cancel = CancellationToken::new();
    on_signal(cancel.clone());
    let listener = bind_control(&common).await?;
    let streams: Vec<String> = catalogue.keys().cloned().collect();
    let (client, reply) = register(bootstrap, role, &common, &streams, &cancel).await?;
    let identity = identity_from(&reply)?;
    let telemetry = telemetry::init(&format!("onode-{}-{}", role.as_str(), identity.name));
    info!(node = %identity.name, %bootstrap, ready = reply.ready, "registered with the bootstrapper");
    if let Some(tls) = &tls {
        if tls.name.as_deref() != Some(identity.name.as_str()) {
            bail!(
                "the bootstrapper registered this node as {} but its certificate names {:?}",
                identity.name,
                tls.name
            );
        }
    }
    let rtsp = if role == Role::Pop && common.rtsp_port != 0 {
        let addr = SocketAddr::new(common.bind, common.rtsp_port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for RTSP (--rtsp-port 0 turns it off)"))?;
        // Players send their RTCP to the second port of the server_port
        // pair the POP announces: the one after the data port.
        let rtcp_addr = SocketAddr::new(common.bind, common.data_port.saturating_add(1));
        let rtcp = tokio::net::UdpSocket::bind(rtcp_addr).await.with_context(|| {
            format!("cannot bind {rtcp_addr} (udp) for the RTSP players' RTCP (the port after --data-port)")
        })?;
        Some((listener, rtcp))
    } else {
        None
    };
    let webrtc = if matches!(role, Role::Pop | Role::Server) { bind_webrtc(&common).await? } else { None };
    let metrics = bind_metrics(&common).await?;
    let publish = if role == Role::Server { bind_publish(&common).await? } else { None };
    let node = Node::new(identity, settings(role, &common, tls)?, catalogue, cancel.clone())?;
    if let Some(listener) = metrics {
        node.tasks.spawn(metrics::serve(node.clone(), listener));
    }
    let webrtc = if role == Role::Server {
        start_publishing(&node, &common, publish, webrtc)?;
        None
    } else {
        webrtc
    };
    if let Some((listener, rtcp)) = rtsp {
        info!(node = %node.id.name, "RTSP: players watch at rtsp://{}/STREAM", listener.local_addr()?);
        node.tasks.spawn(rtsp::serve(node.clone(), listener, rtcp));
    }
    if let Some((listener, udp)) = webrtc {
        info!(node = %node.id.name, "WebRTC: browsers watch at http://{}/STREAM (WHEP at /STREAM/whep)", listener.local_addr()?);
        node.tasks.spawn(webrtc::serve(node.clone(), listener, udp, client.clone()));
    }
    let watcher = node.clone();
    let common2 = common.clone();
    node.tasks.spawn(async move { watch(watcher, client, bootstrap, role, common2, streams).await });
    let result = serve(node, listener, None, cancel).await;
    telemetry.shutdown().await;
    result
}

/// A server's RTSP publish listener (`--rtsp-port`, None when 0).
async fn bind_publish(common: &Common) -> anyhow::Result<Option<TcpListener>> {
    if common.rtsp_port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::new(common.bind, common.rtsp_port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for RTSP publishers (--rtsp-port 0 turns it off)"))?;
    Ok(Some(listener))
}

/// The WebRTC edge's HTTP listener and its UDP sockets, one per address of
/// this host (or the one --bind names): each peer's media leaves from the
/// address it reached. None when `--webrtc-port` is 0.
async fn bind_webrtc(common: &Common) -> anyhow::Result<Option<(TcpListener, Vec<tokio::net::UdpSocket>)>> {
    if common.webrtc_port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::new(common.bind, common.webrtc_port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for WebRTC (--webrtc-port 0 turns it off)"))?;
    let ips: Vec<IpAddr> = if common.bind.is_unspecified() {
        net::local_addresses().into_iter().filter(|ip| !is_link_local_v6(ip)).collect()
    } else {
        vec![common.bind]
    };
    let mut udp = Vec::new();
    for ip in ips {
        let at = SocketAddr::new(ip, common.webrtc_port);
        udp.push(
            tokio::net::UdpSocket::bind(at)
                .await
                .with_context(|| format!("cannot bind {at} (udp) for WebRTC media (--webrtc-port 0 turns it off)"))?,
        );
    }
    Ok(Some((listener, udp)))
}

/// A server's publish edges: RTSP on `listener`, SRT on `--srt-port`,
/// WHIP on the WebRTC edge.
fn start_publishing(
    node: &Arc<Node>,
    common: &Common,
    listener: Option<TcpListener>,
    webrtc: Option<(TcpListener, Vec<tokio::net::UdpSocket>)>,
) -> anyhow::Result<()> {
    if !(common.publish_grace_s.is_finite() && (0.0..=3600.0).contains(&common.publish_grace_s)) {
        bail!("--publish-grace-s {}: give 0 to 3600 seconds", common.publish_grace_s);
    }
    let settings = publish::PublishSettings {
        grace: Duration::from_secs_f64(common.publish_grace_s),
        max_publishers: common.max_publishers,
        max_kbit: common.max_publish_kbit,
        replace: common.publish_replace,
    };
    let publishing = publish::Publishing::new(node.clone(), settings);
    node.set_publishing(publishing.clone());
    if let Some(listener) = listener {
        info!(node = %node.id.name, "RTSP: encoders publish at rtsp://{}/NAME", listener.local_addr()?);
        node.tasks.spawn(publish::serve_rtsp(publishing.clone(), listener));
    }
    if let Some((listener, udp)) = webrtc {
        info!(node = %node.id.name, "WHIP: encoders publish at http://{}/NAME/whip (a browser at /NAME/publish)", listener.local_addr()?);
        node.tasks.spawn(whip::serve(publishing.clone(), listener, udp));
    }
    if common.srt_port != 0 {
        let addr = SocketAddr::new(common.bind, common.srt_port);
        node.tasks.spawn(publish::serve_srt(publishing, addr));
    }
    Ok(())
}

/// The metrics listener (`--metrics-port`, None when 0).
async fn bind_metrics(common: &Common) -> anyhow::Result<Option<TcpListener>> {
    if common.metrics_port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::new(common.bind, common.metrics_port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics (--metrics-port 0 turns them off)"))?;
    Ok(Some(listener))
}

/// Holds the watch stream to the bootstrapper; when it breaks (the
/// bootstrapper restarted or is unreachable), registers again.
async fn watch(
    node: Arc<Node>,
    mut client: BootstrapClient<tonic::transport::Channel>,
    bootstrap: SocketAddr,
    role: Role,
    common: Common,
    streams: Vec<String>,
) {
    let mut common = common;
    common.name = Some(node.id.name.clone());
    loop {
        let request = pb::WatchRequest { name: node.id.name.clone() };
        match client.watch(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    tokio::select! {
                        _ = node.cancel.cancelled() => return,
                        ev = stream.next() => match ev {
                            Some(Ok(ev)) => on_event(&node, ev),
                            _ => break,
                        },
                    }
                }
                warn!(node = %node.id.name, "lost the bootstrapper's watch stream; registering again");
            }
            Err(s) => warn!(node = %node.id.name, "watch refused: {}", s.message()),
        }
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        match register(bootstrap, role, &common, &streams, &node.cancel).await {
            Ok((c, _)) => client = c,
            Err(e) => {
                warn!(node = %node.id.name, "re-registration failed: {e:#}");
                return;
            }
        }
    }
}

/// IPv6 link-local addresses need a scope to be bound; browsers reach a
/// POP by its routable addresses.
fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}
