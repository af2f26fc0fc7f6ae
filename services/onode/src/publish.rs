//! Live publishing at a server: an encoder (OBS, ffmpeg, a camera) pushes
//! a stream over RTSP (`rtsp://SERVER:8554/NAME`, ANNOUNCE + SETUP in
//! record mode + RECORD, RTP interleaved in the connection) or SRT
//! (`srt://SERVER:8890?streamid=publish:NAME`, MPEG-TS), and the name
//! becomes a stream of the overlay that this server offers and roots.
//!
//! The media goes through a GStreamer ingest ([`media::Ingest`]: H.264
//! re-packetised, AAC to Opus) into the relay, which forwards it along the
//! stream's tree as it does a file's. The ingest runs as long as the
//! publisher sends, watched or not.
//!
//! A publisher that goes away leaves its name held for the grace period:
//! one that comes back within it goes on where the last one stopped, on
//! the same RTP line (SSRC, sequence numbers and timestamps continue, see
//! [`relay::Continuity`]), so viewers keep their sessions and notice a
//! pause. After the grace period each track gets an RTCP BYE (RTSP players
//! end on it) and the server withdraws the stream: its downstreams are told
//! this root gave up and look for another server publishing the same name.

pub(crate) mod machine;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use media::Ingest;
use overlay_core::rtp::{Kind, Packet};
use relay::Continuity;
use rtsp_types::{headers, Message, ParseError, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use crate::node::Node;
use crate::rtsp::machine::{encode, refusal, reply, too_many_headers, Refusal, MAX_REQUEST};
use crate::token::{Action, TokenError};
use machine::{Announced, Command, RateBound};

/// Most RTSP connections open at once on a server's publish port.
const MAX_CONNECTIONS: usize = 64;
/// A publisher that sends nothing for this long after RECORD is gone.
const PUBLISHER_SILENCE: Duration = Duration::from_secs(10);
/// A connection that has not started publishing within this long is closed.
const SETUP_TIME: Duration = Duration::from_secs(30);

/// How a server takes publishers.
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// How long a name stays held (and viewers wait) after its publisher
    /// went away.
    pub grace: Duration,
    /// Most names published at once.
    pub max_publishers: usize,
    /// Most kbit/s one publisher may send (0: no bound).
    pub max_kbit: u32,
    /// A new publisher of a name in use replaces the old one instead of
    /// being refused.
    pub replace: bool,
}

/// What the publish edges took and refused.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub resumed: AtomicU64,
    pub refused: AtomicU64,
    pub ended: AtomicU64,
    /// Malformed RTSP requests and unreadable input.
    pub garbage: AtomicU64,
    pub over_rate: AtomicU64,
    /// Bytes publishers sent (RTP, MPEG-TS), as taken in.
    pub bytes_in: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "accepted": get(&self.accepted), "resumed": get(&self.resumed), "refused": get(&self.refused),
            "ended": get(&self.ended), "garbage": get(&self.garbage), "over_rate": get(&self.over_rate),
            "bytes_in": get(&self.bytes_in),
        })
    }
}

/// A published name: who holds it, and its RTP line.
struct Entry {
    /// Which publisher holds it (each new one counts one up).
    generation: u64,
    live: bool,
    peer: SocketAddr,
    lines: Arc<Mutex<Lines>>,
}

/// The outgoing RTP line of a published name's tracks (video, audio).
struct Lines {
    generation: u64,
    tracks: [Continuity; 2],
}

/// The server's publishers.
pub struct Publishing {
    pub(crate) node: Arc<Node>,
    settings: PublishSettings,
    entries: Mutex<HashMap<String, Entry>>,
    pub counters: Counters,
}

/// A publisher's hold on a name; dropping it starts the grace period.
pub struct Claim {
    publishing: Arc<Publishing>,
    stream: String,
    generation: u64,
    lines: Arc<Mutex<Lines>>,
}

impl Claim {
    /// Where the ingest's packets go: onto the name's line, into the relay.
    pub(crate) fn sink(&self) -> impl Fn(&[u8]) + Send + Sync + 'static {
        let lines = self.lines.clone();
        let relay = self.publishing.node.relay.clone();
        let generation = self.generation;
        let ssrcs = media::stream_ssrcs(&self.stream);
        move |bytes: &[u8]| {
            let Ok(p) = Packet::parse(bytes) else { return };
            let Some(track) = ssrcs.iter().position(|&s| s == p.ssrc()) else { return };
            let mut out = bytes.to_vec();
            // Each publisher is a source of its own on the line: its
            // numbering starts anew and must not be taken for the last one's.
            let tag = source_tag(ssrcs[track], generation);
            match p.kind() {
                Kind::Rtp => out[8..12].copy_from_slice(&tag.to_be_bytes()),
                Kind::Rtcp => out[4..8].copy_from_slice(&tag.to_be_bytes()),
            }
            let mut lines = crate::node::lock_unpoisoned(&lines);
            if lines.generation != generation || !lines.tracks[track].rewrite(&mut out) {
                return;
            }
            drop(lines);
            relay.inject(&out);
        }
    }

    /// Counts bytes this publisher sent.
    pub(crate) fn count_in(&self, bytes: usize) {
        self.publishing.counters.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Whether a newer publisher took the name over.
    pub(crate) fn replaced(&self) -> bool {
        crate::node::lock_unpoisoned(&self.lines).generation != self.generation
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.publishing.clone().end(&self.stream, self.generation);
    }
}

/// The SSRC a publisher's packets carry on their way onto the line: the
/// stream's own for the first, another for each later one.
fn source_tag(ssrc: u32, generation: u64) -> u32 {
    if generation == 0 {
        return ssrc;
    }
    let tag = ssrc ^ (generation as u32).wrapping_mul(0x9e37_79b9);
    if tag == ssrc || tag == 0 {
        ssrc ^ 0x5555_5555
    } else {
        tag
    }
}

/// Why a BYE says the stream left.
const BYE_REASON: &[u8] = b"stream ended";

/// An RTCP BYE for `ssrc`, with a reason: 24 bytes (ffmpeg ignores
/// anything shorter than an RTP header, so a bare 8-byte BYE is lost on it).
fn bye(ssrc: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&[0x81, 203, 0, 5]);
    b[4..8].copy_from_slice(&ssrc.to_be_bytes());
    b[8] = BYE_REASON.len() as u8;
    b[9..9 + BYE_REASON.len()].copy_from_slice(BYE_REASON);
    b
}

impl Publishing {
    pub fn new(node: Arc<Node>, settings: PublishSettings) -> Arc<Publishing> {
        Arc::new(Publishing { node, settings, entries: Mutex::new(HashMap::new()), counters: Counters::default() })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        crate::node::lock_unpoisoned(&self.entries)
    }

    /// Checks a publisher's token when the server requires one.
    pub(crate) fn authorize(&self, stream: &str, token: Option<&str>) -> Result<(), TokenError> {
        let Some(verifier) = &self.node.settings.tokens else { return Ok(()) };
        verifier.check(token, Action::Publish, stream, crate::net::unix_us() / 1_000_000).map(|_| ())
    }

    /// Whether `stream` may be published from `peer` now; the reason if not.
    pub(crate) fn available(&self, stream: &str) -> Result<(), String> {
        if self.node.catalogue.contains_key(stream) {
            return Err(format!("{stream:?} is a stream of this server's own (a file or the test stream)"));
        }
        let entries = self.entries();
        match entries.get(stream) {
            Some(e) if e.live && !self.settings.replace => {
                Err(format!("{stream:?} is already published here (from {})", e.peer.ip()))
            }
            Some(_) => Ok(()),
            None if entries.len() >= self.settings.max_publishers => {
                Err(format!("this server takes {} publishers at most", self.settings.max_publishers))
            }
            None => Ok(()),
        }
    }

    /// Takes `stream` for a publisher at `peer`: a new name, one in its
    /// grace period (resumed on its line), or, with replacement allowed, a
    /// live one (the old publisher is cut off).
    pub(crate) fn claim(self: &Arc<Self>, stream: &str, peer: SocketAddr) -> Result<Claim, String> {
        self.available(stream)?;
        let mut entries = self.entries();
        let (generation, lines, resumed) = match entries.get_mut(stream) {
            Some(e) => {
                e.generation += 1;
                e.live = true;
                e.peer = peer;
                crate::node::lock_unpoisoned(&e.lines).generation = e.generation;
                (e.generation, e.lines.clone(), true)
            }
            None => {
                if !self.node.offer_published(stream) {
                    return Err(format!("{stream:?} is a stream of this server's own"));
                }
                let lines = Arc::new(Mutex::new(Lines {
                    generation: 0,
                    tracks: [Continuity::new(media::VIDEO_CLOCK_RATE), Continuity::new(media::AUDIO_CLOCK_RATE)],
                }));
                entries.insert(stream.to_string(), Entry { generation: 0, live: true, peer, lines: lines.clone() });
                (0, lines, false)
            }
        };
        drop(entries);
        if resumed {
            self.counters.resumed.fetch_add(1, Ordering::Relaxed);
            info!(server = %self.node.id.name, stream, %peer, "publisher back: the stream goes on");
        } else {
            self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            info!(server = %self.node.id.name, stream, %peer, "publishing: the server offers the stream");
        }
        Ok(Claim { publishing: self.clone(), stream: stream.to_string(), generation, lines })
    }

    /// Publisher `generation` of `stream` went away: unless another took
    /// over, the grace period starts.
    fn end(self: Arc<Self>, stream: &str, generation: u64) {
        {
            let mut entries = self.entries();
            let Some(e) = entries.get_mut(stream) else { return };
            if e.generation != generation {
                return;
            }
            e.live = false;
        }
        info!(server = %self.node.id.name, stream, grace_s = self.settings.grace.as_secs_f64(), "publisher gone: viewers wait for its return");
        let me = self.clone();
        let stream = stream.to_string();
        let node = self.node.clone();
        node.tasks.spawn(async move {
            tokio::select! {
                _ = me.node.cancel.cancelled() => return,
                _ = tokio::time::sleep(me.settings.grace) => {}
            }
            let lines = {
                let mut entries = me.entries();
                match entries.get(&stream) {
                    Some(e) if e.generation == generation && !e.live => entries.remove(&stream).map(|e| e.lines),
                    _ => None,
                }
            };
            let Some(lines) = lines else { return };
            me.counters.ended.fetch_add(1, Ordering::Relaxed);
            if me.node.offered_elsewhere(&stream) {
                // Another server publishes the same name: the tree moves
                // there, and viewers go on.
                info!(server = %me.node.id.name, stream, "publisher did not come back: another server offers the stream");
            } else {
                let byes: Vec<[u8; 24]> =
                    crate::node::lock_unpoisoned(&lines).tracks.iter().filter_map(|t| t.ssrc()).map(bye).collect();
                for b in &byes {
                    me.node.relay.inject(b);
                }
                info!(server = %me.node.id.name, stream, "publisher did not come back: stream ended (RTCP BYE sent)");
            }
            me.node.withdraw_published(&stream);
        });
    }

    pub fn json(&self) -> serde_json::Value {
        let entries = self.entries();
        let streams: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    serde_json::json!({"live": e.live, "publisher": e.peer.to_string(), "generation": e.generation}),
                )
            })
            .collect();
        serde_json::json!({"streams": streams, "counters": self.counters.json()})
    }
}

/// Serves RTSP publishing on `listener` until the node stops.
pub async fn serve_rtsp(publishing: Arc<Publishing>, listener: TcpListener) {
    let node = publishing.node.clone();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = node.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(server = %node.id.name, "RTSP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(server = %node.id.name, %peer, "RTSP publish connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let publishing = publishing.clone();
        node.tasks.spawn(async move {
            rtsp_connection(publishing, stream, peer).await;
            drop(slot);
        });
    }
}

/// One publisher's RTSP connection.
struct RtspPublisher {
    publishing: Arc<Publishing>,
    peer: SocketAddr,
    session: String,
    announced: Option<(String, Vec<Announced>)>,
    /// RTP channel of each set-up track (index into the announced tracks).
    channels: Vec<(u8, usize)>,
    claim: Option<Claim>,
    ingest: Option<Ingest>,
    rate: RateBound,
    started: Instant,
}

async fn rtsp_connection(publishing: Arc<Publishing>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let node = publishing.node.clone();
    let mut p = RtspPublisher {
        rate: RateBound::new(publishing.settings.max_kbit),
        publishing,
        peer,
        session: format!("{:016x}", rand::random::<u64>()),
        announced: None,
        channels: Vec::new(),
        claim: None,
        ingest: None,
        started: Instant::now(),
    };
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let why = 'conn: loop {
        loop {
            if buf.first() != Some(&b'$') {
                if let Some(r) = too_many_headers(&buf) {
                    let _ = stream.write_all(&encode(&refusal("0", &r))).await;
                    p.publishing.counters.garbage.fetch_add(1, Ordering::Relaxed);
                    break 'conn r.reason;
                }
            }
            match Message::<Vec<u8>>::parse(&buf) {
                Ok((msg, used)) => {
                    let outcome = match msg {
                        Message::Request(req) => {
                            let resp = p.handle(req).await;
                            let ok = resp.status() == StatusCode::Ok;
                            let written = stream.write_all(&encode(&resp)).await.is_ok();
                            (written && (ok || p.ingest.is_none())).then_some(()).ok_or("the publish was refused")
                        }
                        Message::Data(data) => p.media(data.channel_id(), data.as_slice()),
                        Message::Response(_) => Ok(()),
                    };
                    buf.drain(..used);
                    if let Err(why) = outcome {
                        break 'conn why.to_string();
                    }
                }
                Err(ParseError::Incomplete(_)) => break,
                Err(ParseError::Error) => {
                    p.publishing.counters.garbage.fetch_add(1, Ordering::Relaxed);
                    let bad = Refusal::new(StatusCode::BadRequest, "malformed RTSP request");
                    let _ = stream.write_all(&encode(&refusal("0", &bad))).await;
                    break 'conn "malformed request".to_string();
                }
            }
        }
        if buf.len() > MAX_REQUEST {
            p.publishing.counters.garbage.fetch_add(1, Ordering::Relaxed);
            let big = Refusal::new(StatusCode::RequestMessageBodyTooLarge, format!("request over {MAX_REQUEST} bytes"));
            let _ = stream.write_all(&encode(&refusal("0", &big))).await;
            break format!("request over {MAX_REQUEST} bytes");
        }
        if let Some(claim) = &p.claim {
            if claim.replaced() {
                break "another publisher took the name over".into();
            }
        }
        let wait = if p.ingest.is_some() { PUBLISHER_SILENCE } else { SETUP_TIME.saturating_sub(p.started.elapsed()) };
        let read = tokio::select! {
            _ = node.cancel.cancelled() => break "the server stops".into(),
            r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => r,
        };
        match read {
            // Bytes left unparsed at the close are a message cut short
            // (an interleaved frame longer than what came, say): garbage.
            Ok(Ok(0)) if !buf.is_empty() => {
                p.publishing.counters.garbage.fetch_add(1, Ordering::Relaxed);
                break format!("the peer closed the connection {} bytes into an unfinished message", buf.len());
            }
            Ok(Ok(0)) => break "the publisher closed the connection".into(),
            Ok(Err(e)) => break format!("reading: {e}"),
            Ok(Ok(_)) => {}
            Err(_) if p.ingest.is_some() => break format!("nothing received for {} s", PUBLISHER_SILENCE.as_secs()),
            Err(_) => break format!("no RECORD within {} s", SETUP_TIME.as_secs()),
        }
    };
    let stream_name = p.announced.as_ref().map(|(s, _)| s.clone()).unwrap_or_default();
    if p.ingest.is_some() {
        info!(server = %node.id.name, %peer, stream = stream_name, "RTSP publisher ended: {why}");
    } else {
        debug!(server = %node.id.name, %peer, "RTSP connection closed: {why}");
    }
    if let Some(ingest) = p.ingest.take() {
        node.tasks.spawn_blocking(move || ingest.stop());
    }
}

impl RtspPublisher {
    async fn handle(&mut self, req: rtsp_types::Request<Vec<u8>>) -> Response<Vec<u8>> {
        let cseq = req.header(&headers::CSEQ).map(|v| v.as_str().trim().chars().take(10).collect::<String>());
        let server = self.publishing.node.id.name.clone();
        let parsed = match machine::parse(&req) {
            Ok(p) => p,
            Err(r) => {
                self.publishing.counters.refused.fetch_add(1, Ordering::Relaxed);
                info!(%server, peer = %self.peer, "RTSP publish request refused: {} {}", u16::from(r.status), r.reason);
                return refusal(cseq.as_deref().unwrap_or("0"), &r);
            }
        };
        match self.carry_out(parsed.command, parsed.session.as_deref(), parsed.token.as_deref(), &parsed.cseq) {
            Ok(resp) => resp,
            Err(r) => {
                self.publishing.counters.refused.fetch_add(1, Ordering::Relaxed);
                info!(%server, peer = %self.peer, "RTSP publish: {} {}", u16::from(r.status), r.reason);
                refusal(&parsed.cseq, &r)
            }
        }
    }

    fn carry_out(
        &mut self,
        command: Command,
        session: Option<&str>,
        token: Option<&str>,
        cseq: &str,
    ) -> Result<Response<Vec<u8>>, Refusal> {
        if session.is_some_and(|s| s != self.session) {
            return Err(Refusal::new(StatusCode::SessionNotFound, "no such session on this connection"));
        }
        let ok = || reply(cseq, StatusCode::Ok, None);
        match command {
            Command::Options => Ok(ok().header(headers::PUBLIC, machine::PUBLIC).build(Vec::new())),
            Command::Announce { stream, tracks } => {
                if self.ingest.is_some() {
                    return Err(Refusal::new(StatusCode::MethodNotValidInThisState, "already publishing"));
                }
                self.publishing.authorize(&stream, token).map_err(token_refusal)?;
                self.publishing.available(&stream).map_err(|why| Refusal::new(StatusCode::Forbidden, why))?;
                info!(server = %self.publishing.node.id.name, peer = %self.peer, %stream, codecs = ?tracks.iter().map(|t| t.track.codec).collect::<Vec<_>>(), "RTSP publisher announced");
                self.announced = Some((stream, tracks));
                self.channels.clear();
                Ok(ok().build(Vec::new()))
            }
            Command::Setup { stream, control, rtp_channel, rtcp_channel } => {
                let Some((announced, tracks)) = &self.announced else {
                    return Err(Refusal::new(StatusCode::MethodNotValidInThisState, "SETUP before ANNOUNCE"));
                };
                if *announced != stream {
                    return Err(Refusal::new(StatusCode::NotFound, "SETUP names another stream than ANNOUNCE"));
                }
                let track = machine::track_for(tracks, &control).ok_or_else(|| {
                    Refusal::new(
                        StatusCode::NotFound,
                        format!("no announced track has control {}", overlay_core::names::shown(&control)),
                    )
                })?;
                if self.channels.iter().any(|&(c, t)| c == rtp_channel || t == track) {
                    return Err(Refusal::new(StatusCode::BadRequest, "track or channel set up twice"));
                }
                self.channels.push((rtp_channel, track));
                Ok(ok()
                    .header(
                        headers::TRANSPORT,
                        format!("RTP/AVP/TCP;unicast;interleaved={rtp_channel}-{rtcp_channel};mode=record"),
                    )
                    .header(headers::SESSION, format!("{};timeout=60", self.session))
                    .build(Vec::new()))
            }
            Command::Record => {
                let Some((stream, tracks)) = &self.announced else {
                    return Err(Refusal::new(StatusCode::MethodNotValidInThisState, "RECORD before ANNOUNCE"));
                };
                if self.channels.is_empty() {
                    return Err(Refusal::new(StatusCode::MethodNotValidInThisState, "RECORD before SETUP"));
                }
                if self.ingest.is_some() {
                    return Ok(ok().header(headers::SESSION, self.session.clone()).build(Vec::new()));
                }
                let claim =
                    self.publishing.claim(stream, self.peer).map_err(|why| Refusal::new(StatusCode::Forbidden, why))?;
                let set_up: Vec<media::RtpTrack> =
                    self.channels.iter().map(|&(_, t)| tracks[t].track.clone()).collect();
                let ingest = Ingest::rtp(stream, &set_up, claim.sink()).map_err(|e| {
                    warn!(server = %self.publishing.node.id.name, %stream, "ingest failed to start: {e}");
                    Refusal::new(StatusCode::InternalServerError, format!("the ingest did not start: {e}"))
                })?;
                self.claim = Some(claim);
                self.ingest = Some(ingest);
                Ok(ok().header(headers::SESSION, self.session.clone()).build(Vec::new()))
            }
            Command::Teardown => {
                if let Some(ingest) = self.ingest.take() {
                    info!(server = %self.publishing.node.id.name, peer = %self.peer, "RTSP publisher ended: TEARDOWN");
                    self.publishing.node.tasks.spawn_blocking(move || ingest.stop());
                }
                self.claim = None;
                Ok(ok().build(Vec::new()))
            }
            Command::KeepAlive => Ok(ok().build(Vec::new())),
        }
    }

    /// An interleaved frame: a track's RTP into the ingest; RTCP and
    /// unknown channels are dropped.
    fn media(&mut self, channel: u8, data: &[u8]) -> Result<(), &'static str> {
        let Some(ingest) = &self.ingest else { return Ok(()) };
        let Some(input) = self.channels.iter().position(|&(c, _)| c == channel) else { return Ok(()) };
        self.publishing.counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        if !self.rate.take(data.len(), self.started.elapsed().as_millis() as u64) {
            self.publishing.counters.over_rate.fetch_add(1, Ordering::Relaxed);
            warn!(server = %self.publishing.node.id.name, peer = %self.peer, "publisher over --max-publish-kbit {}: dropped", self.publishing.settings.max_kbit);
            return Err("over the bitrate bound");
        }
        if !ingest.push(input, data) {
            let why = ingest.error().unwrap_or_else(|| "the ingest stopped".into());
            warn!(server = %self.publishing.node.id.name, peer = %self.peer, "publisher dropped: {why}");
            return Err("the ingest failed");
        }
        Ok(())
    }
}

fn token_refusal(e: TokenError) -> Refusal {
    let status =
        if matches!(e, TokenError::NotGranted { .. }) { StatusCode::Forbidden } else { StatusCode::Unauthorized };
    Refusal::new(status, e.to_string())
}

/// Serves SRT publishing on `addr` until the node stops; the listener is
/// bound again if it ever fails.
pub async fn serve_srt(publishing: Arc<Publishing>, addr: SocketAddr) {
    let node = publishing.node.clone();
    loop {
        let bound = srt_tokio::SrtListener::builder().latency(Duration::from_millis(120)).bind(addr).await;
        let (listener, mut incoming) = match bound {
            Ok(l) => l,
            Err(e) => {
                warn!(server = %node.id.name, %addr, "SRT: cannot listen: {e}; trying again in 1 s");
                tokio::select! {
                    _ = node.cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        info!(server = %node.id.name, "SRT: publishers push to srt://{addr}?streamid=publish:NAME");
        loop {
            let request = tokio::select! {
                _ = node.cancel.cancelled() => return,
                r = incoming.incoming().next() => r,
            };
            let Some(request) = request else { break };
            let publishing = publishing.clone();
            node.tasks.spawn(srt_publisher(publishing, request));
        }
        drop(listener);
        warn!(server = %node.id.name, %addr, "SRT listener stopped; binding it again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn srt_publisher(publishing: Arc<Publishing>, request: srt_tokio::ConnectionRequest) {
    use srt_tokio::access::{RejectReason, ServerRejectReason};
    let node = publishing.node.clone();
    let peer = request.remote();
    let id = request.stream_id().map(|s| s.to_string()).unwrap_or_default();
    let decided = machine::srt_stream_id(&id).and_then(|stream| {
        let token = id.strip_prefix("publish:").and_then(|rest| rest.splitn(3, ':').nth(2)).map(str::to_string);
        publishing.authorize(&stream, token.as_deref()).map_err(|e| e.to_string())?;
        publishing.claim(&stream, peer).map(|claim| (stream, claim))
    });
    let (stream, claim) = match decided {
        Ok(d) => d,
        Err(why) => {
            publishing.counters.refused.fetch_add(1, Ordering::Relaxed);
            info!(server = %node.id.name, %peer, "SRT publisher refused: {why}");
            let _ = request.reject(RejectReason::Server(ServerRejectReason::Forbidden)).await;
            return;
        }
    };
    let mut socket = match request.accept(None).await {
        Ok(s) => s,
        Err(e) => {
            debug!(server = %node.id.name, %peer, "SRT accept failed: {e}");
            return;
        }
    };
    let ingest = match Ingest::mpegts(&stream, claim.sink()) {
        Ok(i) => i,
        Err(e) => {
            warn!(server = %node.id.name, %stream, "ingest failed to start: {e}");
            return;
        }
    };
    info!(server = %node.id.name, %peer, %stream, "SRT publisher connected");
    let started = Instant::now();
    let mut rate = RateBound::new(publishing.settings.max_kbit);
    let why = loop {
        let next = tokio::select! {
            _ = node.cancel.cancelled() => break "the server stops".to_string(),
            n = tokio::time::timeout(PUBLISHER_SILENCE, socket.next()) => n,
        };
        let data = match next {
            Ok(Some(Ok((_, data)))) => data,
            Ok(Some(Err(e))) => break format!("receiving: {e}"),
            Ok(None) => break "the publisher closed the connection".into(),
            Err(_) => break format!("nothing received for {} s", PUBLISHER_SILENCE.as_secs()),
        };
        publishing.counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        if claim.replaced() {
            break "another publisher took the name over".into();
        }
        if !rate.take(data.len(), started.elapsed().as_millis() as u64) {
            publishing.counters.over_rate.fetch_add(1, Ordering::Relaxed);
            break format!("over --max-publish-kbit {}", publishing.settings.max_kbit);
        }
        if !ingest.push(0, &data) {
            break ingest.error().unwrap_or_else(|| "the ingest stopped".into());
        }
    };
    info!(server = %node.id.name, %peer, %stream, "SRT publisher ended: {why}");
    drop(socket);
    node.tasks.spawn_blocking(move || ingest.stop());
    drop(claim);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_publisher_is_a_source_of_its_own() {
        let ssrc = 0x1234_5678;
        assert_eq!(source_tag(ssrc, 0), ssrc, "the first keeps the stream's SSRC");
        let tags: std::collections::BTreeSet<u32> = (0..100).map(|g| source_tag(ssrc, g)).collect();
        assert_eq!(tags.len(), 100);
        assert!(!tags.contains(&0));
    }

    #[test]
    fn a_bye_is_rtcp_for_the_ssrc() {
        let b = bye(0xdead_beef);
        let p = Packet::parse(&b).unwrap();
        assert_eq!((p.kind(), p.ssrc()), (Kind::Rtcp, 0xdead_beef));
        // The length field counts 32-bit words after the first.
        assert_eq!((usize::from(u16::from_be_bytes([b[2], b[3]])) + 1) * 4, b.len());
        assert_eq!(&b[9..9 + usize::from(b[8])], b"stream ended");
    }
}
