//! What a publisher's RTSP request asks of a server (ANNOUNCE, SETUP in
//! record mode, RECORD), decided without sockets, and the pure rules
//! around a publish: the bitrate bound and the names a publisher may take.

use overlay_core::codec::{Codec, RtpTrack};
use overlay_core::names::shown;
use rtsp_types::headers::{self, Transport, Transports};
use rtsp_types::{Method, Request, StatusCode};

use crate::rtsp::machine::{head, request_token, Refusal};

/// The methods a server's RTSP port announces in `Public`.
pub const PUBLIC: &str = "OPTIONS, ANNOUNCE, SETUP, RECORD, TEARDOWN, GET_PARAMETER";
/// Largest SDP taken from an ANNOUNCE.
pub const MAX_SDP: usize = 8 * 1024;

/// A track a publisher announced: where its SETUP points, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The `a=control` of its media (empty if none).
    pub control: String,
    pub track: RtpTrack,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Options,
    Announce {
        stream: String,
        tracks: Vec<Announced>,
    },
    /// SETUP of the track whose control is `control`, interleaved on these
    /// channels.
    Setup {
        stream: String,
        control: String,
        rtp_channel: u8,
        rtcp_channel: u8,
    },
    Record,
    Teardown,
    KeepAlive,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub cseq: String,
    pub session: Option<String>,
    pub token: Option<String>,
    pub command: Command,
}

/// The stream and the rest of the path: `rtsp://HOST:PORT/STREAM[/CONTROL]`.
fn target(req: &Request<Vec<u8>>) -> Result<(Option<String>, String), Refusal> {
    let Some(url) = req.request_uri() else { return Ok((None, String::new())) };
    let mut segments = url.path_segments().into_iter().flatten().filter(|s| !s.is_empty());
    let stream = segments.next().map(str::to_string);
    let control = segments.collect::<Vec<_>>().join("/");
    if let Some(s) = &stream {
        overlay_core::names::check_name("stream", s).map_err(|e| Refusal::new(StatusCode::BadRequest, e))?;
    }
    Ok((stream, control))
}

/// The tracks of an ANNOUNCE's SDP: one H.264 video and one AAC or Opus
/// audio track at most; any other codec is refused with 415.
pub fn announced(sdp: &[u8]) -> Result<Vec<Announced>, Refusal> {
    if sdp.len() > MAX_SDP {
        return Err(Refusal::new(StatusCode::RequestMessageBodyTooLarge, format!("SDP over {MAX_SDP} bytes")));
    }
    let session = sdp_types::Session::parse(sdp)
        .map_err(|e| Refusal::new(StatusCode::BadRequest, format!("the SDP cannot be parsed: {e}")))?;
    let unsupported = |why: String| Refusal::new(StatusCode::UnsupportedMediaType, why);
    let mut tracks: Vec<Announced> = Vec::new();
    for media in &session.medias {
        if media.media != "video" && media.media != "audio" {
            return Err(unsupported(format!("media {} is not taken: publish video and audio", shown(&media.media))));
        }
        let pt: u8 =
            media.fmt.split_whitespace().next().and_then(|f| f.parse().ok()).filter(|&pt| pt < 128).ok_or_else(
                || {
                    Refusal::new(
                        StatusCode::BadRequest,
                        format!("media format {} is not a payload type", shown(&media.fmt)),
                    )
                },
            )?;
        let attribute = |name: &'static str| {
            media.attributes.iter().filter(move |a| a.attribute == name).filter_map(|a| a.value.as_deref())
        };
        let for_pt = |value: &str| -> Option<String> {
            let (p, rest) = value.split_once(' ')?;
            (p.trim().parse::<u8>().ok()? == pt).then(|| rest.trim().to_string())
        };
        let rtpmap = attribute("rtpmap").find_map(for_pt);
        let (encoding, clock_rate, channels) = match &rtpmap {
            Some(map) => {
                let mut parts = map.split('/');
                let encoding = parts.next().unwrap_or_default().to_string();
                let clock = parts.next().and_then(|c| c.parse::<u32>().ok()).filter(|&c| c > 0);
                let Some(clock) = clock else {
                    return Err(Refusal::new(
                        StatusCode::BadRequest,
                        format!("rtpmap {} has no clock rate", shown(map)),
                    ));
                };
                (encoding, clock, parts.next().and_then(|c| c.parse::<u32>().ok()))
            }
            None => {
                return Err(unsupported(format!(
                    "payload type {pt} has no rtpmap (static payload types are not taken)"
                )))
            }
        };
        let codec = Codec::from_rtp(&encoding).map_err(unsupported)?;
        if codec.is_video() != (media.media == "video") {
            return Err(unsupported(format!("{} is not {} media", shown(&encoding), media.media)));
        }
        if tracks.iter().any(|t| t.track.codec.is_video() == codec.is_video()) {
            return Err(unsupported(format!(
                "a second {} track is not taken: publish one video and one audio",
                media.media
            )));
        }
        let fmtp = attribute("fmtp")
            .find_map(for_pt)
            .map(|f| {
                f.split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .take(32)
                    .collect()
            })
            .unwrap_or_default();
        let control = attribute("control").next().unwrap_or_default().to_string();
        tracks.push(Announced { control, track: RtpTrack { codec, payload_type: pt, clock_rate, channels, fmtp } });
    }
    if tracks.is_empty() {
        return Err(unsupported("the SDP has no video or audio track".into()));
    }
    Ok(tracks)
}

/// Which announced track a SETUP's control (the URL path after the
/// stream) names: equal to its control, or the end of an absolute one;
/// a single track without control takes any SETUP.
pub fn track_for(tracks: &[Announced], control: &str) -> Option<usize> {
    if let Some(i) = tracks.iter().position(|t| !t.control.is_empty() && t.control == control) {
        return Some(i);
    }
    if let Some(i) = tracks.iter().position(|t| {
        t.control.contains("://")
            && !control.is_empty()
            && t.control.trim_end_matches('/').ends_with(&format!("/{control}"))
    }) {
        return Some(i);
    }
    (tracks.len() == 1 && tracks[0].control.is_empty()).then_some(0)
}

/// A SETUP's transport for publishing: RTP/AVP/TCP interleaved. UDP is
/// refused with 461, on which ffmpeg and GStreamer try TCP.
fn record_transport(req: &Request<Vec<u8>>) -> Result<(u8, u8), Refusal> {
    let transports = req
        .typed_header::<Transports>()
        .map_err(|_| Refusal::new(StatusCode::BadRequest, "the Transport header cannot be parsed"))?
        .ok_or_else(|| Refusal::new(StatusCode::BadRequest, "SETUP needs a Transport header"))?;
    for t in transports.iter() {
        let Transport::Rtp(rtp) = t else { continue };
        if rtp.lower_transport != Some(headers::RtpLowerTransport::Tcp) {
            continue;
        }
        let Some((rtp_channel, rtcp_channel)) = rtp.params.interleaved else {
            return Err(Refusal::new(StatusCode::BadRequest, "RTP/AVP/TCP needs interleaved=RTP-RTCP channels"));
        };
        return Ok((rtp_channel, rtcp_channel.unwrap_or(rtp_channel.saturating_add(1))));
    }
    Err(Refusal::new(
        StatusCode::UnsupportedTransport,
        "publish over TCP (RTP/AVP/TCP interleaved; ffmpeg: -rtsp_transport tcp)",
    ))
}

/// Parses a publisher's request.
pub fn parse(req: &Request<Vec<u8>>) -> Result<Parsed, Refusal> {
    let (cseq, session) = head(req)?;
    let (stream, control) = target(req)?;
    let need_stream = || stream.clone().ok_or_else(|| Refusal::new(StatusCode::NotFound, "the URL names no stream"));
    let command = match req.method() {
        Method::Options => Command::Options,
        Method::Announce => {
            let stream = need_stream()?;
            let content_type = req.header(&headers::CONTENT_TYPE).map(|v| v.as_str().trim().to_ascii_lowercase());
            if content_type.as_deref().is_some_and(|t| t != "application/sdp") {
                return Err(Refusal::new(StatusCode::UnsupportedMediaType, "ANNOUNCE takes application/sdp"));
            }
            Command::Announce { stream, tracks: announced(req.body())? }
        }
        Method::Setup => {
            let stream = need_stream()?;
            let (rtp_channel, rtcp_channel) = record_transport(req)?;
            Command::Setup { stream, control, rtp_channel, rtcp_channel }
        }
        Method::Record => Command::Record,
        Method::Teardown => Command::Teardown,
        Method::GetParameter | Method::SetParameter => Command::KeepAlive,
        Method::Describe | Method::Play => {
            return Err(Refusal::new(
                StatusCode::MethodNotAllowed,
                "this is a server: publish here (ANNOUNCE, RECORD); watch at a POP",
            ))
        }
        other => {
            let name: &str = other.into();
            return Err(Refusal::new(
                StatusCode::MethodNotAllowed,
                format!("{} is not served here (this server takes {PUBLIC})", shown(name)),
            ));
        }
    };
    if matches!(command, Command::Record) && session.is_none() {
        return Err(Refusal::new(StatusCode::SessionNotFound, "RECORD needs the Session of a SETUP"));
    }
    Ok(Parsed { cseq, session, token: request_token(req), command })
}

/// The stream name an SRT caller's stream id asks to publish:
/// `publish:NAME` (MediaMTX's form; `#!::r=NAME,m=publish` too).
pub fn srt_stream_id(id: &str) -> Result<String, String> {
    let name = if let Some(name) = id.strip_prefix("publish:") {
        name.split(':').next().unwrap_or_default().to_string()
    } else if let Some(acl) = id.strip_prefix("#!::") {
        let mut name = None;
        let mut publish = false;
        for kv in acl.split(',') {
            match kv.split_once('=') {
                Some(("r", v)) => name = Some(v.to_string()),
                Some(("m", "publish")) => publish = true,
                _ => {}
            }
        }
        match (name, publish) {
            (Some(n), true) => n,
            _ => return Err(format!("stream id {} does not ask to publish (m=publish)", shown(id))),
        }
    } else {
        return Err(format!("stream id {} is not publish:NAME", shown(id)));
    };
    overlay_core::names::check_name("stream", &name)?;
    Ok(name)
}

/// A publisher's bitrate over a sliding second, against its bound: true
/// while within `limit_kbit` (with 50% headroom for a keyframe burst,
/// averaged over two seconds).
#[derive(Debug, Clone)]
pub struct RateBound {
    limit_bytes_2s: u64,
    /// Bytes in the current and the previous second, and when the current
    /// second began (in ms of the caller's clock).
    current: u64,
    previous: u64,
    second_ms: u64,
}

impl RateBound {
    pub fn new(limit_kbit: u32) -> RateBound {
        RateBound {
            limit_bytes_2s: u64::from(limit_kbit) * 1000 / 8 * 2 * 3 / 2,
            current: 0,
            previous: 0,
            second_ms: 0,
        }
    }

    /// Counts `bytes` at `now_ms`; false once the last two seconds carried
    /// more than the bound allows (0 means no bound).
    pub fn take(&mut self, bytes: usize, now_ms: u64) -> bool {
        if now_ms >= self.second_ms + 2000 {
            (self.previous, self.current, self.second_ms) = (0, 0, now_ms);
        } else if now_ms >= self.second_ms + 1000 {
            (self.previous, self.current, self.second_ms) = (self.current, 0, self.second_ms + 1000);
        }
        self.current += bytes as u64;
        self.limit_bytes_2s == 0 || self.previous + self.current <= self.limit_bytes_2s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What ffmpeg 5.1 announces for `-c:v libx264 -c:a aac -f rtsp`.
    const FFMPEG_SDP: &str = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=No Name\r\nc=IN IP4 10.0.25.10\r\nt=0 0\r\n\
        a=tool:libavformat 59.27.100\r\nm=video 0 RTP/AVP 96\r\nb=AS:1000\r\na=rtpmap:96 H264/90000\r\n\
        a=fmtp:96 packetization-mode=1; sprop-parameter-sets=Z2QAHqzZQKAv+XARAAADAAEAAAMAPA8WLZY=,aOvjyyLA; profile-level-id=64001E\r\n\
        a=control:streamid=0\r\nm=audio 0 RTP/AVP 97\r\nb=AS:128\r\na=rtpmap:97 MPEG4-GENERIC/44100/2\r\n\
        a=fmtp:97 profile-level-id=1;mode=AAC-hbr;sizelength=13;indexlength=3;indexdeltalength=3; config=121056E500\r\n\
        a=control:streamid=1\r\n";

    fn request(text: &str) -> Request<Vec<u8>> {
        match rtsp_types::Message::<Vec<u8>>::parse(text.as_bytes()) {
            Ok((rtsp_types::Message::Request(r), _)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn ffmpegs_announce_gives_h264_and_aac() {
        let tracks = announced(FFMPEG_SDP.as_bytes()).unwrap();
        assert_eq!(tracks.len(), 2);
        assert_eq!(tracks[0].control, "streamid=0");
        assert_eq!(tracks[0].track.codec, Codec::H264);
        assert_eq!((tracks[0].track.payload_type, tracks[0].track.clock_rate), (96, 90_000));
        assert!(tracks[0].track.fmtp.contains(&("packetization-mode".into(), "1".into())));
        assert_eq!(tracks[1].track.codec, Codec::AacGeneric);
        assert_eq!((tracks[1].track.clock_rate, tracks[1].track.channels), (44_100, Some(2)));
        assert!(tracks[1].track.fmtp.contains(&("config".into(), "121056E500".into())));
        assert_eq!(track_for(&tracks, "streamid=1"), Some(1));
        assert_eq!(track_for(&tracks, "streamid=7"), None);
    }

    #[test]
    fn other_codecs_are_refused_with_415() {
        let h265 = FFMPEG_SDP.replace("H264/90000", "H265/90000");
        let r = announced(h265.as_bytes()).unwrap_err();
        assert_eq!(r.status, StatusCode::UnsupportedMediaType);
        assert!(r.reason.contains("H265"), "{}", r.reason);
        let pcm = FFMPEG_SDP.replace("MPEG4-GENERIC/44100/2", "L16/44100/2");
        assert_eq!(announced(pcm.as_bytes()).unwrap_err().status, StatusCode::UnsupportedMediaType);
        let twice = FFMPEG_SDP
            .replace("m=audio 0 RTP/AVP 97", "m=video 0 RTP/AVP 97")
            .replace("MPEG4-GENERIC/44100/2", "H264/90000");
        assert!(announced(twice.as_bytes()).unwrap_err().reason.contains("second video"));
        assert_eq!(announced(b"garbage").unwrap_err().status, StatusCode::BadRequest);
        assert_eq!(announced(&vec![b'v'; MAX_SDP + 1]).unwrap_err().status, StatusCode::RequestMessageBodyTooLarge);
        let no_media = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nt=0 0\r\n";
        assert_eq!(announced(no_media.as_bytes()).unwrap_err().status, StatusCode::UnsupportedMediaType);
    }

    #[test]
    fn a_publishers_requests_parse() {
        let announce = format!(
            "ANNOUNCE rtsp://10.0.25.10:8554/cam?token=abc RTSP/1.0\r\nCSeq: 2\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{FFMPEG_SDP}",
            FFMPEG_SDP.len()
        );
        let p = parse(&request(&announce)).unwrap();
        assert_eq!(p.token.as_deref(), Some("abc"));
        assert!(
            matches!(p.command, Command::Announce { ref stream, ref tracks } if stream == "cam" && tracks.len() == 2)
        );
        let setup = "SETUP rtsp://10.0.25.10:8554/cam/streamid=0 RTSP/1.0\r\nCSeq: 3\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1;mode=record\r\n\r\n";
        assert_eq!(
            parse(&request(setup)).unwrap().command,
            Command::Setup { stream: "cam".into(), control: "streamid=0".into(), rtp_channel: 0, rtcp_channel: 1 }
        );
        let udp = "SETUP rtsp://10.0.25.10:8554/cam/streamid=0 RTSP/1.0\r\nCSeq: 3\r\nTransport: RTP/AVP/UDP;unicast;client_port=5000-5001;mode=record\r\n\r\n";
        assert_eq!(parse(&request(udp)).unwrap_err().status, StatusCode::UnsupportedTransport);
        let record = "RECORD rtsp://10.0.25.10:8554/cam RTSP/1.0\r\nCSeq: 4\r\n\r\n";
        assert_eq!(parse(&request(record)).unwrap_err().status, StatusCode::SessionNotFound);
        let play = "PLAY rtsp://10.0.25.10:8554/cam RTSP/1.0\r\nCSeq: 4\r\nSession: 12\r\n\r\n";
        assert!(parse(&request(play)).unwrap_err().reason.contains("watch at a POP"));
        let bad_name = "ANNOUNCE rtsp://10.0.25.10:8554/%00x RTSP/1.0\r\nCSeq: 2\r\n\r\n";
        assert_eq!(parse(&request(bad_name)).unwrap_err().status, StatusCode::BadRequest);
    }

    #[test]
    fn srt_stream_ids_name_what_is_published() {
        assert_eq!(srt_stream_id("publish:cam"), Ok("cam".into()));
        assert_eq!(srt_stream_id("publish:cam:user:pass"), Ok("cam".into()));
        assert_eq!(srt_stream_id("#!::r=cam,m=publish"), Ok("cam".into()));
        assert!(srt_stream_id("read:cam").unwrap_err().contains("publish:NAME"));
        assert!(srt_stream_id("#!::r=cam,m=request").is_err());
        assert!(srt_stream_id("publish:").is_err());
        assert!(srt_stream_id(&format!("publish:{}", "x".repeat(500))).is_err());
    }

    #[test]
    fn the_rate_bound_allows_bursts_but_not_a_steady_excess() {
        // 1000 kbit/s: 125 kB/s, 375 kB over two seconds with headroom.
        let mut r = RateBound::new(1000);
        assert!(r.take(300_000, 0), "a keyframe burst");
        assert!(r.take(70_000, 900));
        assert!(!r.take(10_000, 1100), "380 kB within two seconds");
        let mut steady = RateBound::new(1000);
        assert!((0..100).all(|i| steady.take(12_500, i * 100)), "exactly 1 Mbit/s holds");
        let mut over = RateBound::new(1000);
        assert!(!(0..100).all(|i| over.take(25_000, i * 100)), "2 Mbit/s does not");
        assert!(RateBound::new(0).take(usize::MAX / 2, 0), "0 is no bound");
    }
}
