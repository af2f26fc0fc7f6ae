//! What an RTSP request asks of a POP, decided without sockets: parsing
//! (with rtsp-types) into a [`Command`] or a [`Refusal`] a player can show,
//! and the replies. The driver ([`super`]) carries the commands out.

use std::net::IpAddr;

use base64::Engine;
use overlay_core::session::ReportBlock;
use rtsp_types::headers::{self, Transport, Transports};
use rtsp_types::{Method, Request, Response, StatusCode, Version};

/// Largest request taken (headers and body), in bytes.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;
/// Characters of anything a player sent that a reply or log repeats.
const SHOWN: usize = 32;

/// Most report blocks taken from one RTCP packet.
const MAX_BLOCKS: usize = 62;

/// The report blocks of an RTCP compound packet a player sent (its
/// receiver reports, or those inside a sender report); None when the
/// datagram is not RTCP at all.
pub fn report_blocks(data: &[u8]) -> Option<Vec<ReportBlock>> {
    let compound = rtcp_types::Compound::parse(data).ok()?;
    let mut out = Vec::new();
    let take = |b: rtcp_types::ReportBlock<'_>| ReportBlock {
        ssrc: b.ssrc(),
        fraction_lost: b.fraction_lost(),
        cumulative_lost: b.cumulative_lost(),
        highest_seq: b.extended_sequence_number(),
        jitter: b.interarrival_jitter(),
    };
    for packet in compound {
        match packet.ok()? {
            rtcp_types::Packet::Rr(rr) => out.extend(rr.report_blocks().map(take)),
            rtcp_types::Packet::Sr(sr) => out.extend(sr.report_blocks().map(take)),
            _ => {}
        }
        if out.len() >= MAX_BLOCKS {
            out.truncate(MAX_BLOCKS);
            break;
        }
    }
    Some(out)
}

/// The methods announced in `Public`.
pub const PUBLIC: &str = "OPTIONS, DESCRIBE, SETUP, PLAY, PAUSE, TEARDOWN, GET_PARAMETER";

/// A request refused, with the status and a reason phrase a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into() }
    }
}

fn shown(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(SHOWN).collect();
    if s.chars().count() > SHOWN {
        out.push('…');
    }
    format!("{out:?}")
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Options,
    Describe {
        stream: String,
    },
    /// SETUP of track `track` (index into the stream's SSRCs: 0 video,
    /// 1 audio), delivered as asked.
    Setup {
        stream: String,
        track: usize,
        delivery: Delivery,
    },
    Play,
    Pause,
    Teardown,
    /// GET_PARAMETER (players' keepalive).
    KeepAlive,
}

/// A parsed request: the command and what comes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub cseq: String,
    pub session: Option<String>,
    /// A token from the URL (`?token=`), an `Authorization: Bearer` header,
    /// or the password of `Authorization: Basic`.
    pub token: Option<String>,
    pub command: Command,
}

/// The stream and track a request URL names: `rtsp://HOST:PORT/STREAM`,
/// optionally `/trackID=N`, optionally `?token=...`.
fn target(req: &Request<Vec<u8>>) -> Result<(Option<String>, Option<usize>), Refusal> {
    let Some(url) = req.request_uri() else { return Ok((None, None)) };
    let mut segments = url.path_segments().into_iter().flatten().filter(|s| !s.is_empty());
    let stream = segments.next().map(str::to_string);
    let track = match segments.next() {
        None => None,
        Some(seg) => {
            let n = seg.strip_prefix("trackID=").and_then(|n| n.parse::<usize>().ok());
            Some(n.ok_or_else(|| {
                Refusal::new(StatusCode::NotFound, format!("no track {} in this stream (trackID=0 or 1)", shown(seg)))
            })?)
        }
    };
    if segments.next().is_some() {
        return Err(Refusal::new(StatusCode::NotFound, format!("path {} has too many parts", shown(url.path()))));
    }
    if let Some(s) = &stream {
        overlay_core::names::check_name("stream", s).map_err(|e| Refusal::new(StatusCode::BadRequest, e))?;
    }
    Ok((stream, track))
}

/// The token a request carries: `?token=` in the URL, a Bearer header, or
/// the password of Basic credentials.
pub fn request_token(req: &Request<Vec<u8>>) -> Option<String> {
    if let Some(t) = req.request_uri().and_then(|u| u.query_pairs().find(|(k, _)| k == "token")) {
        return Some(t.1.into_owned());
    }
    let auth = req.header(&headers::AUTHORIZATION)?.as_str().trim();
    if let Some(t) = auth.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    let basic = auth.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.1.to_string())
}

/// How a track's packets reach the player.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// RTP and RTCP datagrams to these UDP ports of the player's address.
    Udp { rtp_port: u16, rtcp_port: u16 },
    /// Interleaved in the RTSP connection on these channels (RTP/AVP/TCP).
    Tcp { rtp_channel: u8, rtcp_channel: u8 },
}

impl Delivery {
    /// The Transport header that answers a SETUP with this delivery.
    pub fn transport_reply(&self, data_port: u16, ssrc: u32) -> String {
        match self {
            Delivery::Udp { rtp_port, rtcp_port } => format!(
                "RTP/AVP;unicast;client_port={rtp_port}-{rtcp_port};server_port={data_port}-{};ssrc={ssrc:08X}",
                data_port.saturating_add(1)
            ),
            Delivery::Tcp { rtp_channel, rtcp_channel } => {
                format!("RTP/AVP/TCP;unicast;interleaved={rtp_channel}-{rtcp_channel};ssrc={ssrc:08X}")
            }
        }
    }
}

/// The delivery a SETUP's Transport header asks for: the first unicast
/// RTP/AVP offer over UDP or TCP (interleaved). `peer` is where the request
/// came from: a `destination` naming another host is refused (RFC 7826 §21).
fn transport(req: &Request<Vec<u8>>, peer: IpAddr) -> Result<Delivery, Refusal> {
    let transports = req
        .typed_header::<Transports>()
        .map_err(|_| Refusal::new(StatusCode::BadRequest, "the Transport header cannot be parsed"))?
        .ok_or_else(|| Refusal::new(StatusCode::BadRequest, "SETUP needs a Transport header"))?;
    for t in transports.iter() {
        let Transport::Rtp(rtp) = t else { continue };
        if rtp.params.multicast || rtp.profile != headers::RtpProfile::Avp {
            continue;
        }
        if let Some(dest) = &rtp.params.destination {
            if dest.parse::<IpAddr>().ok() != Some(peer) {
                return Err(Refusal::new(
                    StatusCode::Forbidden,
                    format!("media goes only to the player's own address ({peer}), not destination={}", shown(dest)),
                ));
            }
        }
        if rtp.lower_transport == Some(headers::RtpLowerTransport::Tcp) {
            let Some((rtp_channel, rtcp_channel)) = rtp.params.interleaved else {
                return Err(Refusal::new(StatusCode::BadRequest, "RTP/AVP/TCP needs interleaved=RTP-RTCP channels"));
            };
            let rtcp_channel = rtcp_channel.unwrap_or(rtp_channel.saturating_add(1));
            return Ok(Delivery::Tcp { rtp_channel, rtcp_channel });
        }
        let Some((rtp_port, rtcp_port)) = rtp.params.client_port else {
            return Err(Refusal::new(StatusCode::BadRequest, "the UDP transport has no client_port"));
        };
        if rtp_port == 0 {
            return Err(Refusal::new(StatusCode::BadRequest, "client_port 0 is not a UDP port"));
        }
        return Ok(Delivery::Udp { rtp_port, rtcp_port: rtcp_port.unwrap_or(rtp_port.saturating_add(1)) });
    }
    Err(Refusal::new(
        StatusCode::UnsupportedTransport,
        "no unicast RTP/AVP over UDP or TCP among the offered transports",
    ))
}

/// Refuses a request (complete or still arriving, as bytes) whose head has
/// more than [`MAX_HEADERS`] header lines.
pub fn too_many_headers(buf: &[u8]) -> Option<Refusal> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(buf.len());
    let lines = buf[..head_end].split(|&b| b == b'\n').count().saturating_sub(1);
    (lines > MAX_HEADERS).then(|| Refusal::new(StatusCode::BadRequest, format!("more than {MAX_HEADERS} headers")))
}

/// Parses a request from `peer` into what it asks for.
/// What every request carries, checked: its CSeq, RTSP/1.0, and the
/// Session it names (without parameters), if any.
pub fn head(req: &Request<Vec<u8>>) -> Result<(String, Option<String>), Refusal> {
    let cseq = req
        .header(&headers::CSEQ)
        .map(|v| v.as_str().trim().to_string())
        .filter(|c| !c.is_empty() && c.len() <= 10 && c.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| Refusal::new(StatusCode::BadRequest, "the request has no valid CSeq"))?;
    if req.version() != Version::V1_0 {
        return Err(Refusal::new(StatusCode::RTSPVersionNotSupported, "this node speaks RTSP/1.0"));
    }
    let session = req.header(&headers::SESSION).map(|v| {
        let v = v.as_str();
        v.split(';').next().unwrap_or(v).trim().chars().take(64).collect::<String>()
    });
    Ok((cseq, session))
}

pub fn parse(req: &Request<Vec<u8>>, peer: IpAddr) -> Result<Parsed, Refusal> {
    let (cseq, session) = head(req)?;
    let token = request_token(req);
    let (stream, track) = target(req)?;
    let need_stream = || stream.clone().ok_or_else(|| Refusal::new(StatusCode::NotFound, "the URL names no stream"));
    let command = match req.method() {
        Method::Options => Command::Options,
        Method::Describe => Command::Describe { stream: need_stream()? },
        Method::Setup => {
            let stream = need_stream()?;
            let delivery = transport(req, peer)?;
            Command::Setup { stream, track: track.unwrap_or(0), delivery }
        }
        Method::Play => Command::Play,
        Method::Pause => Command::Pause,
        Method::Teardown => Command::Teardown,
        Method::GetParameter => Command::KeepAlive,
        other => {
            let name: &str = other.into();
            return Err(Refusal::new(
                StatusCode::MethodNotAllowed,
                format!("{} is not served here (this POP serves {PUBLIC})", shown(name)),
            ));
        }
    };
    if matches!(command, Command::Play | Command::Pause | Command::Teardown) && session.is_none() {
        return Err(Refusal::new(StatusCode::SessionNotFound, "the request needs the Session of a SETUP"));
    }
    Ok(Parsed { cseq, session, token, command })
}

/// A reply with `CSeq` and `Server`, and a body if not empty.
pub fn reply(cseq: &str, status: StatusCode, reason: Option<&str>) -> rtsp_types::ResponseBuilder {
    let mut b = Response::builder(Version::V1_0, status)
        .header(headers::CSEQ, cseq)
        .header(headers::SERVER, concat!("onode/", env!("CARGO_PKG_VERSION")));
    if let Some(r) = reason {
        b = b.reason_phrase(r);
    }
    b
}

/// The reply to a refusal (with a Basic challenge when a token is missing).
pub fn refusal(cseq: &str, r: &Refusal) -> Response<Vec<u8>> {
    let mut b = reply(cseq, r.status, Some(&r.reason));
    if r.status == StatusCode::Unauthorized {
        b = b.header(headers::WWW_AUTHENTICATE, "Basic realm=\"overlay\"");
    }
    b.build(Vec::new())
}

/// Writes a response as bytes.
pub fn encode(resp: &Response<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(resp.write_len() as usize);
    resp.write(&mut out).expect("writing to a Vec does not fail");
    out
}

/// What a stream description needs.
#[derive(Debug, Clone)]
pub struct Description {
    pub stream: String,
    /// The POP's address as the player reached it.
    pub origin: IpAddr,
    pub video_pt: u8,
    /// H.264 SPS and PPS (NAL units without start codes).
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    /// Opus payload type, if the stream has sound.
    pub audio_pt: Option<u8>,
}

/// The SDP of a stream: H.264 with its parameter sets and profile, Opus,
/// an aggregate control URL and one per track.
pub fn sdp(d: &Description) -> String {
    use sdp_types::{Attribute, Connection, Media, Origin, Session, Time};
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let attr = |a: &str, v: Option<String>| Attribute { attribute: a.to_string(), value: v };
    let ip4 = d.origin.is_ipv4();
    let addrtype = if ip4 { sdp_types::AddrType::Ip4 } else { sdp_types::AddrType::Ip6 };
    let profile: String = d.sps.get(1..4).map(|p| p.iter().map(|b| format!("{b:02x}")).collect()).unwrap_or_default();
    let media = |kind: &str, pt: u8, attributes: Vec<Attribute>| Media {
        media: kind.to_string(),
        port: 0,
        num_ports: None,
        proto: "RTP/AVP".to_string(),
        fmt: pt.to_string(),
        media_title: None,
        connections: Vec::new(),
        bandwidths: Vec::new(),
        key: None,
        attributes,
    };
    let mut medias = vec![media(
        "video",
        d.video_pt,
        vec![
            attr("rtpmap", Some(format!("{} H264/90000", d.video_pt))),
            attr(
                "fmtp",
                Some(format!(
                    "{} packetization-mode=1;profile-level-id={profile};sprop-parameter-sets={},{}",
                    d.video_pt,
                    b64(&d.sps),
                    b64(&d.pps)
                )),
            ),
            attr("control", Some("trackID=0".into())),
        ],
    )];
    if let Some(pt) = d.audio_pt {
        medias.push(media(
            "audio",
            pt,
            vec![
                attr("rtpmap", Some(format!("{pt} opus/48000/2"))),
                attr("fmtp", Some(format!("{pt} sprop-stereo=1"))),
                attr("control", Some("trackID=1".into())),
            ],
        ));
    }
    let session = Session {
        origin: Origin {
            username: None,
            sess_id: "0".into(),
            sess_version: 1,
            nettype: sdp_types::NetType::In,
            addrtype: addrtype.clone(),
            unicast_address: d.origin.to_string(),
        },
        session_name: d.stream.clone(),
        session_description: None,
        uri: None,
        emails: Vec::new(),
        phones: Vec::new(),
        connection: Some(Connection {
            nettype: sdp_types::NetType::In,
            addrtype,
            connection_address: if ip4 { "0.0.0.0".into() } else { "::".into() },
        }),
        bandwidths: Vec::new(),
        times: vec![Time { start_time: 0, stop_time: 0, repeats: Vec::new() }],
        time_zones: Vec::new(),
        key: None,
        attributes: vec![attr("control", Some("*".into())), attr("range", Some("npt=now-".into()))],
        medias,
    };
    let mut out = Vec::new();
    session.write(&mut out).expect("writing to a Vec does not fail");
    String::from_utf8(out).expect("SDP is text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_reports_are_read_from_a_compound_packet() {
        // RR (one block) + SDES with a CNAME, as ffmpeg and rtpbin send them.
        let mut rr = vec![0x81, 201, 0, 7, 0, 0, 0, 9];
        rr.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]); // reported SSRC
        rr.extend_from_slice(&[5, 0, 0, 2]); // 5/256 lost lately, 2 in all
        rr.extend_from_slice(&70_000u32.to_be_bytes());
        rr.extend_from_slice(&900u32.to_be_bytes()); // jitter, 10 ms at 90 kHz
        rr.extend_from_slice(&[0; 8]); // LSR, DLSR
        let mut sdes = vec![0x81, 202, 0, 3, 0, 0, 0, 9, 1, 4];
        sdes.extend_from_slice(b"abcd");
        sdes.extend_from_slice(&[0, 0]);
        let mut packet = rr.clone();
        packet.extend_from_slice(&sdes);
        let blocks = report_blocks(&packet).unwrap();
        assert_eq!(
            blocks,
            [ReportBlock { ssrc: 0x1234_5678, fraction_lost: 5, cumulative_lost: 2, highest_seq: 70_000, jitter: 900 }]
        );
        assert_eq!(report_blocks(&sdes).unwrap(), [], "no report in it");
        assert_eq!(report_blocks(&rr[..20]), None, "truncated");
        assert_eq!(report_blocks(b"GET / HTTP/1.1\r\n"), None, "not RTCP");
        assert_eq!(report_blocks(&[]), None);
    }

    fn request(text: &str) -> Request<Vec<u8>> {
        match rtsp_types::Message::<Vec<u8>>::parse(text.as_bytes()) {
            Ok((rtsp_types::Message::Request(r), _)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    const PEER: &str = "10.0.6.20";

    fn parsed(text: &str) -> Result<Parsed, Refusal> {
        parse(&request(text), PEER.parse().unwrap())
    }

    #[test]
    fn a_players_requests_become_commands() {
        let p = parsed("OPTIONS rtsp://10.0.6.2:8554/test RTSP/1.0\r\nCSeq: 1\r\n\r\n").unwrap();
        assert_eq!((p.cseq.as_str(), p.command), ("1", Command::Options));
        let p = parsed(
            "DESCRIBE rtsp://10.0.6.2:8554/test?token=abc RTSP/1.0\r\nCSeq: 2\r\nAccept: application/sdp\r\n\r\n",
        )
        .unwrap();
        assert_eq!(p.command, Command::Describe { stream: "test".into() });
        assert_eq!(p.token.as_deref(), Some("abc"));
        let p = parsed(
            "SETUP rtsp://10.0.6.2:8554/test/trackID=1 RTSP/1.0\r\nCSeq: 3\r\nSession: ab12;timeout=60\r\n\
             Transport: RTP/AVP/UDP;unicast;client_port=5002-5003\r\n\r\n",
        )
        .unwrap();
        assert_eq!(p.session.as_deref(), Some("ab12"));
        let udp = Delivery::Udp { rtp_port: 5002, rtcp_port: 5003 };
        assert_eq!(p.command, Command::Setup { stream: "test".into(), track: 1, delivery: udp });
        assert_eq!(
            udp.transport_reply(7071, 0xab),
            "RTP/AVP;unicast;client_port=5002-5003;server_port=7071-7072;ssrc=000000AB"
        );
        let p = parsed(
            "SETUP rtsp://10.0.6.2:8554/test/trackID=0 RTSP/1.0\r\nCSeq: 3\r\n\
             Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n\r\n",
        )
        .unwrap();
        let tcp = Delivery::Tcp { rtp_channel: 0, rtcp_channel: 1 };
        assert_eq!(p.command, Command::Setup { stream: "test".into(), track: 0, delivery: tcp });
        assert_eq!(tcp.transport_reply(7071, 0xab), "RTP/AVP/TCP;unicast;interleaved=0-1;ssrc=000000AB");
        assert_eq!(p.session, None);
        let p = parsed("PLAY rtsp://10.0.6.2:8554/test/ RTSP/1.0\r\nCSeq: 4\r\nSession: ab12\r\nRange: npt=0-\r\n\r\n")
            .unwrap();
        assert_eq!(p.command, Command::Play);
        let p =
            parsed("GET_PARAMETER rtsp://10.0.6.2:8554/test/ RTSP/1.0\r\nCSeq: 5\r\nSession: ab12\r\n\r\n").unwrap();
        assert_eq!(p.command, Command::KeepAlive);
    }

    #[test]
    fn tokens_come_from_the_url_a_bearer_or_a_basic_password() {
        let basic = base64::engine::general_purpose::STANDARD.encode("viewer:tok3n");
        let p = parsed(&format!("DESCRIBE rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\nAuthorization: Basic {basic}\r\n\r\n"))
            .unwrap();
        assert_eq!(p.token.as_deref(), Some("tok3n"));
        let p = parsed("DESCRIBE rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\nAuthorization: Bearer t2\r\n\r\n").unwrap();
        assert_eq!(p.token.as_deref(), Some("t2"));
        assert_eq!(parsed("DESCRIBE rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\n\r\n").unwrap().token, None);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let refused = |text: &str| parsed(text).unwrap_err();
        let r = refused("OPTIONS rtsp://h/test RTSP/1.0\r\n\r\n");
        assert_eq!((r.status, r.reason.as_str()), (StatusCode::BadRequest, "the request has no valid CSeq"));
        let r = refused("DESCRIBE rtsp://h/te$t RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        assert_eq!(r.status, StatusCode::BadRequest);
        assert!(r.reason.contains("may hold only"), "{}", r.reason);
        let r = refused("DESCRIBE rtsp://h/ RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        assert_eq!(r.status, StatusCode::NotFound);
        let r = refused("SETUP rtsp://h/test/track9 RTSP/1.0\r\nCSeq: 1\r\nTransport: RTP/AVP;unicast;client_port=5000-5001\r\n\r\n");
        assert_eq!(r.status, StatusCode::NotFound);
        let r = refused("SETUP rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        assert_eq!((r.status, r.reason.as_str()), (StatusCode::BadRequest, "SETUP needs a Transport header"));
        let r = refused("PLAY rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\n\r\n");
        assert_eq!(r.status, StatusCode::SessionNotFound);
        let r = refused("RECORD rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\nSession: x\r\n\r\n");
        assert_eq!(r.status, StatusCode::MethodNotAllowed);
        let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
        let text = format!("OPTIONS rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\n{many}\r\n");
        let r = too_many_headers(text.as_bytes()).expect("refused");
        assert!(r.reason.contains("64 headers"), "{}", r.reason);
        assert!(too_many_headers(&text.as_bytes()[..text.len() - 12]).is_some(), "counted before the end of the head");
        assert!(too_many_headers(b"OPTIONS rtsp://h/test RTSP/1.0\r\nCSeq: 1\r\n\r\n").is_none());
    }

    #[test]
    fn media_goes_only_to_the_player_that_asked() {
        let r = parsed(
            "SETUP rtsp://h/test/trackID=0 RTSP/1.0\r\nCSeq: 3\r\n\
             Transport: RTP/AVP;unicast;destination=10.0.7.20;client_port=5000-5001\r\n\r\n",
        )
        .unwrap_err();
        assert_eq!(r.status, StatusCode::Forbidden);
        assert!(r.reason.contains("10.0.6.20") && r.reason.contains("10.0.7.20"), "{}", r.reason);
        let own = format!(
            "SETUP rtsp://h/test/trackID=0 RTSP/1.0\r\nCSeq: 3\r\n\
             Transport: RTP/AVP;unicast;destination={PEER};client_port=5000-5001\r\n\r\n"
        );
        assert!(parsed(&own).is_ok());
        let r = parsed(
            "SETUP rtsp://h/test/trackID=0 RTSP/1.0\r\nCSeq: 3\r\nTransport: RTP/AVP;multicast;port=5000-5001\r\n\r\n",
        )
        .unwrap_err();
        assert_eq!(r.status, StatusCode::UnsupportedTransport);
    }

    #[test]
    fn the_description_carries_the_streams_parameter_sets_and_tracks() {
        let d = Description {
            stream: "test".into(),
            origin: "10.0.6.2".parse().unwrap(),
            video_pt: 96,
            sps: vec![0x67, 0x42, 0xc0, 0x1f, 0xaa],
            pps: vec![0x68, 0xce],
            audio_pt: Some(97),
        };
        let text = sdp(&d);
        assert!(
            text.contains(
                "a=fmtp:96 packetization-mode=1;profile-level-id=42c01f;sprop-parameter-sets=Z0LAH6o=,aM4=\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("m=audio 0 RTP/AVP 97\r\n") && text.contains("a=rtpmap:97 opus/48000/2\r\n"), "{text}");
        assert!(text.contains("a=control:trackID=0\r\n") && text.contains("a=control:trackID=1\r\n"), "{text}");
        let parsed = sdp_types::Session::parse(text.as_bytes()).expect("valid SDP");
        assert_eq!(parsed.medias.len(), 2);
        let video_only = sdp(&Description { audio_pt: None, ..d });
        assert!(!video_only.contains("m=audio"));
    }

    #[test]
    fn a_refusal_for_a_missing_token_challenges_for_credentials() {
        let r = refusal("7", &Refusal::new(StatusCode::Unauthorized, "a token is required"));
        let text = String::from_utf8(encode(&r)).unwrap();
        assert!(text.starts_with("RTSP/1.0 401 a token is required\r\n"), "{text}");
        assert!(
            text.contains("CSeq: 7\r\n") && text.contains("WWW-Authenticate: Basic realm=\"overlay\"\r\n"),
            "{text}"
        );
    }
}
