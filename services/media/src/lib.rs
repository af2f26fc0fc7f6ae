//! The media edges of the overlay: GStreamer pipelines that turn a stream
//! (the built-in test stream or a file) into RTP packets on a server, and
//! RTP packets back into pictures and sound on a client, plus the pure
//! receive statistics a client reports.
//!
//! Relays never come here: they forward RTP as bytes. Only the two ends of
//! a distribution tree run GStreamer. Every stream has two RTP streams,
//! H.264 video ([`VIDEO_PT`]) and Opus audio ([`AUDIO_PT`]), each with its
//! own SSRC from [`stream_ssrcs`], so that every server offering the same
//! stream name sends the same SSRCs and the overlay can forward by SSRC.

mod catalogue;
mod error;
mod ingest;
mod player;
mod rtsp_watch;
mod source;
mod stats;
mod sync;

use std::sync::OnceLock;

use gstreamer as gst;

pub use catalogue::{catalogue, SourceSpec, TEST_STREAM};
pub use error::MediaError;
pub use ingest::{Codec, Ingest, RtpTrack};
pub use player::{DecodeCounts, Player, PlayerConfig, DEFAULT_LATENCY_MS};
pub use rtsp_watch::{watch_rtsp, RtspTransport, RtspWatch};
pub use source::StreamSource;
pub use stats::{RtpStats, RtpSummary};
pub use sync::{median, LipSync, Media, Presentation, PresentationSummary};

/// RTP payload type of the H.264 video stream (clock 90 kHz).
pub const VIDEO_PT: u8 = 96;
/// RTP payload type of the Opus audio stream (clock 48 kHz).
pub const AUDIO_PT: u8 = 97;
/// RTP clock rate of [`VIDEO_PT`].
pub const VIDEO_CLOCK_RATE: u32 = 90_000;
/// RTP clock rate of [`AUDIO_PT`].
pub const AUDIO_CLOCK_RATE: u32 = 48_000;

/// The RTP clock rate of one of our payload types, `None` for any other.
pub fn clock_rate(payload_type: u8) -> Option<u32> {
    match payload_type {
        VIDEO_PT => Some(VIDEO_CLOCK_RATE),
        AUDIO_PT => Some(AUDIO_CLOCK_RATE),
        _ => None,
    }
}

/// Initialises GStreamer once for the process; later calls return the
/// first call's outcome.
pub fn init() -> Result<(), MediaError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gst::init().map_err(|e| e.to_string())).clone().map_err(MediaError::Init)
}

/// The SSRCs `[video, audio]` of a stream. They depend only on the name
/// (FNV-1a, 32 bit, over `"video:"` or `"audio:"` followed by the name), so
/// every server and every build agrees on them; neither is 0 and they differ.
pub fn stream_ssrcs(stream: &str) -> [u32; 2] {
    let video = nonzero(fnv1a(b"video:", stream.as_bytes()));
    let mut audio = nonzero(fnv1a(b"audio:", stream.as_bytes()));
    if audio == video {
        audio = nonzero(audio.wrapping_add(1));
    }
    [video, audio]
}

fn fnv1a(prefix: &[u8], name: &[u8]) -> u32 {
    prefix.iter().chain(name).fold(0x811c_9dc5, |hash: u32, &byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

fn nonzero(ssrc: u32) -> u32 {
    if ssrc == 0 {
        1
    } else {
        ssrc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssrcs_are_deterministic_distinct_and_nonzero() {
        let a = stream_ssrcs("test");
        assert_eq!(a, stream_ssrcs("test"));
        // Pinned: other servers (and other builds) must compute the same.
        assert_eq!(a, [fnv1a(b"video:", b"test"), fnv1a(b"audio:", b"test")]);
        assert_eq!(fnv1a(b"", b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"", b"a"), 0xe40c_292c);
        for name in ["", "test", "movie", "a", "b", "long stream name ü"] {
            let [v, au] = stream_ssrcs(name);
            assert_ne!(v, 0, "{name}");
            assert_ne!(au, 0, "{name}");
            assert_ne!(v, au, "{name}");
        }
        assert_ne!(stream_ssrcs("movie"), stream_ssrcs("movie2"));
    }

    #[test]
    fn clock_rates_follow_payload_types() {
        assert_eq!(clock_rate(VIDEO_PT), Some(90_000));
        assert_eq!(clock_rate(AUDIO_PT), Some(48_000));
        assert_eq!(clock_rate(0), None);
    }
}
