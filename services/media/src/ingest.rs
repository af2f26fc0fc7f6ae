//! Live input: what a publisher (an encoder, OBS, ffmpeg) pushes to a
//! server, turned into the overlay's own RTP (H.264 with [`VIDEO_PT`],
//! Opus with [`AUDIO_PT`], the stream's SSRCs) and handed to the caller
//! packet by packet, as a [`StreamSource`] does for files.
//!
//! Two inputs: RTP tracks described by an SDP (RTSP ANNOUNCE/RECORD), or
//! an MPEG transport stream (SRT). H.264 is only re-packetised, never
//! re-encoded; AAC is decoded and encoded as Opus (browsers need Opus);
//! Opus passes through. Anything else is refused, by [`Codec::from_rtp`]
//! before a pipeline exists for RTP, and by the demuxer's pad for a
//! transport stream (the ingest then reports the error).
//!
//! Capture time (in the sender reports, for glass-to-glass and lip sync)
//! is the arrival of the media at the server: input buffers are stamped
//! with the pipeline clock as they come in, RTP tracks go through a jitter
//! buffer that keeps the publisher's timing (B-frames stay in order), and
//! packets leave as soon as they are made.

use std::sync::{Arc, Mutex};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tracing::{error, info};

use crate::source::{build_error, lock, make, packet_callbacks, PacketSink, StreamSource, RTP_MTU};
use crate::{init, stream_ssrcs, MediaError, AUDIO_PT, VIDEO_PT};
pub use overlay_core::codec::{Codec, RtpTrack};

/// Most bytes waiting in an input; beyond it the oldest are dropped (a
/// pipeline that cannot keep up must not grow without bound).
const INPUT_BYTES: u64 = 4 * 1024 * 1024;
/// How long the jitter buffer of an RTP track holds packets to reorder
/// them (TCP never reorders; UDP on a LAN hardly does).
const JITTER_MS: u32 = 60;

/// The caps of a track's RTP packets, as GStreamer's depayloaders expect
/// them (fmtp parameters as lower-case string fields).
fn caps(track: &RtpTrack) -> gst::Caps {
    let media = if track.codec.is_video() { "video" } else { "audio" };
    let mut s = gst::Structure::builder("application/x-rtp")
        .field("media", media)
        .field("encoding-name", track.codec.encoding_name())
        .field("clock-rate", track.clock_rate as i32)
        .field("payload", i32::from(track.payload_type))
        .build();
    if let Some(channels) = track.channels {
        s.set("encoding-params", channels.to_string());
    }
    for (key, value) in &track.fmtp {
        let key = key.to_ascii_lowercase();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            s.set(key.as_str(), value.as_str());
        }
    }
    gst::Caps::builder_full().structure(s).build()
}

/// A running ingest; see the module doc. Dropping it stops the pipeline.
pub struct Ingest {
    source: StreamSource,
    inputs: Vec<gst_app::AppSrc>,
    /// Set by the transport stream's demuxer when it finds media it cannot
    /// take (the bus error may come later).
    refused: Arc<Mutex<Option<String>>>,
}

impl Ingest {
    /// An ingest of RTP `tracks` (at most one video and one audio; checked
    /// by the caller): input `i` takes the packets of track `i`.
    pub fn rtp(
        stream: &str,
        tracks: &[RtpTrack],
        on_packet: impl Fn(&[u8]) + Send + Sync + 'static,
    ) -> Result<Ingest, MediaError> {
        init()?;
        let context = format!("stream {stream}");
        let on_packet: PacketSink = Arc::new(on_packet);
        let pipeline = gst::Pipeline::with_name(&format!("ingest-{stream}"));
        let ssrcs = stream_ssrcs(stream);
        let mut inputs = Vec::new();
        for (i, track) in tracks.iter().enumerate() {
            let input = input(&format!("in{i}"), caps(track));
            let jitter = make(&context, "rtpjitterbuffer")?;
            jitter.set_property("latency", JITTER_MS);
            let depay = make(
                &context,
                match track.codec {
                    Codec::H264 => "rtph264depay",
                    Codec::AacGeneric => "rtpmp4gdepay",
                    Codec::AacLatm => "rtpmp4adepay",
                    Codec::Opus => "rtpopusdepay",
                },
            )?;
            let mut chain = vec![input.clone().upcast::<gst::Element>(), jitter, depay];
            chain.extend(tail(&context, track.codec, ssrcs, &on_packet)?);
            pipeline.add_many(&chain).map_err(|e| build_error(&context, e))?;
            gst::Element::link_many(&chain).map_err(|e| build_error(&context, e))?;
            inputs.push(input);
        }
        let source = StreamSource::running(stream, pipeline)?;
        info!(stream, tracks = ?tracks.iter().map(|t| t.codec).collect::<Vec<_>>(), "RTP ingest started");
        Ok(Ingest { source, inputs, refused: Arc::new(Mutex::new(None)) })
    }

    /// An ingest of an MPEG transport stream (input 0): its first H.264
    /// and its first AAC or Opus stream are taken.
    pub fn mpegts(stream: &str, on_packet: impl Fn(&[u8]) + Send + Sync + 'static) -> Result<Ingest, MediaError> {
        init()?;
        let context = format!("stream {stream}");
        let on_packet: PacketSink = Arc::new(on_packet);
        let pipeline = gst::Pipeline::with_name(&format!("ingest-{stream}"));
        let caps = gst::Caps::builder("video/mpegts").field("systemstream", true).field("packetsize", 188i32).build();
        let input = input("in0", caps);
        let demux = make(&context, "tsdemux")?;
        pipeline.add_many([input.upcast_ref::<gst::Element>(), &demux]).map_err(|e| build_error(&context, e))?;
        input.link(&demux).map_err(|e| build_error(&context, e))?;
        let refused = Arc::new(Mutex::new(None));
        let branches = TsBranches {
            context,
            ssrcs: stream_ssrcs(stream),
            on_packet,
            taken: Mutex::new((false, false)),
            refused: refused.clone(),
        };
        let weak = pipeline.downgrade();
        demux.connect_pad_added(move |_, pad| {
            let Some(pipeline) = weak.upgrade() else { return };
            if let Err(e) = branches.link(&pipeline, pad) {
                error!("{e}");
                let message =
                    gst::message::Error::builder(gst::CoreError::Negotiation, &e.to_string()).src(&pipeline).build();
                let _ = pipeline.post_message(message);
            }
        });
        let source = StreamSource::running(stream, pipeline)?;
        info!(stream, "MPEG-TS ingest started");
        Ok(Ingest { source, inputs: vec![input], refused })
    }

    /// Feeds `bytes` to input `input` (an RTP packet of that track, or a
    /// piece of the transport stream). False once the ingest failed or
    /// stopped: the publisher should be dropped.
    pub fn push(&self, input: usize, bytes: &[u8]) -> bool {
        let Some(src) = self.inputs.get(input) else { return true };
        src.push_buffer(gst::Buffer::from_slice(bytes.to_vec())).is_ok() && self.error().is_none()
    }

    /// Why the ingest failed, if it did: media it does not take, or a
    /// pipeline error.
    pub fn error(&self) -> Option<String> {
        lock(&self.refused).clone().or_else(|| self.source.error())
    }

    /// Stops the pipeline.
    pub fn stop(self) {
        self.source.stop();
    }

    /// The element factories in the pipeline (tests: whether video is
    /// re-encoded shows as `x264enc`, audio transcoding as `avdec_aac`).
    pub fn element_factories(&self) -> Vec<String> {
        self.source.element_factories()
    }
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("stream", &self.source.stream()).finish_non_exhaustive()
    }
}

/// A live, time-stamping input of bounded size.
fn input(name: &str, caps: gst::Caps) -> gst_app::AppSrc {
    let src = gst_app::AppSrc::builder()
        .name(name)
        .caps(&caps)
        .is_live(true)
        .format(gst::Format::Time)
        .do_timestamp(true)
        .max_bytes(INPUT_BYTES)
        .block(false)
        .build();
    src.set_property_from_str("leaky-type", "downstream");
    src
}

/// From elementary media of `codec` to our RTP: a parser, for AAC a
/// transcode to Opus, the payloader and the packet sink.
fn tail(context: &str, codec: Codec, ssrcs: [u32; 2], on_packet: &PacketSink) -> Result<Vec<gst::Element>, MediaError> {
    let mut chain = Vec::new();
    match codec {
        Codec::H264 => {
            chain.push(make(context, "h264parse")?);
            let pay = make(context, "rtph264pay")?;
            pay.set_property("config-interval", -1i32);
            pay.set_property("pt", u32::from(VIDEO_PT));
            pay.set_property("ssrc", ssrcs[0]);
            pay.set_property("mtu", RTP_MTU);
            chain.push(pay);
        }
        Codec::AacGeneric | Codec::AacLatm | Codec::Opus => {
            if codec == Codec::Opus {
                chain.push(make(context, "opusparse")?);
            } else {
                chain.push(make(context, "aacparse")?);
                chain.push(make(context, "avdec_aac")?);
                chain.push(make(context, "audioconvert")?);
                chain.push(make(context, "audioresample")?);
                let caps: gst::Caps = gst::Caps::builder("audio/x-raw").field("rate", 48_000i32).build();
                chain.push(
                    gst::ElementFactory::make("capsfilter").property("caps", caps).build().map_err(|_| {
                        MediaError::Element { pipeline: context.to_owned(), element: "capsfilter".into() }
                    })?,
                );
                let encoder = make(context, "opusenc")?;
                encoder.set_property("bitrate", 64_000i32);
                chain.push(encoder);
            }
            let pay = make(context, "rtpopuspay")?;
            pay.set_property("pt", u32::from(AUDIO_PT));
            pay.set_property("ssrc", ssrcs[1]);
            pay.set_property("mtu", RTP_MTU);
            chain.push(pay);
        }
    }
    chain.push(gst_app::AppSink::builder().sync(false).callbacks(packet_callbacks(on_packet.clone())).build().upcast());
    Ok(chain)
}

/// Links each stream the transport stream's demuxer finds.
struct TsBranches {
    context: String,
    ssrcs: [u32; 2],
    on_packet: PacketSink,
    /// Video, audio taken so far.
    taken: Mutex<(bool, bool)>,
    refused: Arc<Mutex<Option<String>>>,
}

impl TsBranches {
    fn link(&self, pipeline: &gst::Pipeline, pad: &gst::Pad) -> Result<(), MediaError> {
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let Some(s) = caps.structure(0) else { return Ok(()) };
        let name = s.name().to_string();
        let codec = match name.as_str() {
            "video/x-h264" => Some(Codec::H264),
            "audio/mpeg" if s.get::<i32>("mpegversion").is_ok_and(|v| v == 2 || v == 4) => Some(Codec::AacGeneric),
            "audio/x-opus" => Some(Codec::Opus),
            _ => None,
        };
        let mut taken = lock(&self.taken);
        let chain = match codec {
            Some(c) if c.is_video() && !taken.0 => {
                taken.0 = true;
                tail(&self.context, c, self.ssrcs, &self.on_packet)?
            }
            Some(c) if !c.is_video() && !taken.1 => {
                taken.1 = true;
                tail(&self.context, c, self.ssrcs, &self.on_packet)?
            }
            None if name.starts_with("video/") || name.starts_with("audio/") => {
                let reason = format!("{name} is not taken: publish H.264 video and AAC or Opus sound");
                lock(&self.refused).get_or_insert(reason.clone());
                return Err(MediaError::Build { pipeline: self.context.clone(), reason });
            }
            // A second video or audio stream, subtitles, data: discarded.
            _ => {
                let sink = make(&self.context, "fakesink")?;
                sink.set_property("sync", false);
                sink.set_property("async", false);
                vec![sink]
            }
        };
        drop(taken);
        let mut elements = Vec::with_capacity(chain.len() + 1);
        let queue = make(&self.context, "queue")?;
        elements.push(queue);
        elements.extend(chain);
        pipeline.add_many(&elements).map_err(|e| build_error(&self.context, e))?;
        gst::Element::link_many(&elements).map_err(|e| build_error(&self.context, e))?;
        for element in elements.iter().rev() {
            element.sync_state_with_parent().map_err(|e| build_error(&self.context, e))?;
        }
        let sink = elements[0].static_pad("sink").expect("a queue has a sink pad");
        pad.link(&sink).map_err(|e| MediaError::Build {
            pipeline: self.context.clone(),
            reason: format!("linking the transport stream's {name}: {e:?}"),
        })?;
        Ok(())
    }
}
