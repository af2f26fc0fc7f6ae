//! A standard RTSP player, for measuring what players other than ours get
//! from a POP: GStreamer's `rtspsrc` (the RTSP client of gst-launch,
//! Totem and many recorders) decoding the stream's video, timed from the
//! start of the pipeline (the player's first request) to the first decoded
//! frame.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;

use crate::source::{describe_error, launch};
use crate::{init, MediaError, DEFAULT_LATENCY_MS};

/// How an RTSP player asks for the media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtspTransport {
    /// RTP/AVP over UDP, to two ports of the player.
    Udp,
    /// RTP/AVP/TCP, interleaved in the RTSP connection.
    Tcp,
}

/// What one RTSP player got.
#[derive(Debug, Clone, PartialEq)]
pub struct RtspWatch {
    /// From the start (before the first request) to the first decoded
    /// video frame, ms; None if none came.
    pub first_frame_ms: Option<f64>,
    pub frames_decoded: u64,
    /// The first error the pipeline reported (it stops there).
    pub error: Option<String>,
}

/// Plays `url` over `transport` for `duration` (from the start), decoding
/// its video; ends early on an error, the end of the stream, or when
/// `stop` is set (checked every 200 ms). The pipeline is stopped, which
/// tears the RTSP session down.
pub fn watch_rtsp(
    url: &str,
    transport: RtspTransport,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<RtspWatch, MediaError> {
    init()?;
    let context = "rtsp player";
    if url.contains(['"', '\\', '!']) || !url.starts_with("rtsp://") {
        return Err(MediaError::Build { pipeline: context.into(), reason: format!("not an rtsp:// URL: {url:?}") });
    }
    let protocols = match transport {
        RtspTransport::Udp => "udp",
        RtspTransport::Tcp => "tcp",
    };
    // The jitter buffer waits as long as our own player's does, so that
    // both start-up figures count the same wait.
    let description = format!(
        "rtspsrc location=\"{url}\" protocols={protocols} latency={DEFAULT_LATENCY_MS} ! rtph264depay ! h264parse \
         ! avdec_h264 name=dec ! fakesink sync=false"
    );
    let pipeline = launch(context, &description)?;
    let first = Arc::new(OnceLock::<Instant>::new());
    let frames = Arc::new(AtomicU64::new(0));
    let pad = pipeline
        .by_name("dec")
        .and_then(|d| d.static_pad("src"))
        .ok_or_else(|| MediaError::Build { pipeline: context.into(), reason: "no decoder output".into() })?;
    let (first2, frames2) = (first.clone(), frames.clone());
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        first2.get_or_init(Instant::now);
        frames2.fetch_add(1, Ordering::Relaxed);
        gst::PadProbeReturn::Ok
    });
    let bus = pipeline
        .bus()
        .ok_or_else(|| MediaError::Build { pipeline: context.into(), reason: "the pipeline has no bus".into() })?;
    let started = Instant::now();
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        let _ = pipeline.set_state(gst::State::Null);
        return Err(MediaError::Start { pipeline: context.into(), reason: e.to_string() });
    }
    let mut error = None;
    while let Some(left) = duration.checked_sub(started.elapsed()).filter(|_| !stop.load(Ordering::Relaxed)) {
        let wait = gst::ClockTime::from_mseconds(left.as_millis().min(200) as u64);
        let Some(message) = bus.timed_pop_filtered(wait, &[gst::MessageType::Error, gst::MessageType::Eos]) else {
            continue;
        };
        if let gst::MessageView::Error(e) = message.view() {
            error = Some(describe_error(e));
        }
        break;
    }
    let _ = pipeline.set_state(gst::State::Null);
    Ok(RtspWatch {
        first_frame_ms: first.get().map(|t| t.saturating_duration_since(started).as_secs_f64() * 1e3),
        frames_decoded: frames.load(Ordering::Relaxed),
        error,
    })
}
