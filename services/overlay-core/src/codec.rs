//! The codecs a publisher may send and how they are named in SDP: pure,
//! shared by the publish edges (which decide) and the media ingest (which
//! builds the pipeline).

use crate::names::shown;

/// A codec a publisher may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    H264,
    /// AAC in RTP as `MPEG4-GENERIC` (RFC 3640).
    AacGeneric,
    /// AAC in RTP as `MP4A-LATM` (RFC 6416).
    AacLatm,
    Opus,
}

impl Codec {
    /// The codec of an SDP `rtpmap` encoding name (any case), or a reason a
    /// publisher can act on.
    pub fn from_rtp(encoding: &str) -> Result<Codec, String> {
        match encoding.to_ascii_uppercase().as_str() {
            "H264" => Ok(Codec::H264),
            "MPEG4-GENERIC" => Ok(Codec::AacGeneric),
            "MP4A-LATM" => Ok(Codec::AacLatm),
            "OPUS" => Ok(Codec::Opus),
            other => Err(format!("codec {} is not taken: publish H.264 video and AAC or Opus sound", shown(other))),
        }
    }

    pub fn is_video(self) -> bool {
        self == Codec::H264
    }

    /// Its SDP encoding name.
    pub fn encoding_name(self) -> &'static str {
        match self {
            Codec::H264 => "H264",
            Codec::AacGeneric => "MPEG4-GENERIC",
            Codec::AacLatm => "MP4A-LATM",
            Codec::Opus => "OPUS",
        }
    }
}

/// One RTP track a publisher announced (from its SDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpTrack {
    pub codec: Codec,
    pub payload_type: u8,
    pub clock_rate: u32,
    /// Audio channels (the rtpmap's encoding parameters).
    pub channels: Option<u32>,
    /// The `fmtp` parameters, as given.
    pub fmtp: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_are_taken_or_refused_by_name() {
        assert_eq!(Codec::from_rtp("h264"), Ok(Codec::H264));
        assert_eq!(Codec::from_rtp("MPEG4-GENERIC"), Ok(Codec::AacGeneric));
        assert_eq!(Codec::from_rtp("mp4a-latm"), Ok(Codec::AacLatm));
        assert_eq!(Codec::from_rtp("opus"), Ok(Codec::Opus));
        let refused = Codec::from_rtp("H265").unwrap_err();
        assert!(refused.contains("\"H265\"") && refused.contains("H.264"), "{refused}");
        let long = Codec::from_rtp(&"X".repeat(1000)).unwrap_err();
        assert!(long.len() < 200, "a long name is cut: {long}");
        for c in [Codec::H264, Codec::AacGeneric, Codec::AacLatm, Codec::Opus] {
            assert_eq!(Codec::from_rtp(c.encoding_name()), Ok(c));
        }
    }
}
