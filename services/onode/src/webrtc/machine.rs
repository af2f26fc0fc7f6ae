//! What a WHEP request asks of a POP, decided without sockets: an SDP offer
//! is checked and answered by str0m (ICE-lite, one host candidate, H.264
//! as the stream really carries it and Opus), or refused with a status and
//! a reason a page can show; and the per-track bookkeeping that turns the
//! POP's RTP line into str0m writes (extended sequence numbers, the
//! capture time of each packet from the servers' sender reports). The
//! driver ([`super`]) owns the sockets and the clock.

use std::net::SocketAddr;
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use overlay_core::names::shown;
use overlay_core::rtp::SenderReport;
use str0m::change::SdpOffer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::{Candidate, Rtc, RtcConfig};

/// Largest offer taken, in bytes (Chromium's are 4-6 KB).
pub const MAX_OFFER: usize = 64 * 1024;

/// A request refused: the HTTP status and a reason a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into() }
    }
}

/// The H.264 profile-level-id (RFC 6184 §8.1) a stream's sequence
/// parameter set describes: profile_idc, the constraint flags and
/// level_idc, the three bytes after the NAL header. None when `sps` is
/// not an SPS.
pub fn profile_level_id(sps: &[u8]) -> Option<u32> {
    match sps {
        [header, profile, flags, level, ..] if header & 0x1f == 7 => {
            Some(u32::from(*profile) << 16 | u32::from(*flags) << 8 | u32::from(*level))
        }
        _ => None,
    }
}

/// What a browser is sent, fixed when its offer is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub video: Mid,
    /// The video payload type the browser asked for (its H.264 with
    /// packetization-mode 1 and our profile).
    pub video_pt: u8,
    /// The audio m-line and Opus payload type, when the offer has them
    /// and the stream has audio.
    pub audio: Option<(Mid, u8)>,
}

/// What the answer says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFormat {
    /// From the stream's SPS: the profile the browser must decode.
    pub profile_level_id: u32,
    pub audio: bool,
}

fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
}

/// The POP's DTLS certificate: one per process, as a browser keeps one per
/// origin (its fingerprint is in every answer); making one per peer costs
/// a key generation each.
fn dtls_cert() -> Option<str0m::config::DtlsCert> {
    static CERT: OnceLock<Option<str0m::config::DtlsCert>> = OnceLock::new();
    CERT.get_or_init(|| str0m::crypto::from_feature_flags().dtls_provider.generate_certificate()).clone()
}

/// The str0m configuration of a browser viewer of a stream in `format`:
/// ICE-lite (the POP only answers checks), RTP passed through as it is,
/// H.264 with the stream's own profile (and its retransmissions), Opus.
pub fn config(format: StreamFormat) -> RtcConfig {
    install_crypto();
    let mut config = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(format.audio, false)
        .set_stats_interval(None)
        .set_send_buffer_video(2000);
    if let Some(cert) = dtls_cert() {
        config = config.set_dtls_cert(cert);
    }
    // Payload types are placeholders: str0m answers with the browser's.
    config.codec_config().add_h264(102.into(), Some(103.into()), true, format.profile_level_id);
    config
}

/// Parses an offer: refused when it is too large or not SDP.
pub fn check_offer(offer: &str) -> Result<SdpOffer, Refusal> {
    if offer.len() > MAX_OFFER {
        return Err(Refusal::new(413, format!("offer larger than {MAX_OFFER} bytes")));
    }
    if !offer.trim_start().starts_with("v=0") {
        return Err(Refusal::new(400, "the body is not an SDP offer (it must start with v=0)"));
    }
    SdpOffer::from_sdp_string(offer)
        .map_err(|e| Refusal::new(400, format!("malformed SDP offer: {}", shown(&e.to_string()))))
}

/// A peer built from `config` with one host `candidate` that accepted
/// `offer`: the peer, its answer, and the offer's m-lines by mid with the
/// kind and direction str0m agreed to.
#[allow(clippy::type_complexity)]
fn accept(
    config: RtcConfig,
    offer: &str,
    candidate: SocketAddr,
    now: Instant,
) -> Result<(Rtc, str0m::change::SdpAnswer, Vec<(Mid, MediaKind, Direction)>), Refusal> {
    let offer_text = offer;
    let offer = check_offer(offer)?;
    let mut rtc = config.build(now);
    let candidate = Candidate::host(candidate, "udp")
        .map_err(|e| Refusal::new(500, format!("no ICE candidate for {candidate}: {e}")))?;
    rtc.add_local_candidate(candidate);
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| Refusal::new(400, format!("the offer cannot be answered: {}", shown(&e.to_string()))))?;
    // The offer's m-lines by their mids (str0m has parsed and checked it;
    // its media tell kind and direction).
    let added = offer_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=mid:"))
        .take(16)
        .filter_map(|m| rtc.media(Mid::from(m.trim())).map(|media| (media.mid(), media.kind(), media.direction())))
        .collect();
    Ok((rtc, answer, added))
}

/// Answers `offer` for a stream in `format`, with the POP's `candidate`
/// (the address and UDP port the browser reaches): the new peer, the SDP
/// answer and what was negotiated; or why not.
pub fn answer(
    offer: &str,
    format: StreamFormat,
    candidate: SocketAddr,
    now: Instant,
) -> Result<(Rtc, String, Negotiated), Refusal> {
    let (rtc, answer, added) = accept(config(format), offer, candidate, now)?;
    let negotiated = negotiated(&rtc, &added, format)?;
    Ok((rtc, answer.to_sdp_string(), negotiated))
}

/// Which m-lines carry the stream, from what str0m agreed to.
fn negotiated(rtc: &Rtc, added: &[(Mid, MediaKind, Direction)], format: StreamFormat) -> Result<Negotiated, Refusal> {
    let sends = |d: Direction| matches!(d, Direction::SendOnly | Direction::SendRecv);
    let agreed = |mid: Mid, codec: Codec| {
        let remote = rtc.media(mid)?.remote_pts();
        rtc.codec_config().find(|p| p.spec().codec == codec && remote.contains(&p.pt())).map(|p| *p.pt())
    };
    let videos: Vec<Mid> = added.iter().filter(|(_, k, d)| *k == MediaKind::Video && sends(*d)).map(|a| a.0).collect();
    if videos.is_empty() {
        return Err(Refusal::new(
            400,
            "the offer asks to receive no video (WHEP needs a recvonly or sendrecv video m-line)",
        ));
    }
    let Some((video, video_pt)) = videos.iter().find_map(|&m| agreed(m, Codec::H264).map(|pt| (m, pt))) else {
        return Err(Refusal::new(
            406,
            format!(
                "the offer has no H.264 this stream can be sent as (profile-level-id {:06x}, packetization-mode 1)",
                format.profile_level_id
            ),
        ));
    };
    let audio = if format.audio {
        added
            .iter()
            .filter(|(_, k, d)| *k == MediaKind::Audio && sends(*d))
            .find_map(|&(m, ..)| agreed(m, Codec::Opus).map(|pt| (m, pt)))
    } else {
        None
    };
    Ok(Negotiated { video, video_pt, audio })
}

/// What a publisher (WHIP) sends, fixed when its offer is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The video m-line and its H.264 payload type (packetization-mode 1).
    pub video: (Mid, u8),
    /// The audio m-line and its Opus payload type, if it sends sound.
    pub audio: Option<(Mid, u8)>,
}

/// The str0m configuration of a publisher: ICE-lite, RTP as it comes,
/// H.264 (any of the profiles browsers send; packetization-mode 1) and Opus.
fn publish_config() -> RtcConfig {
    install_crypto();
    let mut config = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .set_stats_interval(None);
    if let Some(cert) = dtls_cert() {
        config = config.set_dtls_cert(cert);
    }
    // Payload types are placeholders: str0m answers with the browser's.
    for (pt, plid) in [(102u8, 0x42001f), (104, 0x42e01f), (106, 0x4d001f), (108, 0x64001f)] {
        config.codec_config().add_h264(pt.into(), Some((pt + 1).into()), true, plid);
    }
    config
}

/// Answers a publisher's offer (WHIP) with `candidate`: the new peer, the
/// SDP answer and what it will send; or why not (406 without H.264).
pub fn publish_answer(offer: &str, candidate: SocketAddr, now: Instant) -> Result<(Rtc, String, Published), Refusal> {
    let (rtc, answer, added) = accept(publish_config(), offer, candidate, now)?;
    let receives = |d: Direction| matches!(d, Direction::RecvOnly | Direction::SendRecv);
    let agreed = |mid: Mid, codec: Codec| {
        let remote = rtc.media(mid)?.remote_pts();
        rtc.codec_config().find(|p| p.spec().codec == codec && remote.contains(&p.pt())).map(|p| *p.pt())
    };
    let pick = |kind: MediaKind, codec: Codec| {
        added
            .iter()
            .filter(|(_, k, d)| *k == kind && receives(*d))
            .find_map(|&(m, ..)| agreed(m, codec).map(|pt| (m, pt)))
    };
    if !added.iter().any(|(_, k, d)| *k == MediaKind::Video && receives(*d)) {
        return Err(Refusal::new(400, "the offer sends no video (WHIP needs a sendonly or sendrecv video m-line)"));
    }
    let video = pick(MediaKind::Video, Codec::H264)
        .ok_or_else(|| Refusal::new(406, "the offer has no H.264 (packetization-mode 1): publish H.264 video"))?;
    let audio = pick(MediaKind::Audio, Codec::Opus);
    Ok((rtc, answer.to_sdp_string(), Published { video, audio }))
}

/// An RTP packet rebuilt from what str0m hands over (header fields and
/// payload): what a GStreamer depayloader takes.
pub fn rtp_bytes(pt: u8, marker: bool, seq: u16, timestamp: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + payload.len());
    b.extend_from_slice(&[0x80, (u8::from(marker) << 7) | (pt & 0x7f)]);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&timestamp.to_be_bytes());
    b.extend_from_slice(&ssrc.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// One track of a browser viewer: how the POP's line (16-bit sequence
/// numbers, RTP time, sender reports) becomes what str0m writes.
#[derive(Debug, Clone)]
pub struct TrackOut {
    clock_rate: u32,
    /// The newest extended sequence number written.
    newest: Option<u64>,
    /// The latest sender report of the line.
    report: Option<SenderReport>,
}

impl TrackOut {
    pub fn new(clock_rate: u32) -> TrackOut {
        TrackOut { clock_rate, newest: None, report: None }
    }

    /// Extends a 16-bit sequence number to the one nearest the newest
    /// written (so a late packet stays behind and a wrap goes on); None
    /// for a packet from before the first one (nothing to send it as).
    pub fn extend(&mut self, seq: u16) -> Option<u64> {
        let ext = match self.newest {
            // The first packet starts the rollover count at 0, as the
            // browser's SRTP context assumes (RFC 3711 §3.3.1).
            None => u64::from(seq),
            Some(newest) => {
                let delta = i64::from(seq.wrapping_sub(newest as u16) as i16);
                newest.checked_add_signed(delta)?
            }
        };
        if self.newest.is_none_or(|n| ext > n) {
            self.newest = Some(ext);
        }
        Some(ext)
    }

    /// Takes a sender report of the line (its timing maps RTP time to
    /// capture time).
    pub fn report(&mut self, report: SenderReport) {
        self.report = Some(report);
    }

    /// The instant, on the clock where `now` is `now_unix` Unix seconds,
    /// at which the media at `rtp_time` was captured; `now` until a sender
    /// report came, and never later than `now` or more than 10 s before.
    pub fn wallclock(&self, rtp_time: u32, now: Instant, now_unix: f64) -> Instant {
        let Some(report) = self.report else { return now };
        let age = now_unix - report.capture_time(rtp_time, self.clock_rate);
        if !age.is_finite() {
            return now;
        }
        now.checked_sub(Duration::from_secs_f64(age.clamp(0.0, 10.0))).unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_core::rtp::Packet;

    /// An offer as Chromium 156 makes it for a recvonly video and audio
    /// transceiver (trimmed to what matters).
    pub fn chromium_offer(video_codecs: &str) -> String {
        // The m-line lists the payload types the codec lines define.
        let pts: Vec<&str> =
            video_codecs.split("a=rtpmap:").skip(1).filter_map(|l| l.split_whitespace().next()).collect();
        let mut s = String::new();
        s.push_str("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
        s.push_str("a=group:BUNDLE 0 1\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n");
        s.push_str(&format!("m=video 9 UDP/TLS/RTP/SAVPF {}\r\nc=IN IP4 0.0.0.0\r\n", pts.join(" ")));
        s.push_str("a=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        s.push_str("a=ice-options:trickle\r\na=fingerprint:sha-256 ");
        s.push_str(
            "7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n",
        );
        s.push_str("a=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\na=rtcp-rsize\r\n");
        s.push_str(video_codecs);
        s.push_str("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n");
        s.push_str("a=ice-ufrag:abcd\r\na=ice-pwd:aaaaaaaaaaaaaaaaaaaaaaaa\r\na=ice-options:trickle\r\n");
        s.push_str("a=fingerprint:sha-256 ");
        s.push_str(
            "7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08\r\n",
        );
        s.push_str("a=setup:actpass\r\na=mid:1\r\na=recvonly\r\na=rtcp-mux\r\n");
        s.push_str(
            "a=rtpmap:111 opus/48000/2\r\na=rtcp-fb:111 transport-cc\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n",
        );
        s
    }

    pub const CHROMIUM_H264: &str = "a=rtpmap:102 H264/90000\r\na=rtcp-fb:102 nack\r\na=rtcp-fb:102 nack pli\r\n\
        a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r\n\
        a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\n\
        a=rtpmap:104 H264/90000\r\na=rtcp-fb:104 nack\r\na=rtcp-fb:104 nack pli\r\n\
        a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
        a=rtpmap:105 rtx/90000\r\na=fmtp:105 apt=104\r\n\
        a=rtpmap:106 H264/90000\r\na=rtcp-fb:106 nack\r\na=rtcp-fb:106 nack pli\r\n\
        a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f\r\n\
        a=rtpmap:107 rtx/90000\r\na=fmtp:107 apt=106\r\n";

    const VP8_ONLY: &str =
        "a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n";

    fn pop() -> SocketAddr {
        "10.0.6.2:8889".parse().unwrap()
    }

    /// x264's constrained baseline at level 3.0 (our encoder's test stream).
    const X264_BASELINE: u32 = 0x42c01e;

    #[test]
    fn the_profile_comes_from_the_sps() {
        assert_eq!(profile_level_id(&[0x67, 0x42, 0xc0, 0x1e, 0xda]), Some(0x42c01e));
        assert_eq!(profile_level_id(&[0x27, 0x4d, 0x40, 0x1f]), Some(0x4d401f));
        assert_eq!(profile_level_id(&[0x68, 0xce, 0x3c, 0x80]), None, "a PPS");
        assert_eq!(profile_level_id(&[0x67, 0x42]), None);
    }

    #[test]
    fn a_chromium_offer_is_answered_with_the_streams_own_profile() {
        let offer = chromium_offer(CHROMIUM_H264);
        let format = StreamFormat { profile_level_id: X264_BASELINE, audio: true };
        let (_rtc, sdp, n) = answer(&offer, format, pop(), Instant::now()).unwrap();
        // Constrained baseline: Chromium's 42e01f entry.
        assert_eq!(n.video_pt, 104);
        assert_eq!(n.audio.map(|a| a.1), Some(111));
        assert!(sdp.contains("a=ice-lite"), "{sdp}");
        assert!(sdp.contains("profile-level-id=42c01e"), "{sdp}");
        assert!(sdp.contains("a=sendonly"), "{sdp}");
        assert!(sdp.contains("10.0.6.2 8889 typ host"), "{sdp}");
        // Main: the 4d001f entry.
        let format = StreamFormat { profile_level_id: 0x4d401e, audio: true };
        let (_, sdp, n) = answer(&offer, format, pop(), Instant::now()).unwrap();
        assert_eq!(n.video_pt, 106);
        assert!(sdp.contains("profile-level-id=4d401e"), "{sdp}");
    }

    #[test]
    fn an_offer_without_the_streams_codec_or_video_is_refused_with_a_reason() {
        let format = StreamFormat { profile_level_id: X264_BASELINE, audio: true };
        let r = answer(&chromium_offer(VP8_ONLY), format, pop(), Instant::now()).unwrap_err();
        assert_eq!(r.status, 406, "{r:?}");
        assert!(r.reason.contains("42c01e"), "{}", r.reason);
        // High profile is not among what Chromium offers.
        let high = StreamFormat { profile_level_id: 0x64001f, audio: true };
        assert_eq!(answer(&chromium_offer(CHROMIUM_H264), high, pop(), Instant::now()).unwrap_err().status, 406);
        let audio_only = chromium_offer(VP8_ONLY)
            .replace("a=recvonly\r\na=rtcp-mux\r\na=rtcp-rsize", "a=inactive\r\na=rtcp-mux\r\na=rtcp-rsize");
        let r = answer(&audio_only, format, pop(), Instant::now()).unwrap_err();
        assert!(r.status == 400 || r.status == 406, "{r:?}");
    }

    #[test]
    fn garbage_and_oversized_offers_are_refused() {
        let format = StreamFormat { profile_level_id: X264_BASELINE, audio: true };
        assert_eq!(answer("hello", format, pop(), Instant::now()).unwrap_err().status, 400);
        let r = answer("v=0\r\nm=video garbage\r\n", format, pop(), Instant::now()).unwrap_err();
        assert_eq!(r.status, 400);
        let big = "v=0\r\n".to_string() + &"a=x\r\n".repeat(MAX_OFFER / 5 + 1);
        assert_eq!(answer(&big, format, pop(), Instant::now()).unwrap_err().status, 413);
    }

    #[test]
    fn sequence_numbers_extend_across_wraps_and_late_packets_stay_behind() {
        let mut t = TrackOut::new(90_000);
        assert_eq!(t.extend(65_534), Some(65_534), "the rollover count starts at 0");
        assert_eq!(t.extend(65_535), Some(65_535));
        assert_eq!(t.extend(0), Some(65_536));
        assert_eq!(t.extend(1), Some(65_537));
        // A late packet from before the wrap.
        assert_eq!(t.extend(65_535), Some(65_535));
        assert_eq!(t.extend(2), Some(65_538));
        // Before the first packet there is nothing to send a packet as.
        let mut t = TrackOut::new(90_000);
        assert_eq!(t.extend(3), Some(3));
        assert_eq!(t.extend(65_535), None);
    }

    #[test]
    fn the_wallclock_is_the_capture_time_from_the_sender_report() {
        let mut t = TrackOut::new(90_000);
        let now = Instant::now();
        assert_eq!(t.wallclock(1000, now, 1000.0), now, "no report yet");
        // Captured at 999.5 s with RTP time 0; RTP time 9000 is 0.1 s later.
        t.report(SenderReport { ssrc: 1, unix_secs: 999.5, rtp_timestamp: 0 });
        let w = t.wallclock(9000, now, 1000.0);
        assert_eq!(now - w, Duration::from_millis(400));
        // Never in the future, never far back.
        assert_eq!(t.wallclock(900_000, now, 1000.0), now);
        assert_eq!(now - t.wallclock(0, now, 2000.0), Duration::from_secs(10));
    }

    #[test]
    fn a_publishers_offer_is_answered_for_h264_and_opus() {
        let send = chromium_offer(CHROMIUM_H264).replace("a=recvonly", "a=sendonly");
        let (_, sdp, published) = publish_answer(&send, pop(), Instant::now()).unwrap();
        assert_eq!(published.video.0, Mid::from("0"));
        assert!([102, 104, 106].contains(&published.video.1), "{published:?}");
        assert_eq!(published.audio, Some((Mid::from("1"), 111)));
        assert!(sdp.contains("a=recvonly"), "the server only receives:\n{sdp}");
        let vp8 = chromium_offer(VP8_ONLY).replace("a=recvonly", "a=sendonly");
        assert_eq!(publish_answer(&vp8, pop(), Instant::now()).unwrap_err().status, 406);
        let viewer = chromium_offer(CHROMIUM_H264);
        assert_eq!(
            publish_answer(&viewer, pop(), Instant::now()).unwrap_err().status,
            400,
            "a viewer's offer sends nothing"
        );
    }

    #[test]
    fn rtp_is_rebuilt_from_its_fields() {
        let b = rtp_bytes(102, true, 0xabcd, 90_000, 7, b"xy");
        let p = Packet::parse(&b).unwrap();
        assert_eq!(
            (p.payload_type(), p.sequence(), p.timestamp(), p.ssrc(), p.marker()),
            (102, 0xabcd, 90_000, 7, true)
        );
        assert_eq!(p.payload(), Some(&b"xy"[..]));
    }
}
