//! The client side: a pipeline the caller feeds with RTP packets (it owns
//! the socket). Packets are split by payload type into a video and an
//! audio branch, each `appsrc → rtpjitterbuffer → depayloader → parser →
//! decoder → sink`; pad probes after the decoders count what was decoded.
//! With a recording file, the parsed H.264 and Opus are also muxed into
//! Matroska.
//!
//! Sinks present media on the pipeline clock, headless ones included. The
//! RTCP sender reports the caller pushes with the media keep audio and
//! video in sync (the jitter buffer of the kind that arrives earlier holds
//! it back; see [`crate::sync`]), and probes at the jitter buffers and the
//! sinks trace every presented buffer back to its capture time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use overlay_core::rtp::{Kind, Packet};
use tracing::{debug, error, info, warn};

use crate::source::{bus_error, describe_error, launch, lock};
use crate::sync::{LipSync, Media, Presentation, PresentationSummary};
use crate::{init, MediaError, AUDIO_PT, VIDEO_PT};

/// Default jitter buffer latency of both branches.
pub const DEFAULT_LATENCY_MS: u32 = 60;
/// How long [`Player::stop`] waits for the end of stream to reach the sinks.
const EOS_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes an appsrc holds before dropping its oldest packets.
const APPSRC_MAX_BYTES: u64 = 2 * 1024 * 1024;
/// With a recording, a media kind not seen this long after the other one
/// started is ended in the recording, so the muxer does not wait for it.
const RECORD_MISSING_AFTER: Duration = Duration::from_millis(1500);
/// Media held in front of the muxer per kind; must exceed
/// `RECORD_MISSING_AFTER` or the start of a one-kind recording is lost.
const RECORD_QUEUE: Duration = Duration::from_secs(3);

/// How the client plays what it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerConfig {
    /// Decode without showing or sounding anything.
    pub headless: bool,
    /// Also write the received video and audio, undecoded, to this
    /// Matroska file.
    pub record: Option<PathBuf>,
    /// Jitter buffer latency (ms): how long packets wait for late or
    /// reordered ones before decoding.
    pub latency_ms: u32,
    /// Hold back the media kind that arrives earlier after its capture, so
    /// that audio and video are presented in sync.
    pub lip_sync: bool,
}

impl Default for PlayerConfig {
    fn default() -> Self {
        PlayerConfig { headless: false, record: None, latency_ms: DEFAULT_LATENCY_MS, lip_sync: true }
    }
}

/// What the decoders produced so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    pub video_frames: u64,
    pub audio_buffers: u64,
    /// When the first video frame was decoded.
    pub first_frame: Option<Instant>,
}

/// Counters and bus state shared with the streaming threads.
#[derive(Default)]
struct Shared {
    video_frames: AtomicU64,
    audio_buffers: AtomicU64,
    first_frame: OnceLock<Instant>,
    first_error: Mutex<Option<String>>,
    eos: Mutex<bool>,
    eos_reached: Condvar,
    timing: Mutex<Timing>,
    /// Whether each sink has presented anything yet.
    presenting: [AtomicBool; 2],
}

/// Capture-time bookkeeping shared by the caller's pushes and the probes.
#[derive(Default)]
struct Timing {
    sync: LipSync,
    presentation: Presentation,
}

/// With a recording: when each kind was first pushed and whether its
/// recording branch was ended early.
struct Recording {
    started: Instant,
    /// Milliseconds after `started` of the first packet, plus one; 0 = none.
    first_packet_ms: [AtomicU64; 2],
    ended: [AtomicBool; 2],
    /// The sink pads of the queues in front of the muxer.
    mux_inputs: [gst::Pad; 2],
}

/// A running client pipeline; see the module doc.
pub struct Player {
    pipeline: gst::Pipeline,
    inputs: [gst_app::AppSrc; 2],
    jitter_buffers: [gst::Element; 2],
    lip_sync: bool,
    shared: Arc<Shared>,
    recording: Option<Recording>,
    stopped: bool,
}

impl Player {
    /// Builds the pipeline and sets it playing.
    pub fn start(cfg: PlayerConfig) -> Result<Self, MediaError> {
        init()?;
        let context = "player";
        if !cfg.headless && !has_display() {
            // autovideosink would go on to probe sinks such as dfbvideosink,
            // which crashes the process when there is no display.
            return Err(MediaError::Start {
                pipeline: context.into(),
                reason: "no display (neither DISPLAY nor WAYLAND_DISPLAY is set); play headless".into(),
            });
        }
        let pipeline = launch(context, &describe(&cfg))?;
        let element = |name: &str| {
            pipeline.by_name(name).ok_or_else(|| MediaError::Build {
                pipeline: context.into(),
                reason: format!("no element named {name}"),
            })
        };
        let appsrc = |media: Media, caps: &str| -> Result<gst_app::AppSrc, MediaError> {
            let name = format!("{}_in", media.name());
            let src = element(&name)?.downcast::<gst_app::AppSrc>().map_err(|_| MediaError::Build {
                pipeline: context.into(),
                reason: format!("{name} is not an appsrc"),
            })?;
            let caps = caps
                .parse::<gst::Caps>()
                .map_err(|e| MediaError::Build { pipeline: context.into(), reason: format!("caps {caps}: {e}") })?;
            src.set_caps(Some(&caps));
            src.set_format(gst::Format::Time);
            src.set_is_live(true);
            src.set_do_timestamp(true);
            src.set_max_bytes(APPSRC_MAX_BYTES);
            src.set_property_from_str("leaky-type", "downstream");
            Ok(src)
        };
        let inputs = [
            appsrc(
                Media::Video,
                &format!("application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload={VIDEO_PT}"),
            )?,
            appsrc(
                Media::Audio,
                &format!("application/x-rtp,media=audio,clock-rate=48000,encoding-name=OPUS,payload={AUDIO_PT}"),
            )?,
        ];

        let shared = Arc::new(Shared::default());
        let jitter_buffers = [element("video_jb")?, element("audio_jb")?];
        for media in Media::BOTH {
            let jitter_buffer = &jitter_buffers[media as usize];
            let pad = jitter_buffer.static_pad("src").ok_or_else(|| no_pad(context, media.name()))?;
            let probe_shared = shared.clone();
            pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, move |_, info| {
                for_each_buffer(info, |buffer| probe_shared.on_scheduled(media, buffer));
                gst::PadProbeReturn::Ok
            });
            let sink = element(&format!("{}_sink", media.name()))?;
            let pad = sink.static_pad("sink").ok_or_else(|| no_pad(context, media.name()))?;
            let probe_shared = shared.clone();
            pad.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, move |pad, info| {
                for_each_buffer(info, |buffer| probe_shared.on_presented(media, pad, buffer));
                gst::PadProbeReturn::Ok
            });
        }

        let probe_shared = shared.clone();
        element("video_dec")?.static_pad("src").ok_or_else(|| no_pad(context, "video_dec"))?.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            move |_, info| {
                probe_shared.first_frame.get_or_init(Instant::now);
                probe_shared.video_frames.fetch_add(buffers_in(info), Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            },
        );
        let probe_shared = shared.clone();
        element("audio_dec")?.static_pad("src").ok_or_else(|| no_pad(context, "audio_dec"))?.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            move |_, info| {
                probe_shared.audio_buffers.fetch_add(buffers_in(info), Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            },
        );

        let recording = match &cfg.record {
            Some(path) => {
                element("record_file")?.set_property("location", path.to_string_lossy().as_ref());
                let queue_input = |name: &str| element(name)?.static_pad("sink").ok_or_else(|| no_pad(context, name));
                Some(Recording {
                    started: Instant::now(),
                    first_packet_ms: Default::default(),
                    ended: Default::default(),
                    mux_inputs: [queue_input("video_record")?, queue_input("audio_record")?],
                })
            }
            None => None,
        };

        let bus = pipeline
            .bus()
            .ok_or_else(|| MediaError::Build { pipeline: context.into(), reason: "the pipeline has no bus".into() })?;
        let bus_shared = shared.clone();
        bus.set_sync_handler(move |_, message| {
            match message.view() {
                gst::MessageView::Error(e) => {
                    let text = describe_error(e);
                    error!("player: {text}");
                    lock(&bus_shared.first_error).get_or_insert(text);
                    // An error ends the pipeline as surely as EOS: stop waiting.
                    *lock(&bus_shared.eos) = true;
                    bus_shared.eos_reached.notify_all();
                }
                gst::MessageView::Eos(_) => {
                    *lock(&bus_shared.eos) = true;
                    bus_shared.eos_reached.notify_all();
                }
                gst::MessageView::Warning(w) => {
                    warn!("player: {}", w.error());
                }
                _ => {}
            }
            gst::BusSyncReply::Drop
        });

        let player =
            Player { pipeline, inputs, jitter_buffers, lip_sync: cfg.lip_sync, shared, recording, stopped: false };
        if let Err(e) = player.pipeline.set_state(gst::State::Playing) {
            let reason = player.error().or_else(|| bus_error(&player.pipeline));
            return Err(MediaError::Start {
                pipeline: context.into(),
                reason: reason.unwrap_or_else(|| e.to_string()),
            });
        }
        info!(headless = cfg.headless, record = ?cfg.record, "player started");
        Ok(player)
    }

    /// Queues one received RTP packet: payload type 96 to video, 97 to
    /// audio; RTCP sender reports time both; anything else is ignored.
    /// Never blocks: a full input drops its oldest packets.
    pub fn push_rtp(&self, packet: &[u8]) {
        let Ok(parsed) = Packet::parse(packet) else { return };
        if parsed.kind() == Kind::Rtcp {
            if let Some(report) = overlay_core::rtp::parse_sender_report(packet) {
                lock(&self.shared.timing).sync.on_report(report);
            }
            return;
        }
        let media = match parsed.payload_type() {
            VIDEO_PT => Media::Video,
            AUDIO_PT => Media::Audio,
            _ => return,
        };
        if self.lip_sync {
            let holds = lock(&self.shared.timing).sync.on_packet(media, parsed.ssrc(), parsed.timestamp(), unix_now());
            if let Some(holds) = holds {
                info!(video_ms = holds[0] * 1000.0, audio_ms = holds[1] * 1000.0, "lip sync: holding media back");
                for (jitter_buffer, hold) in self.jitter_buffers.iter().zip(holds) {
                    jitter_buffer.set_property("ts-offset", (hold * 1e9) as i64);
                }
            }
        }
        if let Some(recording) = &self.recording {
            recording.on_packet(media);
        }
        let buffer = gst::Buffer::from_slice(packet.to_vec());
        if let Err(e) = self.inputs[media as usize].push_buffer(buffer) {
            debug!("player {} input refused a packet: {e}", media.name());
        }
    }

    /// What has been decoded so far.
    pub fn decoded(&self) -> DecodeCounts {
        DecodeCounts {
            video_frames: self.shared.video_frames.load(Ordering::Relaxed),
            audio_buffers: self.shared.audio_buffers.load(Ordering::Relaxed),
            first_frame: self.shared.first_frame.get().copied(),
        }
    }

    /// Capture-to-presentation latencies of what was presented at or
    /// after `since`.
    pub fn presented_since(&self, since: std::time::SystemTime) -> PresentationSummary {
        let since = since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        lock(&self.shared.timing).presentation.since(since)
    }

    /// How long lip sync holds each kind back now, `[video, audio]` (s).
    pub fn lip_sync_holds(&self) -> [f64; 2] {
        lock(&self.shared.timing).sync.offsets()
    }

    /// The first error the pipeline reported, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.first_error).clone()
    }

    /// Ends the stream (so that a recording is finalised; waits at most
    /// about 2 s), stops the pipeline and returns the final counts.
    pub fn stop(mut self) -> DecodeCounts {
        self.shutdown();
        self.decoded()
    }

    fn shutdown(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        for input in &self.inputs {
            let _ = input.end_of_stream();
        }
        let deadline = Instant::now() + EOS_TIMEOUT;
        let mut eos = lock(&self.shared.eos);
        while !*eos {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!("player: no end of stream within {} s; stopping anyway", EOS_TIMEOUT.as_secs());
                break;
            }
            eos = self.shared.eos_reached.wait_timeout(eos, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        drop(eos);
        if let Err(e) = self.pipeline.set_state(gst::State::Null) {
            warn!("player: setting the pipeline to NULL: {e}");
        }
        if let Some(bus) = self.pipeline.bus() {
            bus.unset_sync_handler();
        }
        info!(counts = ?self.decoded(), "player stopped");
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Player {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Player").field("decoded", &self.decoded()).finish_non_exhaustive()
    }
}

impl Shared {
    /// An RTP packet leaves a jitter buffer: remember when its media was
    /// captured, under the timestamp it will be presented at.
    fn on_scheduled(&self, media: Media, buffer: &gst::BufferRef) {
        let Some(pts) = buffer.pts() else { return };
        let Ok(bytes) = buffer.map_readable() else { return };
        let Ok(packet) = Packet::parse(&bytes) else { return };
        let mut timing = lock(&self.timing);
        if let Some(capture) = timing.sync.capture_time(media, packet.ssrc(), packet.timestamp()) {
            timing.presentation.on_scheduled(media, pts.nseconds(), capture);
        }
    }

    /// A decoded buffer reaches its sink through `pad`: note when the sink
    /// will present it (its running time plus the pipeline latency).
    fn on_presented(&self, media: Media, pad: &gst::Pad, buffer: &gst::BufferRef) {
        let Some(pts) = buffer.pts() else { return };
        let Some((at, latency)) = presentation_time(pad, pts) else { return };
        if !self.presenting[media as usize].swap(true, Ordering::Relaxed) {
            info!(latency_ms = latency.mseconds(), "{} sink presents on the clock", media.name());
        }
        lock(&self.timing).presentation.on_presented(media, pts.nseconds(), at);
    }
}

/// When (Unix seconds) the sink owning `pad` presents a buffer stamped
/// `pts` (at once if that time has passed), and the pipeline latency it
/// adds.
fn presentation_time(pad: &gst::Pad, pts: gst::ClockTime) -> Option<(f64, gst::ClockTime)> {
    let sink = pad.parent_element()?;
    let segment = pad.sticky_event::<gst::event::Segment>(0)?;
    let running = segment.segment().downcast_ref::<gst::ClockTime>()?.to_running_time(pts)?;
    let (clock, base) = (sink.clock()?, sink.base_time()?);
    let latency = render_latency(&sink).unwrap_or(gst::ClockTime::ZERO);
    let due = base + running + latency;
    let ahead_ns = due.nseconds() as i128 - clock.time().nseconds() as i128;
    Some((unix_now() + ahead_ns.max(0) as f64 / 1e9, latency))
}

/// The latency a sink (or the sink inside a bin such as autovideosink)
/// adds to running times before presenting.
fn render_latency(element: &gst::Element) -> Option<gst::ClockTime> {
    use gstreamer_base::prelude::BaseSinkExt;
    if let Some(sink) = element.downcast_ref::<gstreamer_base::BaseSink>() {
        return Some(sink.latency());
    }
    let bin = element.downcast_ref::<gst::Bin>()?;
    let inner = bin.iterate_sinks().into_iter().flatten().next()?;
    render_latency(&inner)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn for_each_buffer(info: &gst::PadProbeInfo<'_>, mut f: impl FnMut(&gst::BufferRef)) {
    match &info.data {
        Some(gst::PadProbeData::Buffer(buffer)) => f(buffer),
        Some(gst::PadProbeData::BufferList(list)) => list.iter().for_each(f),
        _ => {}
    }
}

impl Recording {
    /// Notes a packet of `media`; ends the other kind in the recording if
    /// it has not shown up in time, so that the muxer writes what it has.
    fn on_packet(&self, media: Media) {
        let now_ms = self.started.elapsed().as_millis() as u64 + 1;
        let first_ms = match self.first_packet_ms[media as usize].compare_exchange(
            0,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now_ms,
            Err(earlier) => earlier,
        };
        let other = media.other();
        if self.first_packet_ms[other as usize].load(Ordering::Relaxed) != 0
            || self.ended[other as usize].load(Ordering::Relaxed)
            || now_ms.saturating_sub(first_ms) < RECORD_MISSING_AFTER.as_millis() as u64
            || self.ended[other as usize].swap(true, Ordering::SeqCst)
        {
            return;
        }
        info!("player: no {} received; recording {} only", other.name(), media.name());
        let input = &self.mux_inputs[other as usize];
        // Whatever arrives later is dropped before the ended muxer input.
        input.add_probe(gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST, |_, _| gst::PadProbeReturn::Drop);
        input.send_event(gst::event::Eos::new());
    }
}

/// The pipeline description for `cfg`.
fn describe(cfg: &PlayerConfig) -> String {
    // Sinks must not hold the live pipeline in PAUSED until every one of
    // them has prerolled: a kind that never arrives (a stream without
    // audio) would stall the others.
    // Headless sinks drop what comes too late, as a real video sink
    // does (QoS, 20 ms) and as an audio sink resynchronises, so a player
    // that fell behind catches up with the live point.
    let (video_sink, audio_sink) = if cfg.headless {
        (
            "fakesink name=video_sink sync=true async=false qos=true max-lateness=20000000",
            "fakesink name=audio_sink sync=true async=false qos=true max-lateness=40000000",
        )
    } else {
        ("autovideosink name=video_sink async-handling=true", "autoaudiosink name=audio_sink async-handling=true")
    };
    let recording = cfg.record.is_some();
    let latency = cfg.latency_ms;
    let tee = |name: &str| {
        if recording {
            format!("tee name={name} ! queue ! ")
        } else {
            String::new()
        }
    };
    let mut description = format!(
        "appsrc name=video_in ! rtpjitterbuffer name=video_jb latency={latency} faststart-min-packets=8 \
           ! rtph264depay ! h264parse ! {video_tee}avdec_h264 name=video_dec \
           ! videoconvert ! {video_sink} \
         appsrc name=audio_in ! rtpjitterbuffer name=audio_jb latency={latency} faststart-min-packets=8 \
           ! rtpopusdepay ! opusparse ! {audio_tee}opusdec name=audio_dec \
           ! audioconvert ! audioresample ! {audio_sink}",
        video_tee = tee("video_tee"),
        audio_tee = tee("audio_tee"),
    );
    if recording {
        // The muxer waits for data on both inputs. The queues in front of
        // it hold the first kind until Recording ends a kind that does not
        // come, and leak rather than stall playback if the muxer stalls.
        let record_queue = |media: &str| {
            format!(
                " {media}_tee. ! queue name={media}_record leaky=downstream \
                  max-size-time={} max-size-buffers=0 max-size-bytes=0 ! mux.",
                RECORD_QUEUE.as_nanos()
            )
        };
        description.push_str(&record_queue("video"));
        description.push_str(&record_queue("audio"));
        description.push_str(" matroskamux name=mux ! filesink name=record_file async=false");
    }
    description
}

fn has_display() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"].iter().any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

fn buffers_in(info: &gst::PadProbeInfo<'_>) -> u64 {
    match &info.data {
        Some(gst::PadProbeData::BufferList(list)) => list.len() as u64,
        _ => 1,
    }
}

fn no_pad(context: &str, element: &str) -> MediaError {
    MediaError::Build { pipeline: context.into(), reason: format!("{element} has no pad to probe") }
}
