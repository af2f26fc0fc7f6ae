//! Browsers at a POP (`http://POP:8889/STREAM`): WHEP (WebRTC-HTTP egress)
//! at `POST /STREAM/whep`, `DELETE` on the session's `Location`, and a
//! player page. The offer is answered by [`machine`] (str0m, ICE-lite);
//! this driver owns the HTTP listener, the one UDP socket every browser's
//! ICE, DTLS and SRTP go through, and the peers.
//!
//! A browser viewer is one more session of the POP, set up like an RTSP
//! player over TCP: the relay sends its copies (on the POP's RTP line, so
//! a re-root changes nothing it sees) to a loopback socket of its own, and
//! the driver writes them into the peer as they are: no decoding. PLAY
//! happens when DTLS is up, so the peer starts with the cached GOP. NACKs
//! are answered by str0m from its send buffer (RTX); keyframe requests are
//! counted and never reach the overlay (the stream's next keyframe, at
//! most a GOP away, answers them).

pub(crate) mod machine;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use overlay_core::rtp::{parse_sender_report, Kind, Packet};
use overlay_core::session::{short_id, SessionError, TrackDest};
use overlay_core::tree::{NakReason, Requester};
use rand::RngCore;
use str0m::media::KeyframeRequestKind;
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::node::Node;
use crate::token::{Action, TokenError};
pub use machine::{profile_level_id, Refusal};
use machine::{StreamFormat, TrackOut};

/// How long an offer waits for a new stream's first keyframe (the answer
/// needs its profile).
const KEYFRAME_WAIT: Duration = Duration::from_secs(4);
/// A peer that has not finished ICE and DTLS this long after its answer
/// is dropped.
const CONNECT_WAIT: Duration = Duration::from_secs(15);
/// Packets from the relay waiting for the driver, over all peers.
const MEDIA_QUEUE: usize = 4096;
/// Most browser peers at one POP (the session table's limits apply too).
const MAX_PEERS: usize = 256;

/// The player page, served at `/STREAM`.
const PLAYER: &str = include_str!("webrtc/player.html");

/// What the WebRTC edge counts (inspect, metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Browser peers now (answered, not yet ended).
    pub peers: AtomicU64,
    pub answered: AtomicU64,
    pub refused: AtomicU64,
    pub connected: AtomicU64,
    pub ended: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// Media packets dropped because the driver was behind.
    pub dropped: AtomicU64,
    /// Datagrams on the WebRTC port that belong to no peer.
    pub unmatched: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "peers": get(&self.peers), "answered": get(&self.answered), "refused": get(&self.refused), "connected": get(&self.connected),
            "ended": get(&self.ended), "keyframe_requests": get(&self.keyframe_requests),
            "dropped": get(&self.dropped), "unmatched": get(&self.unmatched),
        })
    }
}

/// Where an HTTP connection came in and from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        let peer = *stream.remote_addr();
        let local = stream.io().local_addr().unwrap_or(peer);
        Conn { local, peer }
    }
}

/// A new peer for the driver, or the end of one.
enum Command {
    Add(Box<Peer>, UdpSocket),
    Remove { id: String, done: oneshot::Sender<bool> },
}

/// The bootstrapper, for the list of POPs a page may turn to.
pub type Bootstrap = overlay_proto::bootstrap_client::BootstrapClient<tonic::transport::Channel>;

#[derive(Clone)]
struct Edge {
    node: Arc<Node>,
    udp_port: u16,
    http_port: u16,
    commands: mpsc::Sender<Command>,
    bootstrap: Bootstrap,
    /// The POPs' page addresses, and when they were asked for.
    pops: Arc<tokio::sync::Mutex<(Option<Instant>, Vec<String>)>>,
}

/// Serves WHEP and the player page on `listener`; every peer's media goes
/// through `udp`, one socket per local address (a reply must leave from
/// the address the browser sent to, which the routing table alone would
/// not pick on a host with several). Returns when the node stops.
pub async fn serve(node: Arc<Node>, listener: TcpListener, udp: Vec<UdpSocket>, bootstrap: Bootstrap) {
    let udp_port = udp.first().and_then(|u| u.local_addr().ok()).map(|a| a.port()).unwrap_or(0);
    let http_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let (commands, rx) = mpsc::channel(64);
    node.tasks.spawn(drive(node.clone(), udp, rx));
    let pops = Arc::new(tokio::sync::Mutex::new((None, Vec::new())));
    let edge = Edge { node: node.clone(), udp_port, http_port, commands, bootstrap, pops };
    let app = Router::new()
        .route("/pops", get(pop_list))
        .route("/{stream}", get(page))
        .route("/{stream}/", get(page))
        .route("/{stream}/whep", axum::routing::post(offer).options(preflight))
        .route("/{stream}/whep/{id}", delete(end).options(preflight).patch(no_trickle))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(machine::MAX_OFFER))
        .with_state(edge);
    let cancel = node.cancel.clone();
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Conn>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = served {
        warn!(pop = %node.id.name, "WebRTC HTTP server ended: {e}");
    }
}

/// Headers every answer carries, so pages of other origins can use them.
pub(crate) fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Location"));
    r
}

pub(crate) fn refused(r: &Refusal) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    cors((status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", r.reason)).into_response())
}

pub(crate) async fn preflight() -> Response {
    let mut r = cors(StatusCode::NO_CONTENT.into_response());
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, DELETE, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Authorization, Content-Type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    r
}

async fn not_found() -> Response {
    refused(&Refusal::new(404, "not found: the player is at /STREAM, WHEP at /STREAM/whep"))
}

/// ICE-lite with the POP's host candidate: the browser's candidates come
/// to us as its checks arrive, so there is nothing to trickle.
async fn no_trickle() -> Response {
    let mut r = refused(&Refusal::new(405, "this POP is ICE-lite: trickled candidates are not needed"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("DELETE, OPTIONS"));
    r
}

/// How long the list of POPs is reused before the bootstrapper is asked again.
const POPS_FRESH: Duration = Duration::from_secs(5);

/// The live POPs' page addresses (`host:port`), from the bootstrapper's
/// LOGIN answer: where a page turns when its POP stops answering.
async fn pop_list(State(edge): State<Edge>) -> Response {
    let mut cached = edge.pops.lock().await;
    if cached.0.is_none_or(|at| at.elapsed() > POPS_FRESH) {
        let request = overlay_proto::LoginRequest { client: "webrtc page".into(), stream: String::new() };
        let mut client = edge.bootstrap.clone();
        match tokio::time::timeout(Duration::from_secs(2), client.login(request)).await {
            Ok(Ok(reply)) => {
                let list = reply
                    .into_inner()
                    .pops
                    .into_iter()
                    .filter_map(|p| p.addresses.into_iter().next())
                    .map(|a| match a.parse::<std::net::Ipv6Addr>() {
                        Ok(_) => format!("[{a}]:{}", edge.http_port),
                        Err(_) => format!("{a}:{}", edge.http_port),
                    })
                    .collect();
                *cached = (Some(Instant::now()), list);
            }
            Ok(Err(e)) => debug!(pop = %edge.node.id.name, "LOGIN for the POP list refused: {}", e.message()),
            Err(_) => debug!(pop = %edge.node.id.name, "LOGIN for the POP list timed out"),
        }
    }
    let body = serde_json::to_string(&cached.1).unwrap_or_else(|_| "[]".into());
    cors(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn page(Path(stream): Path<String>) -> Response {
    if let Err(why) = overlay_core::names::check_name("stream", &stream) {
        return refused(&Refusal::new(400, why));
    }
    cors(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PLAYER).into_response())
}

async fn end(State(edge): State<Edge>, Path((stream, id)): Path<(String, String)>) -> Response {
    let (done, found) = oneshot::channel();
    if edge.commands.send(Command::Remove { id: id.clone(), done }).await.is_err() {
        return refused(&Refusal::new(503, "the POP is stopping"));
    }
    if found.await.unwrap_or(false) {
        info!(pop = %edge.node.id.name, %stream, session = short_id(&id), "WHEP session ended by DELETE");
        cors(StatusCode::OK.into_response())
    } else {
        refused(&Refusal::new(404, format!("no WHEP session {}", overlay_core::names::shown(&id))))
    }
}

async fn offer(
    State(edge): State<Edge>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let node = edge.node.clone();
    match answer(&edge, conn, &stream, &headers, &body).await {
        Ok((id, sdp)) => {
            node.webrtc.answered.fetch_add(1, Ordering::Relaxed);
            let location = format!("/{stream}/whep/{id}");
            let mut r = cors((StatusCode::CREATED, [(header::CONTENT_TYPE, "application/sdp")], sdp).into_response());
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(r) => {
            node.webrtc.refused.fetch_add(1, Ordering::Relaxed);
            info!(pop = %node.id.name, peer = %conn.peer, stream = %overlay_core::names::shown(&stream), "WHEP refused: {} {}", r.status, r.reason);
            refused(&r)
        }
    }
}

/// Checks and answers an offer; on success the peer is with the driver.
async fn answer(
    edge: &Edge,
    conn: Conn,
    stream: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, String), Refusal> {
    let node = &edge.node;
    let offer = offer_body(stream, headers, body)?;
    authorize(node, conn.peer, stream, headers)?;
    // Nothing is joined for an offer that cannot be answered.
    machine::check_offer(offer)?;
    if node.webrtc.peers.load(Ordering::Relaxed) >= MAX_PEERS as u64 {
        return Err(Refusal::new(429, format!("this POP serves {MAX_PEERS} browsers already; try another POP")));
    }
    // A session of the POP's table: its limits hold for browsers too.
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    node.with_sessions(|s| s.connect(id.clone(), format!("webrtc {}", conn.peer), conn.peer.ip(), Instant::now()))
        .map_err(session_refusal)?;
    let joined = match node.join(stream, Requester::Local, Vec::new(), node.settings.data_port).await {
        Ok(desc) => desc,
        Err(nak) => {
            let _ = node.with_sessions(|s| s.teardown(&id));
            return Err(match nak.reason {
                NakReason::UnknownStream => {
                    Refusal::new(404, format!("no server of the overlay offers stream {stream}"))
                }
                NakReason::NoRoute | NakReason::Loop => {
                    Refusal::new(503, format!("no route to a server of stream {stream} right now"))
                }
                NakReason::Timeout => {
                    Refusal::new(503, format!("the overlay did not answer for stream {stream} in time"))
                }
            });
        }
    };
    // From here on a failure also leaves the stream.
    let fail = |r: Refusal| {
        let _ = node.with_sessions(|s| s.teardown(&id));
        node.leave(stream, Requester::Local);
        r
    };
    let Some(&video) = joined.ssrcs.first() else { return Err(fail(Refusal::new(503, "the stream has no tracks"))) };
    let Some((sps, _, _)) = node.parameter_sets(video, KEYFRAME_WAIT).await else {
        return Err(fail(Refusal::new(
            503,
            format!("stream {stream} has sent no keyframe in {} s; try again", KEYFRAME_WAIT.as_secs()),
        )));
    };
    let Some(plid) = profile_level_id(&sps) else {
        return Err(fail(Refusal::new(503, format!("stream {stream} carries no readable H.264 profile"))));
    };
    let format = StreamFormat { profile_level_id: plid, audio: joined.ssrcs.len() > 1 };
    let candidate = SocketAddr::new(conn.local.ip(), edge.udp_port);
    let (rtc, sdp, negotiated) = machine::answer(offer, format, candidate, Instant::now()).map_err(fail)?;
    let sink = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(Refusal::new(500, format!("no socket for the peer's media: {e}"))))?;
    let at = sink.local_addr().map_err(|e| fail(Refusal::new(500, format!("no socket for the peer's media: {e}"))))?;
    let tracks = if negotiated.audio.is_some() { 2 } else { 1 };
    for track in 0..tracks {
        let dest = TrackDest { track, rtp: at, rtcp: at, interleaved: true };
        node.with_sessions(|s| s.set_up_track(&id, stream, dest)).map_err(|e| fail(session_refusal(e)))?;
    }
    let now = Instant::now();
    let peer = Peer {
        id: id.clone(),
        stream: stream.to_string(),
        rtc,
        negotiated,
        video: TrackOut::new(crate::node::track_clock_rate(0)),
        audio: TrackOut::new(crate::node::track_clock_rate(1)),
        ssrcs: [None, None],
        timeout: now,
        answered: now,
        touched: now,
        connected: false,
        started: false,
        done: false,
    };
    if edge.commands.send(Command::Add(Box::new(peer), sink)).await.is_err() {
        return Err(fail(Refusal::new(503, "the POP is stopping")));
    }
    info!(pop = %node.id.name, peer = %conn.peer, %stream, session = short_id(&id), profile = format!("{plid:06x}"), "WHEP offer answered");
    Ok((id, sdp))
}

/// The SDP offer of a WHEP or WHIP request for `stream`: a valid stream
/// name, `application/sdp`, UTF-8 text; or why not.
pub(crate) fn offer_body<'a>(stream: &str, headers: &HeaderMap, body: &'a [u8]) -> Result<&'a str, Refusal> {
    overlay_core::names::check_name("stream", stream).map_err(|why| Refusal::new(400, why))?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim().to_ascii_lowercase().starts_with("application/sdp") {
        return Err(Refusal::new(
            415,
            format!("the offer must be sent as application/sdp, not {}", overlay_core::names::shown(content_type)),
        ));
    }
    std::str::from_utf8(body).map_err(|_| Refusal::new(400, "the offer is not UTF-8 text"))
}

/// The token of an `Authorization: Bearer` header, as WHEP and WHIP
/// players give one.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// Checks the viewer's token (`Authorization: Bearer`) when the POP
/// requires one.
fn authorize(node: &Node, peer: SocketAddr, stream: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(verifier) = &node.settings.tokens else { return Ok(()) };
    let token = bearer(headers);
    let now = crate::net::unix_us() / 1_000_000;
    match verifier.check(token, Action::Read, stream, now) {
        Ok(claims) => {
            info!(pop = %node.id.name, %peer, %stream, viewer = %crate::services::shown(&claims.sub), "WHEP: token accepted");
            Ok(())
        }
        Err(e) => {
            let status = if matches!(e, TokenError::NotGranted { .. }) { 403 } else { 401 };
            Err(Refusal::new(status, e.to_string()))
        }
    }
}

fn session_refusal(e: SessionError) -> Refusal {
    let status = match &e {
        SessionError::Unknown(_) => 404,
        SessionError::BadPhase { .. } => 409,
        SessionError::ForeignDestination { .. } => 403,
        // HTTP's own word for it: the browser may try later or elsewhere.
        SessionError::TooMany { .. } | SessionError::TooManyFromAddress { .. } => 429,
    };
    Refusal::new(status, e.to_string())
}

/// One browser viewer.
struct Peer {
    /// Its session in the POP's table.
    id: String,
    stream: String,
    rtc: Rtc,
    negotiated: machine::Negotiated,
    video: TrackOut,
    audio: TrackOut,
    /// The line's SSRC of each track, once seen (sender reports name it).
    ssrcs: [Option<u32>; 2],
    /// When str0m next wants the time.
    timeout: Instant,
    answered: Instant,
    /// When the session was last kept alive.
    touched: Instant,
    connected: bool,
    /// A keyframe has been written: packets before it are not sent.
    started: bool,
    /// Ended (ICE gone, DELETE, session expired); removed by the driver.
    done: bool,
}

/// Owns every peer: moves datagrams between the UDP socket and the peers,
/// the relay's packets into them, and time.
async fn drive(node: Arc<Node>, udp: Vec<UdpSocket>, mut commands: mpsc::Receiver<Command>) {
    let (media_tx, mut media) = mpsc::channel::<(u64, Vec<u8>)>(MEDIA_QUEUE);
    // Datagrams from browsers, each with the local address it came to.
    let (net_tx, mut net) = mpsc::channel::<(SocketAddr, SocketAddr, Vec<u8>)>(MEDIA_QUEUE);
    let udp: Vec<Arc<UdpSocket>> = udp.into_iter().map(Arc::new).collect();
    for socket in &udp {
        let (socket, tx, node) = (socket.clone(), net_tx.clone(), node.clone());
        let Ok(local) = socket.local_addr() else { continue };
        node.clone().tasks.spawn(async move {
            let mut b = vec![0u8; 2048];
            loop {
                let got = tokio::select! {
                    _ = node.cancel.cancelled() => return,
                    r = socket.recv_from(&mut b) => r,
                };
                match got {
                    Ok((n, source)) => {
                        if tx.try_send((local, source, b[..n].to_vec())).is_err() {
                            node.webrtc.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        debug!(pop = %node.id.name, %local, "WebRTC socket: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    let sockets = Sockets(udp);
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let mut sinks: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    // Where each browser's datagrams come from, once known.
    let mut by_source: HashMap<SocketAddr, u64> = HashMap::new();
    let mut next_key = 0u64;
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    loop {
        let wake = peers.values().map(|p| p.timeout).min().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = node.cancel.cancelled() => break,
            c = commands.recv() => match c {
                None => break,
                Some(Command::Add(peer, sink)) => {
                    if peers.len() >= MAX_PEERS {
                        // Offers answered at once may pass the check together.
                        warn!(pop = %node.id.name, "WebRTC: {MAX_PEERS} peers already; dropping a new one");
                        node.webrtc.peers.fetch_add(1, Ordering::Relaxed);
                        finish(&node, *peer);
                        continue;
                    }
                    let key = next_key;
                    next_key += 1;
                    let tx = media_tx.clone();
                    let counters = node.clone();
                    let handle = node.tasks.spawn(async move {
                        let mut b = vec![0u8; 2048];
                        while let Ok(n) = sink.recv(&mut b).await {
                            if tx.try_send((key, b[..n].to_vec())).is_err() {
                                counters.webrtc.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    sinks.insert(key, handle.abort_handle());
                    peers.insert(key, *peer);
                    node.webrtc.peers.fetch_add(1, Ordering::Relaxed);
                }
                Some(Command::Remove { id, done }) => {
                    let found = peers.values_mut().find(|p| p.id == id);
                    let _ = done.send(found.is_some());
                    if let Some(p) = found {
                        p.rtc.disconnect();
                        p.done = true;
                    }
                }
            },
            d = net.recv() => {
                let Some((local, source, data)) = d else { continue };
                let now = Instant::now();
                let key = by_source.get(&source).copied().filter(|k| peers.contains_key(k)).or_else(|| {
                    peers.iter().find(|(_, p)| receive(source, local, &data, now).is_some_and(|i| p.rtc.accepts(&i))).map(|(k, _)| *k)
                });
                let Some(key) = key else {
                    node.webrtc.unmatched.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                by_source.insert(source, key);
                let p = peers.get_mut(&key).expect("found above");
                if let Some(input) = receive(source, local, &data, now) {
                    if let Err(e) = p.rtc.handle_input(input) {
                        debug!(pop = %node.id.name, session = short_id(&p.id), "WebRTC input: {e}");
                    }
                }
                poll(&node, &sockets, p);
            }
            m = media.recv() => {
                let Some((key, packet)) = m else { continue };
                if let Some(p) = peers.get_mut(&key) {
                    write(p, &packet);
                    poll(&node, &sockets, p);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                for p in peers.values_mut().filter(|p| p.timeout <= now) {
                    if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                        debug!(pop = %node.id.name, session = short_id(&p.id), "WebRTC timeout: {e}");
                    }
                    poll(&node, &sockets, p);
                }
            }
            _ = housekeeping.tick() => {
                let now = Instant::now();
                for p in peers.values_mut().filter(|p| !p.done) {
                    if !p.connected && now.duration_since(p.answered) > CONNECT_WAIT {
                        info!(pop = %node.id.name, session = short_id(&p.id), "WebRTC peer never connected in {} s: dropped", CONNECT_WAIT.as_secs());
                        p.done = true;
                    } else if !p.rtc.is_alive() {
                        p.done = true;
                    } else if now.duration_since(p.touched) >= Duration::from_secs(1) {
                        // The browser is there while ICE consent holds.
                        p.touched = now;
                        if node.note_sessions(|s| s.touch(&p.id, now)).is_err() {
                            info!(pop = %node.id.name, session = short_id(&p.id), "WebRTC peer's session is gone (timed out)");
                            p.done = true;
                        }
                    }
                }
            }
        }
        let ended: Vec<u64> = peers.iter().filter(|(_, p)| p.done).map(|(k, _)| *k).collect();
        for key in ended {
            let p = peers.remove(&key).expect("listed above");
            if let Some(h) = sinks.remove(&key) {
                h.abort();
            }
            by_source.retain(|_, k| *k != key);
            finish(&node, p);
        }
    }
    for (_, h) in sinks {
        h.abort();
    }
    for (_, p) in peers {
        finish(&node, p);
    }
}

/// A datagram as str0m takes it (None: not STUN, DTLS, RTP or RTCP).
pub(crate) fn receive(source: SocketAddr, destination: SocketAddr, data: &[u8], now: Instant) -> Option<Input<'_>> {
    let contents = data.try_into().ok()?;
    Some(Input::Receive(now, Receive { proto: Protocol::Udp, source, destination, contents }))
}

/// Ends a peer's session and its join.
fn finish(node: &Arc<Node>, p: Peer) {
    node.webrtc.ended.fetch_add(1, Ordering::Relaxed);
    let _ = node.webrtc.peers.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    if let Ok(gone) = node.with_sessions(|s| s.teardown(&p.id)) {
        info!(pop = %node.id.name, session = short_id(&p.id), stream = %p.stream, "WebRTC session ended");
        if gone.stream.is_some() {
            node.leave(&p.stream, Requester::Local);
        }
    } else {
        // Timed out in the table already: the join is still ours.
        node.leave(&p.stream, Requester::Local);
    }
}

/// Carries out what the peer asks for until it wants the time again.
/// The WebRTC sockets, one per local address.
pub(crate) struct Sockets(pub Vec<Arc<UdpSocket>>);

impl Sockets {
    /// Sends from the socket bound to `source` (the address the browser
    /// sent to), or the only one; never waits: a full buffer drops, as UDP
    /// does.
    pub fn send(&self, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        let socket = self.0.iter().find(|s| s.local_addr().is_ok_and(|a| a == source)).or(self.0.first());
        if let Some(socket) = socket {
            let _ = socket.try_send_to(data, destination);
        }
    }
}

fn poll(node: &Arc<Node>, sockets: &Sockets, p: &mut Peer) {
    loop {
        match p.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                p.timeout = t;
                return;
            }
            Ok(Output::Transmit(t)) => sockets.send(t.source, t.destination, &t.contents),
            Ok(Output::Event(e)) => match e {
                Event::Connected => {
                    p.connected = true;
                    node.webrtc.connected.fetch_add(1, Ordering::Relaxed);
                    // PLAY now: the relay sends the cached GOP, then the
                    // live packets.
                    match node.play(&p.id) {
                        Ok(_) => {
                            info!(pop = %node.id.name, session = short_id(&p.id), stream = %p.stream, "WebRTC peer connected: playing")
                        }
                        Err(e) => {
                            warn!(pop = %node.id.name, session = short_id(&p.id), "WebRTC PLAY failed: {e}");
                            p.done = true;
                        }
                    }
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    info!(pop = %node.id.name, session = short_id(&p.id), "WebRTC peer disconnected");
                    p.done = true;
                }
                Event::KeyframeRequest(k) => {
                    node.webrtc.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    let kind = if k.kind == KeyframeRequestKind::Fir { "FIR" } else { "PLI" };
                    debug!(pop = %node.id.name, session = short_id(&p.id), "WebRTC {kind}: the stream's next keyframe answers it");
                }
                _ => {}
            },
            Err(e) => {
                debug!(pop = %node.id.name, session = short_id(&p.id), "WebRTC peer failed: {e}");
                p.done = true;
                return;
            }
        }
    }
}

/// Writes one packet of the POP's line into the peer: RTP as it came
/// (payload, marker, sequence number, RTP time), sender reports for the
/// capture times str0m's own reports carry.
fn write(p: &mut Peer, packet: &[u8]) {
    if !p.connected {
        return;
    }
    let Ok(view) = Packet::parse(packet) else { return };
    if view.kind() == Kind::Rtcp {
        if let Some(report) = parse_sender_report(packet) {
            match p.ssrcs.iter().position(|s| *s == Some(report.ssrc)) {
                Some(0) => p.video.report(report),
                Some(_) => p.audio.report(report),
                None => {}
            }
        }
        return;
    }
    let track = if view.payload_type() == media::AUDIO_PT { 1 } else { 0 };
    let Some(payload) = view.payload() else { return };
    p.ssrcs[track] = Some(view.ssrc());
    let (mid, pt, out) = match (track, p.negotiated.audio) {
        (0, _) => (p.negotiated.video, p.negotiated.video_pt, &mut p.video),
        (_, Some((mid, pt))) => (mid, pt, &mut p.audio),
        _ => return,
    };
    if track == 0 && !p.started {
        // Start on a keyframe (the cached GOP's first packet).
        if !relay::gop::starts_keyframe(payload) {
            return;
        }
        p.started = true;
    }
    if track == 1 && !p.started {
        return;
    }
    let now = Instant::now();
    let Some(seq) = out.extend(view.sequence()) else { return };
    let wallclock = out.wallclock(view.timestamp(), now, crate::net::unix_us() as f64 / 1e6);
    let mut api = p.rtc.direct_api();
    let Some(tx) = api.stream_tx_by_mid(mid, None) else { return };
    let rtp = RtpWrite::new(pt.into(), seq.into(), view.timestamp(), wallclock, payload)
        .marker(view.marker())
        .nackable(track == 0);
    tx.write_rtp(rtp);
}
