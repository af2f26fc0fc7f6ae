//! Publishing from a browser or any WHIP encoder at a server
//! (`http://SERVER:8889/NAME/whip`, WebRTC-HTTP ingestion): the offer is
//! answered by str0m (ICE-lite, H.264 and Opus received), and a publisher
//! page at `/NAME/publish` sends the browser's camera and microphone.
//!
//! A WHIP publisher is one more publisher of [`crate::publish`]: it claims
//! its name (refused if taken, resumed within the grace period), and its
//! RTP goes, rebuilt from what str0m hands over, into an RTP ingest that
//! re-packetises it onto the stream's line. The server asks the publisher
//! for a keyframe every second (PLI), as browsers otherwise send one only
//! at the start: viewers at the POPs start from the GOP caches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use media::{Codec, Ingest, RtpTrack};
use overlay_core::session::short_id;
use rand::RngCore;
use str0m::media::KeyframeRequestKind;
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::publish::{Claim, Publishing};
use crate::token::TokenError;
use crate::webrtc::machine::{self, Published, Refusal};
use crate::webrtc::{bearer, cors, offer_body, preflight, receive, refused, Conn, Sockets};

/// The publisher page, served at `/NAME/publish`.
const PUBLISHER: &str = include_str!("whip/publisher.html");
/// Most WHIP publishers at one server at once.
const MAX_PEERS: usize = 32;
/// A publisher that has not connected this long after its answer is dropped.
const CONNECT_WAIT: Duration = Duration::from_secs(15);
/// How often the publisher is asked for a keyframe.
const KEYFRAME_EVERY: Duration = Duration::from_secs(1);
/// Datagrams from publishers waiting for the driver.
const NET_QUEUE: usize = 4096;

enum Command {
    Add(Box<Peer>),
    Remove { id: String, done: oneshot::Sender<bool> },
}

#[derive(Clone)]
struct Edge {
    publishing: Arc<Publishing>,
    udp_port: u16,
    commands: mpsc::Sender<Command>,
}

/// One WHIP publisher.
struct Peer {
    id: String,
    stream: String,
    rtc: Rtc,
    published: Published,
    ingest: Option<Ingest>,
    claim: Option<Claim>,
    timeout: Instant,
    answered: Instant,
    last_keyframe_request: Instant,
    connected: bool,
    done: bool,
}

/// Serves WHIP and the publisher page on `listener`, the publishers'
/// media through `udp` (one socket per local address). Returns when the
/// node stops.
pub async fn serve(publishing: Arc<Publishing>, listener: TcpListener, udp: Vec<UdpSocket>) {
    let node = publishing.node.clone();
    let udp_port = udp.first().and_then(|u| u.local_addr().ok()).map(|a| a.port()).unwrap_or(0);
    let (commands, rx) = mpsc::channel(64);
    node.tasks.spawn(drive(publishing.clone(), udp, rx));
    let edge = Edge { publishing, udp_port, commands };
    let app = Router::new()
        .route("/{stream}/publish", get(page))
        .route("/{stream}/whip", axum::routing::post(offer).options(preflight))
        .route("/{stream}/whip/{id}", delete(end).options(preflight))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(machine::MAX_OFFER))
        .with_state(edge);
    let cancel = node.cancel.clone();
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Conn>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = served {
        warn!(server = %node.id.name, "WHIP HTTP server ended: {e}");
    }
}

async fn not_found() -> Response {
    refused(&Refusal::new(404, "not found: WHIP is at /NAME/whip, the publisher page at /NAME/publish"))
}

async fn page(Path(stream): Path<String>) -> Response {
    if let Err(why) = overlay_core::names::check_name("stream", &stream) {
        return refused(&Refusal::new(400, why));
    }
    cors(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PUBLISHER).into_response())
}

async fn end(State(edge): State<Edge>, Path((stream, id)): Path<(String, String)>) -> Response {
    let (done, found) = oneshot::channel();
    if edge.commands.send(Command::Remove { id: id.clone(), done }).await.is_err() {
        return refused(&Refusal::new(503, "the server is stopping"));
    }
    if found.await.unwrap_or(false) {
        info!(server = %edge.publishing.node.id.name, %stream, session = short_id(&id), "WHIP publisher ended by DELETE");
        cors(StatusCode::OK.into_response())
    } else {
        refused(&Refusal::new(404, format!("no WHIP session {}", overlay_core::names::shown(&id))))
    }
}

async fn offer(
    State(edge): State<Edge>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let server = edge.publishing.node.id.name.clone();
    match answer(&edge, conn, &stream, &headers, &body).await {
        Ok((id, sdp)) => {
            let location = format!("/{stream}/whip/{id}");
            let mut r = cors((StatusCode::CREATED, [(header::CONTENT_TYPE, "application/sdp")], sdp).into_response());
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(r) => {
            edge.publishing.counters.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            info!(%server, peer = %conn.peer, stream = %overlay_core::names::shown(&stream), "WHIP refused: {} {}", r.status, r.reason);
            refused(&r)
        }
    }
}

async fn answer(
    edge: &Edge,
    conn: Conn,
    stream: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, String), Refusal> {
    let publishing = &edge.publishing;
    let offer = offer_body(stream, headers, body)?;
    let token = bearer(headers);
    publishing.authorize(stream, token).map_err(|e| {
        let status = if matches!(e, TokenError::NotGranted { .. }) { 403 } else { 401 };
        Refusal::new(status, e.to_string())
    })?;
    machine::check_offer(offer)?;
    publishing.available(stream).map_err(|why| Refusal::new(409, why))?;
    let candidate = SocketAddr::new(conn.local.ip(), edge.udp_port);
    let (rtc, sdp, published) = machine::publish_answer(offer, candidate, Instant::now())?;
    let claim = publishing.claim(stream, conn.peer).map_err(|why| Refusal::new(409, why))?;
    let mut tracks = vec![RtpTrack {
        codec: Codec::H264,
        payload_type: published.video.1,
        clock_rate: media::VIDEO_CLOCK_RATE,
        channels: None,
        fmtp: vec![("packetization-mode".into(), "1".into())],
    }];
    if let Some((_, pt)) = published.audio {
        tracks.push(RtpTrack {
            codec: Codec::Opus,
            payload_type: pt,
            clock_rate: media::AUDIO_CLOCK_RATE,
            channels: Some(2),
            fmtp: Vec::new(),
        });
    }
    let ingest = Ingest::rtp(stream, &tracks, claim.sink())
        .map_err(|e| Refusal::new(500, format!("the ingest did not start: {e}")))?;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let now = Instant::now();
    let peer = Peer {
        id: id.clone(),
        stream: stream.to_string(),
        rtc,
        published,
        ingest: Some(ingest),
        claim: Some(claim),
        timeout: now,
        answered: now,
        last_keyframe_request: now,
        connected: false,
        done: false,
    };
    if edge.commands.send(Command::Add(Box::new(peer))).await.is_err() {
        return Err(Refusal::new(503, "the server is stopping"));
    }
    info!(server = %publishing.node.id.name, peer = %conn.peer, %stream, session = short_id(&id), "WHIP offer answered");
    Ok((id, sdp))
}

/// Owns every publisher peer: datagrams in and out, time, and their media
/// into the ingests.
async fn drive(publishing: Arc<Publishing>, udp: Vec<UdpSocket>, mut commands: mpsc::Receiver<Command>) {
    let node = publishing.node.clone();
    let (net_tx, mut net) = mpsc::channel::<(SocketAddr, SocketAddr, Vec<u8>)>(NET_QUEUE);
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
                        let _ = tx.try_send((local, source, b[..n].to_vec()));
                    }
                    Err(e) => {
                        debug!(server = %node.id.name, %local, "WHIP socket: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    let sockets = Sockets(udp);
    let mut peers: HashMap<u64, Peer> = HashMap::new();
    let mut by_source: HashMap<SocketAddr, u64> = HashMap::new();
    let mut next_key = 0u64;
    let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
    loop {
        let wake = peers.values().map(|p| p.timeout).min().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            _ = node.cancel.cancelled() => break,
            c = commands.recv() => match c {
                None => break,
                Some(Command::Add(peer)) => {
                    if peers.len() >= MAX_PEERS {
                        warn!(server = %node.id.name, "WHIP: {MAX_PEERS} publishers already; dropping a new one");
                        finish(&node, *peer);
                        continue;
                    }
                    peers.insert(next_key, *peer);
                    next_key += 1;
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
                    publishing.counters.garbage.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                };
                by_source.insert(source, key);
                let p = peers.get_mut(&key).expect("found above");
                if let Some(input) = receive(source, local, &data, now) {
                    if let Err(e) = p.rtc.handle_input(input) {
                        debug!(server = %node.id.name, session = short_id(&p.id), "WHIP input: {e}");
                    }
                }
                poll(&node, &sockets, p);
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                for p in peers.values_mut().filter(|p| p.timeout <= now) {
                    if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                        debug!(server = %node.id.name, session = short_id(&p.id), "WHIP timeout: {e}");
                    }
                    poll(&node, &sockets, p);
                }
            }
            _ = housekeeping.tick() => {
                let now = Instant::now();
                for p in peers.values_mut().filter(|p| !p.done) {
                    if !p.connected && now.duration_since(p.answered) > CONNECT_WAIT {
                        info!(server = %node.id.name, session = short_id(&p.id), "WHIP publisher never connected in {} s: dropped", CONNECT_WAIT.as_secs());
                        p.done = true;
                    } else if !p.rtc.is_alive() || p.claim.as_ref().is_some_and(Claim::replaced) {
                        p.done = true;
                    } else if p.connected && now.duration_since(p.last_keyframe_request) >= KEYFRAME_EVERY {
                        p.last_keyframe_request = now;
                        if let Some(rx) = p.rtc.direct_api().stream_rx_by_mid(p.published.video.0, None) {
                            rx.request_keyframe(KeyframeRequestKind::Pli);
                        }
                        poll(&node, &sockets, p);
                    }
                }
            }
        }
        let ended: Vec<u64> = peers.iter().filter(|(_, p)| p.done).map(|(k, _)| *k).collect();
        for key in ended {
            let p = peers.remove(&key).expect("listed above");
            by_source.retain(|_, k| *k != key);
            finish(&node, p);
        }
    }
    for (_, p) in peers {
        finish(&node, p);
    }
}

/// Ends a publisher: its ingest stops, its claim goes (the grace period
/// starts).
fn finish(node: &Arc<crate::node::Node>, mut p: Peer) {
    info!(server = %node.id.name, session = short_id(&p.id), stream = %p.stream, "WHIP publisher ended");
    if let Some(ingest) = p.ingest.take() {
        node.tasks.spawn_blocking(move || ingest.stop());
    }
    drop(p.claim.take());
}

fn poll(node: &Arc<crate::node::Node>, sockets: &Sockets, p: &mut Peer) {
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
                    info!(server = %node.id.name, session = short_id(&p.id), stream = %p.stream, "WHIP publisher connected");
                }
                Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                    info!(server = %node.id.name, session = short_id(&p.id), "WHIP publisher disconnected");
                    p.done = true;
                }
                Event::RtpPacket(packet) => {
                    let pt = *packet.header.payload_type;
                    let input = if pt == p.published.video.1 {
                        0
                    } else if p.published.audio.is_some_and(|(_, a)| a == pt) {
                        1
                    } else {
                        continue;
                    };
                    let bytes = machine::rtp_bytes(
                        pt,
                        packet.header.marker,
                        packet.header.sequence_number,
                        packet.header.timestamp,
                        *packet.header.ssrc,
                        &packet.payload,
                    );
                    if let Some(claim) = &p.claim {
                        claim.count_in(bytes.len());
                    }
                    if let Some(ingest) = &p.ingest {
                        if !ingest.push(input, &bytes) {
                            let why = ingest.error().unwrap_or_else(|| "the ingest stopped".into());
                            warn!(server = %node.id.name, session = short_id(&p.id), "WHIP publisher dropped: {why}");
                            p.done = true;
                        }
                    }
                }
                _ => {}
            },
            Err(e) => {
                debug!(server = %node.id.name, session = short_id(&p.id), "WHIP peer failed: {e}");
                p.done = true;
                return;
            }
        }
    }
}
