//! RTSP at a POP (`rtsp://POP:8554/STREAM`): any player watches any stream
//! of the overlay. The requests are parsed and answered by [`machine`];
//! this driver owns the TCP connections and carries the commands out on
//! the node: DESCRIBE joins the stream's tree as our own client's SETUP
//! does, SETUP opens a session in the POP's session table (the same limits
//! and timeout), PLAY adds the player's ports to the POP's fan-out and
//! starts it with the cached GOP. The media path stays the relay's: an
//! RTSP viewer is one more destination, RTP to its RTP port and RTCP
//! (the servers' sender reports) to its RTCP port.
//!
//! Players' RTCP (receiver reports) comes to the port after the data
//! port (the `server_port` pair of the Transport reply) or, over TCP, on a
//! track's RTCP channel: it is read here for the session's reception
//! figures, keeps the session alive, and never goes into the overlay.
//!
//! A connection's sessions and joins end with it.

pub(crate) mod machine;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_core::session::{short_id, SessionError, TrackDest};
use overlay_core::tree::{NakReason, Requester};
use rand::RngCore;
use rtsp_types::{headers, Message, ParseError, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::node::Node;
use crate::token::{Action, TokenError};
use machine::{encode, refusal, reply, Command, Parsed, Refusal, MAX_REQUEST};

/// Most RTSP connections open at once at one POP.
const MAX_CONNECTIONS: usize = 512;
/// Most streams one connection may DESCRIBE.
const MAX_DESCRIBED: usize = 4;
/// How long DESCRIBE waits for a new stream's first keyframe (its SDP
/// needs the parameter sets).
const KEYFRAME_WAIT: Duration = Duration::from_secs(4);
/// A TCP player whose connection takes no data for this long is dropped.
const SLOW_PLAYER: Duration = Duration::from_secs(2);
/// Interleaved packets waiting for a TCP player go out together, up to
/// about this many bytes in one write.
const WRITE_BATCH: usize = 32 * 1024;

/// The next datagram on the connection's loopback socket; never, without one.
async fn recv_from_sink(sink: Option<&tokio::net::UdpSocket>, buf: &mut [u8]) -> std::io::Result<usize> {
    match sink {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// What came in as players' RTCP.
#[derive(Debug, Default)]
pub struct RtcpCounters {
    /// Report blocks taken in for a session's track.
    pub blocks: AtomicU64,
    /// RTCP from an address and port no session's track sends from.
    pub unmatched: AtomicU64,
    /// Datagrams (or interleaved frames) that are not RTCP.
    pub garbage: AtomicU64,
}

impl RtcpCounters {
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "report_blocks": get(&self.blocks), "unmatched": get(&self.unmatched), "not_rtcp": get(&self.garbage),
        })
    }
}

/// Takes a player's RTCP for track `track` of session `id` (or, with
/// `None`, the session whose track sends from `from`).
fn take_rtcp(node: &Node, from: SocketAddr, at: Option<(&str, usize)>, data: &[u8]) {
    let counters = &node.rtcp_intake;
    let Some(blocks) = machine::report_blocks(data) else {
        counters.garbage.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let now = Instant::now();
    let taken = node.note_sessions(|s| {
        let (id, track) = match at {
            Some((id, track)) => (id.to_string(), track),
            None => s.track_by_rtcp(from)?,
        };
        s.report(&id, track, &blocks, crate::node::track_clock_rate(track), now).ok()?;
        Some(blocks.len())
    });
    match taken {
        Some(n) => counters.blocks.fetch_add(n as u64, Ordering::Relaxed),
        None => counters.unmatched.fetch_add(1, Ordering::Relaxed),
    };
}

/// Reads the RTCP UDP players send to the POP's RTCP port.
async fn rtcp_intake(node: Arc<Node>, socket: UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        let got = tokio::select! {
            _ = node.cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        match got {
            Ok((n, from)) => take_rtcp(&node, from, None, &buf[..n]),
            Err(e) => {
                debug!(pop = %node.id.name, "RTCP intake: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves RTSP on `listener` until the node stops; players' RTCP over UDP
/// comes to `rtcp`.
pub async fn serve(node: Arc<Node>, listener: TcpListener, rtcp: UdpSocket) {
    node.tasks.spawn(rtcp_intake(node.clone(), rtcp));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = node.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(pop = %node.id.name, "RTSP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(pop = %node.id.name, %peer, "RTSP connection refused: {MAX_CONNECTIONS} already open");
            let mut stream = stream;
            let busy = refusal("0", &Refusal::new(StatusCode::ServiceUnavailable, "too many RTSP connections"));
            let _ = stream.write_all(&encode(&busy)).await;
            continue;
        };
        let node = node.clone();
        node.tasks.clone().spawn(async move {
            let _slot = slot;
            connection(node, stream, peer).await;
        });
    }
}

async fn connection(node: Arc<Node>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().map(|a| a.ip()).unwrap_or(node.settings.bind);
    let mut conn = Conn {
        node: node.clone(),
        peer,
        local,
        session: None,
        ssrcs: Vec::new(),
        described: Vec::new(),
        granted: Vec::new(),
        sink: None,
        channels: Vec::new(),
        stream: None,
        line: Vec::new(),
        line_checked: None,
    };
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut packet = vec![0u8; 65_536];
    // Interleaved frames on their way to the player.
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BATCH + 4 + packet.len());
    // A player that says nothing for this long (no keepalive) is gone.
    let idle = node.settings.session_timeout * 2;
    'conn: loop {
        loop {
            if buf.first() != Some(&b'$') {
                if let Some(r) = machine::too_many_headers(&buf) {
                    warn!(pop = %node.id.name, %peer, "RTSP: {}; closing the connection", r.reason);
                    let _ = stream.write_all(&encode(&refusal("0", &r))).await;
                    break 'conn;
                }
            }
            match Message::<Vec<u8>>::parse(&buf) {
                Ok((msg, used)) => {
                    let req = match msg {
                        Message::Request(req) => req,
                        // Interleaved: the player's RTCP on a track's RTCP channel.
                        Message::Data(data) => {
                            conn.interleaved_rtcp(data.channel_id(), data.as_slice());
                            buf.drain(..used);
                            continue;
                        }
                        Message::Response(_) => {
                            buf.drain(..used);
                            continue;
                        }
                    };
                    buf.drain(..used);
                    let resp = conn.handle(req).await;
                    if stream.write_all(&encode(&resp)).await.is_err() {
                        break 'conn;
                    }
                }
                Err(ParseError::Incomplete(_)) => break,
                Err(ParseError::Error) => {
                    let bad = Refusal::new(StatusCode::BadRequest, "malformed RTSP request");
                    warn!(pop = %node.id.name, %peer, "RTSP: malformed request; closing the connection");
                    let _ = stream.write_all(&encode(&refusal("0", &bad))).await;
                    break 'conn;
                }
            }
        }
        if buf.len() > MAX_REQUEST {
            let big = Refusal::new(
                StatusCode::RequestMessageBodyTooLarge,
                format!("request larger than {MAX_REQUEST} bytes"),
            );
            warn!(pop = %node.id.name, %peer, "RTSP: request over {MAX_REQUEST} bytes; closing the connection");
            let _ = stream.write_all(&encode(&refusal("0", &big))).await;
            break;
        }
        let read = tokio::select! {
            _ = node.cancel.cancelled() => break,
            r = tokio::time::timeout(idle, stream.read_buf(&mut buf)) => r,
            p = recv_from_sink(conn.sink.as_ref(), &mut packet) => {
                let Ok(n) = p else { continue };
                // This packet and whatever else is waiting go out in one
                // write.
                out.clear();
                let _ = conn.frame(&packet[..n], &mut out);
                while out.len() < WRITE_BATCH {
                    let Some(Ok(n)) = conn.sink.as_ref().map(|s| s.try_recv(&mut packet)) else { break };
                    let _ = conn.frame(&packet[..n], &mut out);
                }
                if out.is_empty() {
                    continue;
                }
                // A player that does not take its data within this long
                // is cut loose: the relay never waits for it (its loopback
                // socket drops what overflows meanwhile).
                match tokio::time::timeout(SLOW_PLAYER, stream.write_all(&out)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => {
                        debug!(pop = %node.id.name, %peer, "RTSP: writing to the player failed: {e}");
                        break;
                    }
                    Err(_) => {
                        warn!(pop = %node.id.name, %peer, "RTSP player over TCP too slow (a write took over {} s): cut loose", SLOW_PLAYER.as_secs());
                        break;
                    }
                }
            }
        };
        match read {
            Ok(Ok(0)) => {
                debug!(pop = %node.id.name, %peer, "RTSP: the player closed the connection");
                break;
            }
            Ok(Err(e)) => {
                debug!(pop = %node.id.name, %peer, "RTSP: reading from the player failed: {e}");
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                info!(pop = %node.id.name, %peer, "RTSP: player silent for {} s; closing", idle.as_secs());
                break;
            }
        }
    }
    conn.close();
}

/// One RTSP connection's state.
struct Conn {
    node: Arc<Node>,
    peer: SocketAddr,
    /// The POP's address the player reached.
    local: IpAddr,
    /// The session set up on this connection (one at a time).
    session: Option<String>,
    /// SSRCs of the session's stream (video, then audio).
    ssrcs: Vec<u32>,
    /// Streams joined for a DESCRIBE, held until the connection ends.
    described: Vec<String>,
    /// Streams a token was accepted for on this connection.
    granted: Vec<String>,
    /// RTP/AVP/TCP: the loopback socket the relay sends this player's
    /// packets to, and the channels of each track (track, RTP, RTCP).
    sink: Option<tokio::net::UdpSocket>,
    channels: Vec<(usize, u8, u8)>,
    /// The session's stream, and the SSRCs of the POP's line per track
    /// (looked up again at most every 100 ms when a packet matches none).
    stream: Option<String>,
    line: Vec<Option<u32>>,
    line_checked: Option<Instant>,
}

impl Conn {
    async fn handle(&mut self, req: rtsp_types::Request<Vec<u8>>) -> Response<Vec<u8>> {
        let cseq = req.header(&headers::CSEQ).map(|v| v.as_str().trim().chars().take(10).collect::<String>());
        let parsed = match machine::parse(&req, self.peer.ip()) {
            Ok(p) => p,
            Err(r) => {
                debug!(pop = %self.node.id.name, peer = %self.peer, "RTSP request refused: {} {}", u16::from(r.status), r.reason);
                return refusal(cseq.as_deref().unwrap_or("0"), &r);
            }
        };
        let base = match req.request_uri() {
            Some(u) => format!("rtsp://{}", &u.as_str()[url_host_range(u)]),
            None => format!("rtsp://{}", self.local),
        };
        let cseq = parsed.cseq.clone();
        match self.carry_out(parsed, &base).await {
            Ok(resp) => resp,
            Err(r) => {
                info!(pop = %self.node.id.name, peer = %self.peer, "RTSP: {} {}", u16::from(r.status), r.reason);
                refusal(&cseq, &r)
            }
        }
    }

    async fn carry_out(&mut self, p: Parsed, base: &str) -> Result<Response<Vec<u8>>, Refusal> {
        if let Some(id) = &p.session {
            if self.session.as_deref() != Some(id.as_str()) {
                return Err(Refusal::new(StatusCode::SessionNotFound, "no such session on this connection"));
            }
            self.node.note_sessions(|s| s.touch(id, Instant::now())).map_err(session_refusal)?;
        }
        let ok = || reply(&p.cseq, StatusCode::Ok, None);
        match p.command {
            Command::Options => Ok(ok().header(headers::PUBLIC, machine::PUBLIC).build(Vec::new())),
            Command::KeepAlive => Ok(ok().build(Vec::new())),
            Command::Describe { stream } => {
                self.authorize(&stream, p.token.as_deref())?;
                let sdp = self.describe(&stream).await?;
                Ok(ok()
                    .header(headers::CONTENT_TYPE, "application/sdp")
                    .header(headers::CONTENT_BASE, format!("{base}/{stream}/"))
                    .build(sdp.into_bytes()))
            }
            Command::Setup { stream, track, delivery } => {
                self.authorize(&stream, p.token.as_deref())?;
                let id = self.set_up(&stream, track, delivery).await?;
                let line = self.node.line_ssrcs(&stream, self.ssrcs.len());
                let ssrc = line.get(track).copied().flatten().unwrap_or(self.ssrcs[track]);
                let transport = delivery.transport_reply(self.node.settings.data_port, ssrc);
                Ok(ok()
                    .header(headers::TRANSPORT, transport)
                    .header(headers::SESSION, format!("{id};timeout={}", self.node.settings.session_timeout.as_secs()))
                    .build(Vec::new()))
            }
            Command::Play => {
                let id = self.session.clone().expect("checked above");
                self.node.play(&id).map_err(session_refusal)?;
                let stream = self.node.with_sessions(|s| s.get(&id).and_then(|s| s.stream.clone())).unwrap_or_default();
                // Where the player's video starts: the cached GOP's first
                // packet, on the line players of this POP see.
                let first = self.node.line_start(&stream);
                info!(pop = %self.node.id.name, peer = %self.peer, %stream, session = short_id(&id), "RTSP PLAY");
                let mut b = ok().header(headers::SESSION, id.clone()).header(headers::RANGE, "npt=now-");
                if let Some((seq, ts)) = first {
                    b = b.header(headers::RTP_INFO, format!("url={base}/{stream}/trackID=0;seq={seq};rtptime={ts}"));
                }
                Ok(b.build(Vec::new()))
            }
            Command::Pause => {
                let id = self.session.clone().expect("checked above");
                self.node.with_sessions(|s| s.pause(&id)).map_err(session_refusal)?;
                Ok(ok().header(headers::SESSION, id).build(Vec::new()))
            }
            Command::Teardown => {
                self.end_session();
                Ok(ok().build(Vec::new()))
            }
        }
    }

    /// Checks the viewer's token when the POP requires one; a token
    /// accepted once for a stream holds for the connection.
    fn authorize(&mut self, stream: &str, token: Option<&str>) -> Result<(), Refusal> {
        let Some(verifier) = &self.node.settings.tokens else { return Ok(()) };
        if token.is_none() && self.granted.iter().any(|s| s == stream) {
            return Ok(());
        }
        let now = crate::net::unix_us() / 1_000_000;
        match verifier.check(token, Action::Read, stream, now) {
            Ok(claims) => {
                info!(pop = %self.node.id.name, peer = %self.peer, %stream, viewer = %crate::services::shown(&claims.sub), "RTSP: token accepted");
                if !self.granted.iter().any(|s| s == stream) {
                    self.granted.push(stream.to_string());
                }
                Ok(())
            }
            Err(e) => {
                warn!(pop = %self.node.id.name, peer = %self.peer, %stream, "RTSP refused: {e}");
                let status = if matches!(e, TokenError::NotGranted { .. }) {
                    StatusCode::Forbidden
                } else {
                    StatusCode::Unauthorized
                };
                Err(Refusal::new(status, e.to_string()))
            }
        }
    }

    /// Joins `stream` (held until the connection ends) and describes it.
    async fn describe(&mut self, stream: &str) -> Result<String, Refusal> {
        let ssrcs = if self.described.iter().any(|s| s == stream) {
            self.node.desc(stream).map(|d| d.ssrcs).unwrap_or_default()
        } else {
            if self.described.len() >= MAX_DESCRIBED {
                return Err(Refusal::new(
                    StatusCode::BadRequest,
                    format!("at most {MAX_DESCRIBED} streams may be described on one connection"),
                ));
            }
            let desc = self.join(stream).await?;
            self.described.push(stream.to_string());
            desc.ssrcs
        };
        let video =
            *ssrcs.first().ok_or_else(|| Refusal::new(StatusCode::ServiceUnavailable, "the stream has no tracks"))?;
        let Some((sps, pps, pt)) = self.node.parameter_sets(video, KEYFRAME_WAIT).await else {
            return Err(Refusal::new(
                StatusCode::ServiceUnavailable,
                format!("stream {stream} has sent no keyframe in {} s; try again", KEYFRAME_WAIT.as_secs()),
            ));
        };
        let audio_pt = (ssrcs.len() > 1).then_some(media::AUDIO_PT);
        Ok(machine::sdp(&machine::Description {
            stream: stream.to_string(),
            origin: self.local,
            video_pt: pt,
            sps,
            pps,
            audio_pt,
        }))
    }

    /// Joins the stream's tree as a local viewer.
    async fn join(&self, stream: &str) -> Result<overlay_core::tree::StreamDesc, Refusal> {
        let node = &self.node;
        node.join(stream, Requester::Local, Vec::new(), node.settings.data_port).await.map_err(|nak| {
            let status = match nak.reason {
                NakReason::UnknownStream => StatusCode::NotFound,
                NakReason::NoRoute | NakReason::Loop | NakReason::Timeout => StatusCode::ServiceUnavailable,
            };
            let why = match nak.reason {
                NakReason::UnknownStream => format!("no server of the overlay offers stream {stream}"),
                NakReason::NoRoute | NakReason::Loop => format!("no route to a server of stream {stream} right now"),
                NakReason::Timeout => format!("the overlay did not answer for stream {stream} in time"),
            };
            Refusal::new(status, why)
        })
    }

    /// SETUP of one track: the first opens the session and joins the tree.
    async fn set_up(&mut self, stream: &str, track: usize, delivery: machine::Delivery) -> Result<String, Refusal> {
        let ip = self.peer.ip();
        let id = match &self.session {
            Some(id) => id.clone(),
            None => {
                let mut bytes = [0u8; 16];
                rand::rng().fill_bytes(&mut bytes);
                let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let client = format!("rtsp {}", self.peer);
                self.node
                    .with_sessions(|s| s.connect(id.clone(), client, ip, Instant::now()))
                    .map_err(session_refusal)?;
                match self.join(stream).await {
                    Ok(desc) => self.ssrcs = desc.ssrcs,
                    Err(r) => {
                        let _ = self.node.with_sessions(|s| s.teardown(&id));
                        return Err(r);
                    }
                }
                self.session = Some(id.clone());
                self.stream = Some(stream.to_string());
                info!(pop = %self.node.id.name, peer = %self.peer, %stream, session = short_id(&id), "RTSP session set up");
                id
            }
        };
        if track >= self.ssrcs.len() {
            return Err(Refusal::new(StatusCode::NotFound, format!("stream {stream} has {} tracks", self.ssrcs.len())));
        }
        let dest = match delivery {
            machine::Delivery::Udp { rtp_port, rtcp_port } => TrackDest {
                track,
                rtp: SocketAddr::new(ip, rtp_port),
                rtcp: SocketAddr::new(ip, rtcp_port),
                interleaved: false,
            },
            machine::Delivery::Tcp { rtp_channel, rtcp_channel } => {
                if self.sink.is_none() {
                    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.map_err(|e| {
                        Refusal::new(StatusCode::InternalServerError, format!("no socket for TCP delivery: {e}"))
                    })?;
                    self.sink = Some(sink);
                }
                let addr = self.sink.as_ref().and_then(|s| s.local_addr().ok()).expect("bound above");
                self.channels.retain(|(t, ..)| *t != track);
                self.channels.push((track, rtp_channel, rtcp_channel));
                TrackDest { track, rtp: addr, rtcp: addr, interleaved: true }
            }
        };
        self.node.with_sessions(|s| s.set_up_track(&id, stream, dest)).map_err(session_refusal)?;
        Ok(id)
    }

    /// Appends a packet from the loopback socket to `out`, framed for the
    /// RTSP connection (`$`, channel, length) by its SSRC's track and its
    /// kind; a packet of no track of the session is dropped (None).
    fn frame(&mut self, packet: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let p = overlay_core::rtp::Packet::parse(packet).ok()?;
        // Packets come on the POP's line for each track: its SSRCs are those
        // of the stream when the line began, which may be an earlier source.
        let mut track = self.line.iter().position(|s| *s == Some(p.ssrc()));
        if track.is_none() && self.line_checked.is_none_or(|at| at.elapsed() > Duration::from_millis(100)) {
            self.line_checked = Some(Instant::now());
            if let Some(stream) = &self.stream {
                self.line = self.node.line_ssrcs(stream, self.ssrcs.len());
            }
            track = self.line.iter().position(|s| *s == Some(p.ssrc()));
        }
        let track = track?;
        let &(_, rtp, rtcp) = self.channels.iter().find(|(t, ..)| *t == track)?;
        let channel = if p.kind() == overlay_core::rtp::Kind::Rtcp { rtcp } else { rtp };
        let len = u16::try_from(packet.len()).ok()?;
        out.extend_from_slice(&[b'$', channel]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(packet);
        Some(())
    }

    /// A frame the player sent on an interleaved channel: RTCP on a
    /// track's RTCP channel is taken in; anything else is dropped.
    fn interleaved_rtcp(&self, channel: u8, data: &[u8]) {
        let Some(id) = &self.session else { return };
        if let Some(&(track, ..)) = self.channels.iter().find(|(_, _, rtcp)| *rtcp == channel) {
            take_rtcp(&self.node, self.peer, Some((id, track)), data);
        }
    }

    /// Ends the connection's session, if it still has one, and its join.
    fn end_session(&mut self) {
        let Some(id) = self.session.take() else { return };
        self.ssrcs.clear();
        self.channels.clear();
        self.stream = None;
        self.line.clear();
        // The POP may have timed it out already (and left its stream then).
        if let Ok(gone) = self.node.with_sessions(|s| s.teardown(&id)) {
            info!(pop = %self.node.id.name, peer = %self.peer, session = short_id(&id), "RTSP TEARDOWN");
            if let Some(stream) = gone.stream {
                self.node.leave(&stream, Requester::Local);
            }
        }
    }

    fn close(&mut self) {
        self.end_session();
        for stream in self.described.drain(..) {
            self.node.leave(&stream, Requester::Local);
        }
    }
}

/// The part of a URL after `rtsp://` up to the path: host and port.
fn url_host_range(u: &rtsp_types::Url) -> std::ops::Range<usize> {
    let start = u.scheme().len() + 3;
    let start = u.as_str()[start..].find('@').map_or(start, |at| start + at + 1);
    let end = start + u.as_str()[start..].find(['/', '?']).unwrap_or(u.as_str().len() - start);
    start..end
}

fn session_refusal(e: SessionError) -> Refusal {
    let status = match &e {
        SessionError::Unknown(_) => StatusCode::SessionNotFound,
        SessionError::BadPhase { .. } => StatusCode::MethodNotValidInThisState,
        SessionError::ForeignDestination { .. } => StatusCode::Forbidden,
        SessionError::TooMany { .. } | SessionError::TooManyFromAddress { .. } => StatusCode::ServiceUnavailable,
    };
    Refusal::new(status, e.to_string())
}
