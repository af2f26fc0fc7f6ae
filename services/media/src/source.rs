//! The server side: a live pipeline per stream that produces RTP packets
//! (H.264 video with [`VIDEO_PT`], Opus audio with [`AUDIO_PT`], SSRCs from
//! [`stream_ssrcs`]) and hands each one to the caller, who sends it into
//! the overlay.
//!
//! The test stream is generated live. A file is played in real time
//! (appsinks synchronise to the clock) and looped with segment seeks: each
//! loop is a new segment appended to the previous one without a flush, so
//! running time, and with it the RTP timestamps, keeps increasing; a
//! `LoopClock` makes each loop start exactly where the previous loop's
//! media ended, which demuxers do not reliably do by themselves. Files
//! whose demuxer refuses segment seeks (MPEG-TS) restart with a flushing
//! seek at each end of stream instead, with the pipeline's start time
//! unset so that running time still goes on. H.264 video and Opus audio
//! are passed through; anything else is decoded and encoded.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tracing::{debug, error, info, warn};

use crate::{init, stream_ssrcs, MediaError, SourceSpec, AUDIO_PT, VIDEO_PT};

/// Largest RTP packet the payloaders make, headers included.
pub(crate) const RTP_MTU: u32 = 1200;
/// How long a file may take to open and preroll.
const PREROLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Caps at which decodebin stops: what we pass through, and raw media.
const DECODE_STOP_CAPS: &str = "video/x-h264; audio/x-opus; video/x-raw(ANY); audio/x-raw(ANY)";
/// Demuxers that refuse segment seeks (mpegtsbase: "seek flags 0x9 are not
/// supported"); files they read loop with a flushing seek at end of stream.
const NO_SEGMENT_SEEKS: &[&str] = &["tsdemux"];
/// Name of the application message that wakes the bus watcher to stop.
const STOP_MESSAGE: &str = "media-stop";

pub(crate) type PacketSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A running server pipeline for one stream; see the module doc. Stopping
/// it (or dropping it) sets the pipeline to NULL; no packet is delivered
/// after that returns.
pub struct StreamSource {
    stream: String,
    pipeline: gst::Pipeline,
    stopping: Arc<AtomicBool>,
    first_error: Arc<Mutex<Option<String>>>,
    watcher: Option<JoinHandle<()>>,
}

impl StreamSource {
    /// Builds and starts the pipeline of `stream`. Each RTP packet it
    /// produces is passed to `on_packet` from a GStreamer streaming thread
    /// (video and audio from two different threads, possibly at once), so
    /// `on_packet` must be quick. For a file, returns once it is open and
    /// prerolled, with an error naming the file if it cannot be played.
    pub fn start(
        stream: &str,
        spec: &SourceSpec,
        on_packet: impl Fn(&[u8]) + Send + Sync + 'static,
    ) -> Result<Self, MediaError> {
        init()?;
        let on_packet: PacketSink = Arc::new(on_packet);
        let context = format!("stream {stream}");
        let (pipeline, loop_clock) = match spec {
            SourceSpec::Test => (test_pipeline(stream, &on_packet)?, None),
            SourceSpec::File(path) => {
                let (pipeline, clock) = file_pipeline(stream, path, &on_packet)?;
                (pipeline, Some(clock))
            }
        };
        let mut source = StreamSource {
            stream: stream.to_owned(),
            pipeline,
            stopping: Arc::new(AtomicBool::new(false)),
            first_error: Arc::new(Mutex::new(None)),
            watcher: None,
        };
        // On an error below, dropping `source` sets the pipeline to NULL.
        if let (Some(clock), SourceSpec::File(path)) = (&loop_clock, spec) {
            source.preroll(&context)?;
            if !has_output(&source.pipeline) {
                return Err(MediaError::NoMedia { stream: stream.to_owned(), file: path.clone() });
            }
            let segment_seeks = !lock(clock).no_segment_seeks;
            let from_start = if segment_seeks {
                source.pipeline.seek(
                    1.0,
                    gst::SeekFlags::FLUSH | gst::SeekFlags::SEGMENT,
                    gst::SeekType::Set,
                    gst::ClockTime::ZERO,
                    gst::SeekType::None,
                    gst::ClockTime::NONE,
                )
            } else {
                Ok(())
            };
            if let Err(e) = from_start {
                // Loops will restart at the end of the stream, with a flush.
                warn!(stream, "the file does not support segment seeks: {e}");
                if let Err(e) = source.pipeline.seek_simple(gst::SeekFlags::FLUSH, gst::ClockTime::ZERO) {
                    warn!(stream, "the file is not seekable, it will play once: {e}");
                }
            }
        }
        source.play(loop_clock)?;
        info!(stream, ?spec, "stream source started");
        Ok(source)
    }

    /// Starts a pipeline built elsewhere in this crate (a live ingest):
    /// PLAYING, with its bus followed for errors.
    pub(crate) fn running(stream: &str, pipeline: gst::Pipeline) -> Result<Self, MediaError> {
        let mut source = StreamSource {
            stream: stream.to_owned(),
            pipeline,
            stopping: Arc::new(AtomicBool::new(false)),
            first_error: Arc::new(Mutex::new(None)),
            watcher: None,
        };
        source.play(None)?;
        Ok(source)
    }

    /// Sets the pipeline PLAYING and follows its bus (looping a file when
    /// given its loop clock).
    fn play(&mut self, loop_clock: Option<Arc<Mutex<LoopClock>>>) -> Result<(), MediaError> {
        if let Err(e) = self.pipeline.set_state(gst::State::Playing) {
            return Err(MediaError::Start {
                pipeline: format!("stream {}", self.stream),
                reason: bus_error(&self.pipeline).unwrap_or_else(|| e.to_string()),
            });
        }
        self.watcher = Some(spawn_watcher(
            self.stream.clone(),
            self.pipeline.clone(),
            self.stopping.clone(),
            self.first_error.clone(),
            loop_clock,
        )?);
        Ok(())
    }

    /// The stream this source plays.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The first error the pipeline reported since it started, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.first_error).clone()
    }

    /// The names of the element factories in the pipeline (for diagnostics
    /// and tests: whether a file is re-encoded shows as `x264enc`).
    pub fn element_factories(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .pipeline
            .iterate_recurse()
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|element| element.factory())
            .map(|factory| factory.name().to_string())
            .collect();
        names.sort();
        names
    }

    /// Stops the pipeline and releases it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(bus) = self.pipeline.bus() {
            let wake = gst::message::Application::new(gst::Structure::new_empty(STOP_MESSAGE));
            // A flushing bus refuses the message; the watcher polls anyway.
            let _ = bus.post(wake);
        }
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
        if let Err(e) = self.pipeline.set_state(gst::State::Null) {
            warn!(stream = self.stream, "setting the pipeline to NULL: {e}");
        }
        info!(stream = self.stream, "stream source stopped");
    }

    /// Brings a file pipeline to PAUSED so that its streams are known.
    fn preroll(&self, context: &str) -> Result<(), MediaError> {
        let start_error = |reason: String| MediaError::Start { pipeline: context.to_owned(), reason };
        if let Err(e) = self.pipeline.set_state(gst::State::Paused) {
            return Err(start_error(bus_error(&self.pipeline).unwrap_or_else(|| e.to_string())));
        }
        let (result, state, _) = self.pipeline.state(gst::ClockTime::from_nseconds(PREROLL_TIMEOUT.as_nanos() as u64));
        match result {
            Ok(_) if state == gst::State::Paused => Ok(()),
            Ok(_) => Err(start_error(format!("did not preroll within {} s", PREROLL_TIMEOUT.as_secs()))),
            Err(e) => Err(start_error(bus_error(&self.pipeline).unwrap_or_else(|| e.to_string()))),
        }
    }
}

impl Drop for StreamSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource").field("stream", &self.stream).finish_non_exhaustive()
    }
}

/// The built-in test stream: a moving ball with the stream name and a
/// clock, and a 440 Hz tone. Live is live: when the overlay and encoder
/// cannot keep up (a busy machine), the queue after the camera drops the
/// oldest frames instead of letting a backlog (and the latency) grow.
fn test_pipeline(stream: &str, on_packet: &PacketSink) -> Result<gst::Pipeline, MediaError> {
    let description = format!(
        "videotestsrc is-live=true pattern=ball \
           ! video/x-raw,format=I420,width=640,height=360,framerate=30/1 \
           ! queue name=live_drop leaky=downstream max-size-buffers=2 max-size-bytes=0 max-size-time=0 \
           ! timeoverlay name=clock halignment=left valignment=top \
           ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bitrate=1000 threads=1 \
           ! rtph264pay name=video_pay config-interval=-1 pt={VIDEO_PT} mtu={RTP_MTU} \
           ! appsink name=video_out sync=false \
         audiotestsrc is-live=true wave=sine freq=440 volume=0.2 \
           ! audioconvert ! audioresample ! audio/x-raw,rate=48000,channels=2 \
           ! opusenc bitrate=64000 \
           ! rtpopuspay name=audio_pay pt={AUDIO_PT} mtu={RTP_MTU} \
           ! appsink name=audio_out sync=false"
    );
    let pipeline = launch(&format!("stream {stream}"), &description)?;
    let [video_ssrc, audio_ssrc] = stream_ssrcs(stream);
    let by_name = |name: &str| {
        pipeline.by_name(name).ok_or_else(|| MediaError::Build {
            pipeline: format!("stream {stream}"),
            reason: format!("no element named {name}"),
        })
    };
    by_name("clock")?.set_property("text", format!("{stream} "));
    by_name("clock")?.set_property("font-desc", "Sans 24");
    by_name("video_pay")?.set_property("ssrc", video_ssrc);
    by_name("audio_pay")?.set_property("ssrc", audio_ssrc);
    for name in ["video_out", "audio_out"] {
        let sink = by_name(name)?.downcast::<gst_app::AppSink>().map_err(|_| MediaError::Build {
            pipeline: format!("stream {stream}"),
            reason: format!("{name} is not an appsink"),
        })?;
        sink.set_callbacks(packet_callbacks(on_packet.clone()));
    }
    Ok(pipeline)
}

/// A file: filesrc → decodebin, which stops at H.264, Opus or raw media;
/// each stream found is linked to its branch as it appears.
fn file_pipeline(
    stream: &str,
    path: &Path,
    on_packet: &PacketSink,
) -> Result<(gst::Pipeline, Arc<Mutex<LoopClock>>), MediaError> {
    let context = format!("stream {stream}");
    let pipeline = gst::Pipeline::with_name(&format!("source-{stream}"));
    let filesrc = make(&context, "filesrc")?;
    filesrc.set_property("location", path.to_string_lossy().as_ref());
    let decodebin = make(&context, "decodebin")?;
    let stop_caps = DECODE_STOP_CAPS
        .parse::<gst::Caps>()
        .map_err(|e| MediaError::Build { pipeline: context.clone(), reason: format!("decodebin caps: {e}") })?;
    decodebin.set_property("caps", &stop_caps);
    pipeline.add_many([&filesrc, &decodebin]).map_err(|e| build_error(&context, e))?;
    filesrc.link(&decodebin).map_err(|e| build_error(&context, e))?;

    // Loops are rebased where one thread carries every stream in order:
    // at the demuxer's source pads (or, for a file without a demuxer, at
    // the one stream decodebin exposes).
    let loop_clock = Arc::new(Mutex::new(LoopClock::default()));
    let demuxer_clock = loop_clock.clone();
    pipeline.connect_deep_element_added(move |_, _, element| {
        let Some(factory) = element.factory() else {
            return;
        };
        if !factory.klass().contains("Demux") {
            return;
        }
        {
            let mut clock = lock(&demuxer_clock);
            if std::mem::replace(&mut clock.demuxed, true) {
                return;
            }
            clock.no_segment_seeks = NO_SEGMENT_SEEKS.contains(&factory.name().as_str());
        }
        let clock = demuxer_clock.clone();
        element.connect_pad_added(move |_, pad| {
            if pad.direction() == gst::PadDirection::Src {
                LoopClock::watch(&clock, pad);
            }
        });
    });

    let branches = FileBranches {
        context,
        file: path.display().to_string(),
        ssrcs: stream_ssrcs(stream),
        on_packet: on_packet.clone(),
        linked: Mutex::new(Linked::default()),
        loop_clock: loop_clock.clone(),
    };
    let weak_pipeline = pipeline.downgrade();
    decodebin.connect_pad_added(move |_, pad| {
        let Some(pipeline) = weak_pipeline.upgrade() else {
            return;
        };
        if let Err(e) = branches.link(&pipeline, pad) {
            error!(file = branches.file, "{e}");
            let message =
                gst::message::Error::builder(gst::CoreError::Negotiation, &e.to_string()).src(&pipeline).build();
            let _ = pipeline.post_message(message);
        }
    });
    Ok((pipeline, loop_clock))
}

/// What the decodebin of a file pipeline has been linked to so far.
#[derive(Default)]
struct Linked {
    video: bool,
    audio: bool,
}

/// Builds the branch for each stream decodebin exposes: the first video
/// and the first audio stream are sent, any other is discarded.
struct FileBranches {
    context: String,
    file: String,
    ssrcs: [u32; 2],
    on_packet: PacketSink,
    linked: Mutex<Linked>,
    loop_clock: Arc<Mutex<LoopClock>>,
}

impl FileBranches {
    fn link(&self, pipeline: &gst::Pipeline, pad: &gst::Pad) -> Result<(), MediaError> {
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let media = caps.structure(0).map(|s| s.name().to_string()).unwrap_or_default();
        let mut linked = lock(&self.linked);
        let chain = match media.as_str() {
            "video/x-h264" if !linked.video => {
                linked.video = true;
                let mut chain = vec![self.make("h264parse")?];
                let structure = caps.structure(0);
                let profile = structure.and_then(|s| s.get::<&str>("profile").ok());
                let codec_data = structure.and_then(|s| s.get::<gst::Buffer>("codec_data").ok());
                let codec_data = codec_data.as_ref().and_then(|b| b.map_readable().ok());
                if !browser_safe_h264(profile, codec_data.as_deref()) {
                    // Browsers' WebRTC takes baseline and main only: such a
                    // file is re-encoded here, once, not at every POP.
                    info!(file = self.file, profile, "H.264 profile browsers do not take: re-encoding");
                    chain.extend([
                        self.make("avdec_h264")?,
                        self.make("videoconvert")?,
                        self.make("videoscale")?,
                        self.capsfilter("video/x-raw,format=I420,width=640,height=360,pixel-aspect-ratio=1/1")?,
                        x264enc(&self.context)?,
                    ]);
                }
                chain.extend(self.video_rtp()?);
                chain
            }
            "video/x-raw" if !linked.video => {
                linked.video = true;
                let mut chain = vec![
                    self.make("videoconvert")?,
                    self.make("videoscale")?,
                    self.capsfilter("video/x-raw,format=I420,width=640,height=360,pixel-aspect-ratio=1/1")?,
                    x264enc(&self.context)?,
                ];
                chain.extend(self.video_rtp()?);
                chain
            }
            "audio/x-opus" if !linked.audio => {
                linked.audio = true;
                let mut chain = vec![self.make("opusparse")?];
                chain.extend(self.audio_rtp()?);
                chain
            }
            "audio/x-raw" if !linked.audio => {
                linked.audio = true;
                let mut chain = vec![
                    self.make("audioconvert")?,
                    self.make("audioresample")?,
                    self.capsfilter("audio/x-raw,rate=48000")?,
                    self.make("opusenc")?,
                ];
                chain.extend(self.audio_rtp()?);
                chain
            }
            _ => {
                let sink = self.make("fakesink")?;
                sink.set_property("sync", false);
                sink.set_property("async", false);
                vec![sink]
            }
        };
        drop(linked);
        debug!(file = self.file, media, "linking stream");
        pipeline.add_many(&chain).map_err(|e| build_error(&self.context, e))?;
        gst::Element::link_many(&chain).map_err(|e| build_error(&self.context, e))?;
        for element in chain.iter().rev() {
            element.sync_state_with_parent().map_err(|e| build_error(&self.context, e))?;
        }
        let sink_pad = chain[0].static_pad("sink").ok_or_else(|| MediaError::Build {
            pipeline: self.context.clone(),
            reason: format!("{} has no sink pad", chain[0].name()),
        })?;
        pad.link(&sink_pad).map_err(|e| MediaError::Build {
            pipeline: self.context.clone(),
            reason: format!("file {}: linking its {media} stream: {e:?}", self.file),
        })?;
        if !lock(&self.loop_clock).demuxed {
            LoopClock::watch(&self.loop_clock, pad);
        }
        Ok(())
    }

    fn video_rtp(&self) -> Result<[gst::Element; 2], MediaError> {
        let pay = self.make("rtph264pay")?;
        pay.set_property("config-interval", -1i32);
        pay.set_property("pt", u32::from(VIDEO_PT));
        pay.set_property("ssrc", self.ssrcs[0]);
        pay.set_property("mtu", RTP_MTU);
        Ok([pay, self.appsink("video_out")])
    }

    fn audio_rtp(&self) -> Result<[gst::Element; 2], MediaError> {
        let pay = self.make("rtpopuspay")?;
        pay.set_property("pt", u32::from(AUDIO_PT));
        pay.set_property("ssrc", self.ssrcs[1]);
        pay.set_property("mtu", RTP_MTU);
        Ok([pay, self.appsink("audio_out")])
    }

    /// An appsink that plays in real time and hands packets to the caller.
    fn appsink(&self, name: &str) -> gst::Element {
        gst_app::AppSink::builder()
            .name(name)
            .sync(true)
            .callbacks(packet_callbacks(self.on_packet.clone()))
            .build()
            .upcast()
    }

    fn capsfilter(&self, caps: &str) -> Result<gst::Element, MediaError> {
        let caps = caps
            .parse::<gst::Caps>()
            .map_err(|e| MediaError::Build { pipeline: self.context.clone(), reason: format!("caps {caps}: {e}") })?;
        gst::ElementFactory::make("capsfilter")
            .property("caps", caps)
            .build()
            .map_err(|_| element_error(&self.context, "capsfilter"))
    }

    fn make(&self, factory: &str) -> Result<gst::Element, MediaError> {
        make(&self.context, factory)
    }
}

/// Keeps the loops of a file back to back in running time. After a
/// segment seek the demuxer starts the next loop at its own idea of where
/// the previous one ended: often the start of the last frame rather than
/// its end (then the last frame of one loop and the first of the next share
/// a timestamp, which decoders and muxers mishandle), and for some demuxers
/// (oggdemux) somewhere later (a gap, frozen output). Watching every
/// stream, this gives each loop's segments (all streams alike, so they stay
/// in sync) a base at the latest end of any media of the previous loop.
#[derive(Default)]
struct LoopClock {
    /// A demuxer was found; its pads are watched.
    demuxed: bool,
    /// The demuxer refuses segment seeks (and a failed one can wedge the
    /// pipeline), so loops restart at the end of stream instead.
    no_segment_seeks: bool,
    /// Flushes no longer restart running time (the pipeline's start time
    /// is unset), so loops after a flush continue from `end` too.
    continuous: bool,
    /// Sequence number of the current loop's segments (from its seek).
    loop_seqnum: Option<gst::Seqnum>,
    /// For every loop but the first: the base the demuxer gave the loop's
    /// first segment, and the base it gets instead.
    rebase: Option<(gst::ClockTime, gst::ClockTime)>,
    /// The latest running time at which any media pushed so far ends.
    end: gst::ClockTime,
    /// Each watched pad's (rebased) segment and last buffer start.
    pads: Vec<WatchedPad>,
}

struct WatchedPad {
    pad: gst::Pad,
    segment: gst::FormattedSegment<gst::ClockTime>,
    last_start: Option<gst::ClockTime>,
}

impl LoopClock {
    fn watch(clock: &Arc<Mutex<LoopClock>>, pad: &gst::Pad) {
        let clock = clock.clone();
        pad.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM | gst::PadProbeType::EVENT_FLUSH,
            move |pad, info| {
                let mut clock = lock(&clock);
                match &mut info.data {
                    Some(gst::PadProbeData::Buffer(buffer)) => clock.on_buffer(pad, buffer),
                    Some(gst::PadProbeData::Event(event)) => {
                        if let Some(rebased) = clock.on_event(pad, event) {
                            *event = rebased;
                        }
                    }
                    _ => {}
                }
                gst::PadProbeReturn::Ok
            },
        );
    }

    /// Returns the event to push instead, for a segment that is rebased.
    fn on_event(&mut self, pad: &gst::Pad, event: &gst::Event) -> Option<gst::Event> {
        let segment = match event.view() {
            gst::EventView::FlushStop(_) if !self.continuous => {
                // Running time starts again from zero.
                *self = LoopClock {
                    demuxed: self.demuxed,
                    no_segment_seeks: self.no_segment_seeks,
                    ..LoopClock::default()
                };
                return None;
            }
            gst::EventView::Segment(s) => s.segment().downcast_ref::<gst::ClockTime>()?.clone(),
            _ => return None,
        };
        let seqnum = event.seqnum();
        let base = segment.base().unwrap_or(gst::ClockTime::ZERO);
        if self.loop_seqnum != Some(seqnum) {
            if self.loop_seqnum.is_some() {
                self.rebase = Some((base, self.end));
            }
            self.loop_seqnum = Some(seqnum);
        }
        let mut rebased = segment;
        if let Some((demuxer_base, loop_base)) = self.rebase {
            rebased.set_base(loop_base + base.saturating_sub(demuxer_base));
        }
        let changed = rebased.base() != Some(base);
        match self.pads.iter_mut().find(|p| &p.pad == pad) {
            Some(watched) => watched.segment = rebased.clone(),
            None => self.pads.push(WatchedPad { pad: pad.clone(), segment: rebased.clone(), last_start: None }),
        }
        changed.then(|| gst::event::Segment::builder(&rebased).seqnum(seqnum).build())
    }

    /// Moves `end` past this buffer; a buffer without a duration is taken
    /// to last as long as the gap since the pad's previous buffer.
    fn on_buffer(&mut self, pad: &gst::Pad, buffer: &gst::Buffer) {
        let Some(watched) = self.pads.iter_mut().find(|p| &p.pad == pad) else {
            return;
        };
        let Some(start) = buffer.pts().or(buffer.dts()) else {
            return;
        };
        let duration = buffer
            .duration()
            .or_else(|| watched.last_start.and_then(|last| start.checked_sub(last)))
            .unwrap_or(gst::ClockTime::ZERO);
        watched.last_start = Some(start);
        if let Some(running) = watched.segment.to_running_time(start) {
            self.end = self.end.max(running + duration);
        }
    }
}

/// Whether H.264 of this profile (the caps' `profile`, else the avcC
/// `codec_data`'s profile_idc) is one every browser's WebRTC takes:
/// constrained baseline, baseline or main (Chromium offers 42001f, 42e01f
/// and 4d001f). Unknown counts as safe.
pub fn browser_safe_h264(profile: Option<&str>, codec_data: Option<&[u8]>) -> bool {
    match (profile, codec_data) {
        (Some(p), _) => matches!(p, "constrained-baseline" | "baseline" | "main"),
        (None, Some([_, profile_idc, ..])) => matches!(profile_idc, 66 | 77),
        _ => true,
    }
}

/// Our H.264 encoder settings: low latency, a keyframe every second at
/// 30 frames per second, about 1 Mbit/s.
fn x264enc(context: &str) -> Result<gst::Element, MediaError> {
    let encoder = make(context, "x264enc")?;
    encoder.set_property_from_str("tune", "zerolatency");
    encoder.set_property_from_str("speed-preset", "ultrafast");
    encoder.set_property("key-int-max", 30u32);
    encoder.set_property("bitrate", 1000u32);
    // One slice per picture: with sliced threads rtph264pay puts the SPS
    // and PPS before each IDR slice, in the middle of the access unit, and
    // ffmpeg's parser then splits every keyframe in two (half concealed).
    encoder.set_property("threads", 1u32);
    Ok(encoder)
}

pub(crate) fn packet_callbacks(on_packet: PacketSink) -> gst_app::AppSinkCallbacks {
    let reports = Mutex::new(ReportClock::default());
    gst_app::AppSinkCallbacks::builder()
        .new_sample(move |sink| {
            let sample = sink.pull_sample().map_err(|_| gst::FlowError::Flushing)?;
            if let Some(buffer) = sample.buffer() {
                match buffer.map_readable() {
                    Ok(bytes) => {
                        on_packet(&bytes);
                        let capture = buffer.pts().and_then(|pts| capture_unix_secs(sink, &sample, pts));
                        let report = lock(&reports).on_packet(&bytes, capture);
                        if let Some(report) = report {
                            on_packet(&report);
                        }
                    }
                    Err(e) => warn!("unreadable RTP buffer: {e}"),
                }
            }
            Ok(gst::FlowSuccess::Ok)
        })
        .build()
}

/// RTCP sender reports for one SSRC: one a second, mapping the RTP
/// timestamp of the packet just sent to the wall-clock time its media was
/// captured (what clients use for lip sync and glass-to-glass latency).
#[derive(Default)]
struct ReportClock {
    last: Option<std::time::Instant>,
    packets: u32,
    octets: u32,
}

impl ReportClock {
    fn on_packet(&mut self, bytes: &[u8], capture_unix_secs: Option<f64>) -> Option<[u8; 28]> {
        let packet = overlay_core::rtp::Packet::parse(bytes).ok()?;
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(bytes.len() as u32);
        if self.last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1)) {
            return None;
        }
        let capture = capture_unix_secs?;
        self.last = Some(std::time::Instant::now());
        Some(overlay_core::rtp::sender_report(packet.ssrc(), capture, packet.timestamp(), self.packets, self.octets))
    }
}

/// Wall-clock time (Unix seconds) at which the media of a buffer with
/// this PTS was captured: its running time on the pipeline clock, moved to
/// the wall clock by how long ago that was.
fn capture_unix_secs(sink: &gst_app::AppSink, sample: &gst::Sample, pts: gst::ClockTime) -> Option<f64> {
    let segment = sample.segment()?.downcast_ref::<gst::ClockTime>()?;
    let running = segment.to_running_time(pts)?;
    let clock = sink.clock()?;
    let base = sink.base_time()?;
    let now = clock.time();
    let age_ns = now.nseconds() as i128 - (base.nseconds() + running.nseconds()) as i128;
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    Some(wall - age_ns as f64 / 1e9)
}

/// Whether a file pipeline linked any stream to an RTP branch.
fn has_output(pipeline: &gst::Pipeline) -> bool {
    pipeline.by_name("video_out").is_some() || pipeline.by_name("audio_out").is_some()
}

/// Follows the bus until the source stops: loops the file at each
/// segment end, and reports errors and warnings.
fn spawn_watcher(
    stream: String,
    pipeline: gst::Pipeline,
    stopping: Arc<AtomicBool>,
    first_error: Arc<Mutex<Option<String>>>,
    loop_clock: Option<Arc<Mutex<LoopClock>>>,
) -> Result<JoinHandle<()>, MediaError> {
    let looping = loop_clock.is_some();
    let context = format!("stream {stream}");
    let bus = pipeline
        .bus()
        .ok_or_else(|| MediaError::Build { pipeline: context.clone(), reason: "the pipeline has no bus".into() })?;
    std::thread::Builder::new()
        .name(format!("media-bus-{stream}"))
        .spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(200)) else {
                    continue;
                };
                match message.view() {
                    gst::MessageView::SegmentDone(_) if looping => {
                        debug!(stream, "end of file, looping");
                        let again = pipeline.seek(
                            1.0,
                            gst::SeekFlags::SEGMENT,
                            gst::SeekType::Set,
                            gst::ClockTime::ZERO,
                            gst::SeekType::None,
                            gst::ClockTime::NONE,
                        );
                        if let Err(e) = again {
                            warn!(stream, "looping the file: {e}");
                        }
                    }
                    gst::MessageView::Eos(_) => {
                        // Only when segment seeks are not supported: restart
                        // with a flush that, with the start time unset, does
                        // not restart running time; the loop clock carries on.
                        let Some(clock) = &loop_clock else { continue };
                        debug!(stream, "end of stream, restarting the file");
                        lock(clock).continuous = true;
                        pipeline.set_start_time(gst::ClockTime::NONE);
                        if let Err(e) = pipeline.seek_simple(gst::SeekFlags::FLUSH, gst::ClockTime::ZERO) {
                            warn!(stream, "restarting the file: {e}");
                        }
                    }
                    gst::MessageView::Error(e) => {
                        let text = describe_error(e);
                        error!(stream, "{text}");
                        lock(&first_error).get_or_insert(text);
                    }
                    gst::MessageView::Warning(w) => {
                        warn!(stream, "{}: {}", source_name(message.src()), w.error());
                    }
                    _ => {}
                }
            }
        })
        .map_err(|e| MediaError::Build { pipeline: context, reason: format!("starting the bus thread: {e}") })
}

/// Parses a pipeline description.
pub(crate) fn launch(context: &str, description: &str) -> Result<gst::Pipeline, MediaError> {
    let element = gst::parse::launch(description).map_err(|e| match e.kind::<gst::ParseError>() {
        Some(gst::ParseError::NoSuchElement) => {
            MediaError::Element { pipeline: context.to_owned(), element: e.message().to_owned() }
        }
        _ => MediaError::Build { pipeline: context.to_owned(), reason: e.to_string() },
    })?;
    element.downcast::<gst::Pipeline>().map_err(|_| MediaError::Build {
        pipeline: context.to_owned(),
        reason: "the description is not a pipeline".into(),
    })
}

pub(crate) fn make(context: &str, factory: &str) -> Result<gst::Element, MediaError> {
    gst::ElementFactory::make(factory).build().map_err(|_| element_error(context, factory))
}

fn element_error(context: &str, factory: &str) -> MediaError {
    MediaError::Element { pipeline: context.to_owned(), element: factory.to_owned() }
}

pub(crate) fn build_error(context: &str, e: impl std::fmt::Display) -> MediaError {
    MediaError::Build { pipeline: context.to_owned(), reason: e.to_string() }
}

/// The first error message waiting on the pipeline's bus, described.
pub(crate) fn bus_error(pipeline: &gst::Pipeline) -> Option<String> {
    let message = pipeline.bus()?.pop_filtered(&[gst::MessageType::Error])?;
    match message.view() {
        gst::MessageView::Error(e) => Some(describe_error(e)),
        _ => None,
    }
}

/// "element NAME: error (debug details)", on one line.
pub(crate) fn describe_error(e: &gst::message::Error) -> String {
    let mut text = format!("{}: {}", source_name(e.src()), e.error());
    if let Some(debug) = e.debug() {
        let debug = debug.split_whitespace().collect::<Vec<_>>().join(" ");
        text.push_str(&format!(" ({debug})"));
    }
    text
}

fn source_name(src: Option<&gst::Object>) -> String {
    src.map(|s| format!("element {}", s.path_string())).unwrap_or_else(|| "pipeline".into())
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::browser_safe_h264;

    #[test]
    fn browsers_take_baseline_and_main_h264() {
        assert!(browser_safe_h264(Some("constrained-baseline"), None));
        assert!(browser_safe_h264(Some("main"), Some(&[1, 100, 0, 31])));
        assert!(!browser_safe_h264(Some("high"), None));
        assert!(!browser_safe_h264(None, Some(&[1, 100, 0, 31])), "avcC profile_idc 100: high");
        assert!(browser_safe_h264(None, Some(&[1, 66, 0xc0, 30])));
        assert!(browser_safe_h264(None, None), "unknown passes");
    }
}
