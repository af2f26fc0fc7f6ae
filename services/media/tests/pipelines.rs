//! Real GStreamer pipelines end to end, without a network: a server
//! source's packets are pushed straight into a headless player.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use media::{
    catalogue, stream_ssrcs, DecodeCounts, Player, PlayerConfig, RtpStats, SourceSpec, StreamSource, AUDIO_PT, VIDEO_PT,
};
use overlay_core::rtp::Packet;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("media-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a source sent, as the player's caller sees it.
#[derive(Default)]
struct Sent {
    stats: RtpStats,
    streams: BTreeSet<(u32, u8)>,
    /// RTP timestamps by payload type, in order.
    timestamps: BTreeMap<u8, Vec<u32>>,
    /// Video frames (packets after a marker) whose RTP time did not
    /// advance past the previous frame's.
    video_frames_not_advancing: usize,
    last_video: Option<(u32, bool)>,
    /// RTCP sender reports, in order.
    reports: Vec<overlay_core::rtp::SenderReport>,
}

impl Sent {
    /// Asserts that the RTP time of `pt` never goes back and spans more
    /// than `at_least` seconds (no restart at a loop).
    fn assert_rtp_time_increases(&self, pt: u8, at_least: f64) {
        let ts = &self.timestamps[&pt];
        for pair in ts.windows(2) {
            assert!(pair[1].wrapping_sub(pair[0]) as i32 >= 0, "PT {pt}: RTP time went back: {pair:?}");
        }
        if pt == VIDEO_PT {
            assert_eq!(self.video_frames_not_advancing, 0, "video frames share RTP times");
        }
        let rate = media::clock_rate(pt).unwrap();
        let span = f64::from(ts[ts.len() - 1].wrapping_sub(ts[0])) / f64::from(rate);
        assert!(span > at_least, "PT {pt}: RTP time spans only {span} s");
    }
}

/// Plays `spec` through a headless player for `duration`; returns what was
/// sent, what had been decoded by the end of `duration` (so in real time,
/// not from a backlog flushed at stop) and the source's element factories.
/// Asserts that neither side reported an error and that decoding started
/// within two and a half seconds.
fn play(
    stream: &str,
    spec: &SourceSpec,
    record: Option<PathBuf>,
    duration: Duration,
) -> (Sent, DecodeCounts, Vec<String>) {
    let player = Arc::new(Player::start(PlayerConfig { headless: true, record, ..PlayerConfig::default() }).unwrap());
    let sent = Arc::new(Mutex::new(Sent::default()));
    let (to_player, log) = (player.clone(), sent.clone());
    let source = StreamSource::start(stream, spec, move |bytes| {
        let packet = Packet::parse(bytes).expect("the source sends valid RTP");
        if packet.kind() == overlay_core::rtp::Kind::Rtcp {
            let sr = overlay_core::rtp::parse_sender_report(bytes).expect("RTCP from a source is a sender report");
            log.lock().unwrap().reports.push(sr);
            return;
        }
        {
            let mut sent = log.lock().unwrap();
            sent.stats.on_packet(&packet, Instant::now());
            sent.streams.insert((packet.ssrc(), packet.payload_type()));
            sent.timestamps.entry(packet.payload_type()).or_default().push(packet.timestamp());
            if packet.payload_type() == VIDEO_PT {
                if let Some((previous, true)) = sent.last_video {
                    if packet.timestamp().wrapping_sub(previous) as i32 <= 0 {
                        sent.video_frames_not_advancing += 1;
                    }
                }
                sent.last_video = Some((packet.timestamp(), packet.marker()));
            }
        }
        to_player.push_rtp(bytes);
    })
    .unwrap();
    let started = Instant::now();
    std::thread::sleep(duration);
    let counts = player.decoded();
    let factories = source.element_factories();
    assert_eq!(source.error(), None);
    source.stop();
    let player = Arc::try_unwrap(player).expect("the stopped source released the player");
    assert_eq!(player.error(), None);
    let last = player.stop();
    assert!(last.video_frames >= counts.video_frames);
    if let Some(first_frame) = counts.first_frame {
        let delay = first_frame.duration_since(started);
        assert!(delay < Duration::from_millis(2500), "first frame after {delay:?}");
    }
    let sent = Arc::try_unwrap(sent).ok().unwrap().into_inner().unwrap();
    (sent, counts, factories)
}

/// Runs a finite pipeline description to its end; `filesink name=out`
/// writes to `out`.
fn run_to_end(description: &str, out: Option<&Path>) {
    media::init().unwrap();
    let pipeline = gst::parse::launch(description).unwrap();
    let pipeline = pipeline.downcast::<gst::Bin>().unwrap();
    if let Some(out) = out {
        pipeline.by_name("out").unwrap().set_property("location", out.to_str().unwrap());
    }
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let message = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(20), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("the pipeline ends");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = message.view() {
        panic!("{description}: {} ({:?})", e.error(), e.debug());
    }
}

/// Decoded video frames in a Matroska file.
fn frames_in(file: &Path) -> u64 {
    media::init().unwrap();
    let pipeline =
        gst::parse::launch("filesrc name=in ! matroskademux ! h264parse ! avdec_h264 name=dec ! fakesink sync=false")
            .unwrap()
            .downcast::<gst::Bin>()
            .unwrap();
    pipeline.by_name("in").unwrap().set_property("location", file.to_str().unwrap());
    let frames = Arc::new(Mutex::new(0u64));
    let counter = frames.clone();
    pipeline.by_name("dec").unwrap().static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        *counter.lock().unwrap() += 1;
        gst::PadProbeReturn::Ok
    });
    pipeline.set_state(gst::State::Playing).unwrap();
    let message = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(gst::ClockTime::from_seconds(10), &[gst::MessageType::Eos, gst::MessageType::Error])
        .expect("decoding the recording ends");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(message.view(), gst::MessageView::Eos(_)), "{message:?}");
    let n = *frames.lock().unwrap();
    n
}

#[test]
fn test_stream_decodes_in_player() {
    let (sent, counts, factories) = play("test", &SourceSpec::Test, None, Duration::from_secs(3));
    assert!(counts.video_frames > 30, "{counts:?}");
    assert!(counts.audio_buffers > 10, "{counts:?}");
    assert!(counts.first_frame.is_some());
    let [video_ssrc, audio_ssrc] = stream_ssrcs("test");
    assert_eq!(sent.streams, BTreeSet::from([(video_ssrc, VIDEO_PT), (audio_ssrc, AUDIO_PT)]));
    let summary = sent.stats.summary();
    assert_eq!(summary.packets_lost, 0, "{summary:?}");
    assert!(factories.contains(&"x264enc".to_owned()));
    // About one sender report a second for each SSRC, mapping RTP time to
    // a capture time in the recent past.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for ssrc in [video_ssrc, audio_ssrc] {
        let reports: Vec<_> = sent.reports.iter().filter(|r| r.ssrc == ssrc).collect();
        assert!((2..=5).contains(&reports.len()), "{} reports for {ssrc}", reports.len());
        for r in reports {
            assert!(r.unix_secs < now && r.unix_secs > now - 10.0, "capture time {} vs now {now}", r.unix_secs);
        }
    }
    assert!(factories.contains(&"timeoverlay".to_owned()));
}

#[test]
fn a_high_profile_h264_file_is_reencoded_for_browsers() {
    // Browsers' WebRTC takes baseline and main: a high-profile file is
    // re-encoded once, at its server.
    let dir = TempDir::new("high");
    let file = dir.0.join("high.mkv");
    run_to_end(
        "videotestsrc num-buffers=45 pattern=smpte \
           ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 \
           ! x264enc key-int-max=15 speed-preset=veryfast ! video/x-h264,profile=high \
           ! h264parse ! matroskamux name=mux ! filesink name=out",
        Some(&file),
    );
    let streams = catalogue(Some(&dir.0)).unwrap();
    let (_, counts, factories) = play("high", &streams["high"], None, Duration::from_millis(2500));
    assert!(counts.video_frames > 30, "{counts:?}");
    assert!(factories.contains(&"avdec_h264".to_owned()), "{factories:?}");
    assert!(factories.contains(&"x264enc".to_owned()), "{factories:?}");
}

#[test]
fn h264_opus_file_is_found_looped_and_not_reencoded() {
    let dir = TempDir::new("file");
    let file = dir.0.join("clip.mkv");
    run_to_end(
        "videotestsrc num-buffers=45 pattern=smpte \
           ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 \
           ! x264enc key-int-max=15 speed-preset=ultrafast tune=zerolatency \
           ! h264parse ! matroskamux name=mux ! filesink name=out \
         audiotestsrc num-buffers=70 ! audioconvert ! audioresample ! opusenc ! mux.",
        Some(&file),
    );
    std::fs::write(dir.0.join("notes.txt"), "not media").unwrap();
    let streams = catalogue(Some(&dir.0)).unwrap();
    assert_eq!(streams.keys().collect::<Vec<_>>(), ["clip", "test"]);
    assert_eq!(streams["clip"], SourceSpec::File(file));

    // 1.5 s of media played for 3.3 s: it loops twice.
    let started = Instant::now();
    let (sent, counts, factories) = play("clip", &streams["clip"], None, Duration::from_millis(3300));
    let elapsed = started.elapsed();
    assert!(counts.video_frames > 60, "{counts:?}");
    assert!(counts.audio_buffers > 10, "{counts:?}");
    assert!(!factories.contains(&"x264enc".to_owned()), "{factories:?}");
    assert!(!factories.contains(&"opusenc".to_owned()), "{factories:?}");
    assert!(factories.contains(&"h264parse".to_owned()), "{factories:?}");
    assert_eq!(sent.streams.len(), 2);
    assert_eq!(sent.stats.summary().packets_lost, 0);

    // Gapless loops: RTP time never goes back and advances like the clock.
    sent.assert_rtp_time_increases(VIDEO_PT, 2.8);
    sent.assert_rtp_time_increases(AUDIO_PT, 2.8);
    let video = &sent.timestamps[&VIDEO_PT];
    let span = f64::from(video[video.len() - 1].wrapping_sub(video[0])) / 90_000.0;
    assert!(span < elapsed.as_secs_f64() + 0.2, "real time: {span} s in {elapsed:?}");
}

#[test]
fn video_only_and_audio_only_files_play() {
    let dir = TempDir::new("single");
    let video = dir.0.join("picture.webm");
    let audio = dir.0.join("sound.ogg");
    run_to_end(
        "videotestsrc num-buffers=20 ! video/x-raw,width=320,height=240,framerate=30/1 \
           ! vp8enc deadline=1 ! webmmux ! filesink name=out",
        Some(&video),
    );
    run_to_end("audiotestsrc num-buffers=40 ! audioconvert ! vorbisenc ! oggmux ! filesink name=out", Some(&audio));
    let streams = catalogue(Some(&dir.0)).unwrap();

    let (sent, counts, factories) = play("picture", &streams["picture"], None, Duration::from_millis(1500));
    assert!(factories.contains(&"x264enc".to_owned()), "VP8 is re-encoded: {factories:?}");
    assert_eq!(sent.streams, BTreeSet::from([(stream_ssrcs("picture")[0], VIDEO_PT)]));
    assert!(counts.video_frames > 10, "{counts:?}");
    sent.assert_rtp_time_increases(VIDEO_PT, 1.2);

    let (sent, counts, _) = play("sound", &streams["sound"], None, Duration::from_millis(1500));
    assert_eq!(sent.streams, BTreeSet::from([(stream_ssrcs("sound")[1], AUDIO_PT)]));
    assert!(counts.audio_buffers > 10, "{counts:?}");
    assert_eq!(counts.video_frames, 0);
    sent.assert_rtp_time_increases(AUDIO_PT, 1.2);
}

#[test]
fn unplayable_files_are_named_in_errors() {
    let dir = TempDir::new("bad");
    let missing = dir.0.join("missing.mp4");
    let err = StreamSource::start("missing", &SourceSpec::File(missing), |_| {}).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    let junk = dir.0.join("junk.mp4");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let err = StreamSource::start("junk", &SourceSpec::File(junk), |_| {}).unwrap_err();
    assert!(err.to_string().contains("stream junk"), "{err}");
}

#[test]
fn recording_is_a_playable_matroska_file() {
    let dir = TempDir::new("record");
    let file = dir.0.join("recording.mkv");
    let (_, counts, _) = play("test", &SourceSpec::Test, Some(file.clone()), Duration::from_millis(2500));
    assert!(counts.video_frames > 20, "{counts:?}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 10_000, "recording has {size} bytes");
    let frames = frames_in(&file);
    assert!(frames > 20, "the recording decodes to {frames} frames");
    if let Ok(output) = std::process::Command::new("gst-discoverer-1.0").arg(&file).output() {
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(report.contains("video"), "{report}");
    }
}

#[test]
fn recording_a_stream_without_audio_does_not_stall() {
    let dir = TempDir::new("record-video");
    let clip = dir.0.join("picture.mkv");
    run_to_end(
        "videotestsrc num-buffers=30 ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 \
           ! x264enc key-int-max=15 speed-preset=ultrafast tune=zerolatency \
           ! h264parse ! matroskamux ! filesink name=out",
        Some(&clip),
    );
    let file = dir.0.join("recording.mkv");
    let (sent, counts, _) = play("picture", &SourceSpec::File(clip), Some(file.clone()), Duration::from_millis(4500));
    assert!(counts.video_frames > 110, "the display went on: {counts:?}");
    sent.assert_rtp_time_increases(VIDEO_PT, 4.0);
    // Had the muxer waited for audio until the end, the recording would
    // keep only the last 3 s that its input queue holds.
    let frames = frames_in(&file);
    assert!(frames > 110, "the recording decodes to {frames} frames");
}

#[test]
fn mpeg_ts_file_loops_without_segment_seeks() {
    // tsdemux refuses segment seeks: this file loops by a flushing seek at
    // the end of each pass, and RTP time must still run on.
    let dir = TempDir::new("ts");
    let file = dir.0.join("broadcast.ts");
    run_to_end(
        "videotestsrc num-buffers=30 \
           ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 \
           ! x264enc key-int-max=15 speed-preset=ultrafast tune=zerolatency \
           ! h264parse ! mpegtsmux name=mux ! filesink name=out \
         audiotestsrc num-buffers=45 ! audioconvert ! audioresample ! opusenc ! mux.",
        Some(&file),
    );
    let (sent, counts, factories) = play("broadcast", &SourceSpec::File(file), None, Duration::from_millis(2500));
    assert!(factories.contains(&"tsdemux".to_owned()), "{factories:?}");
    assert!(!factories.contains(&"x264enc".to_owned()), "{factories:?}");
    assert!(counts.video_frames > 55, "{counts:?}");
    assert!(counts.audio_buffers > 10, "{counts:?}");
    sent.assert_rtp_time_increases(VIDEO_PT, 2.0);
    sent.assert_rtp_time_increases(AUDIO_PT, 2.0);
}

#[test]
fn player_without_packets_stops_promptly() {
    let player = Player::start(PlayerConfig { headless: true, ..PlayerConfig::default() }).unwrap();
    player.push_rtp(b"not rtp");
    let mut rtcp = [0u8; 28];
    rtcp[0] = 0x80;
    rtcp[1] = 200;
    player.push_rtp(&rtcp);
    let started = Instant::now();
    let counts = player.stop();
    assert_eq!(counts, DecodeCounts::default());
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

/// Plays the built-in test stream headless, the audio and its sender
/// reports reaching the player `audio_delay` after the video (as if they
/// came a longer way); returns what was presented in the last three of
/// six seconds, and the holds lip sync chose.
fn play_with_late_audio(lip_sync: bool, audio_delay: Duration) -> (media::PresentationSummary, [f64; 2]) {
    let player = Arc::new(Player::start(PlayerConfig { headless: true, lip_sync, ..PlayerConfig::default() }).unwrap());
    let audio_ssrc = stream_ssrcs("sync")[1];
    let (late_tx, late_rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let to_player = player.clone();
    let delay_line = std::thread::spawn(move || {
        for (due, bytes) in late_rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            to_player.push_rtp(&bytes);
        }
    });
    let (to_player, late_tx) = (player.clone(), Mutex::new(late_tx));
    let source = StreamSource::start("sync", &SourceSpec::Test, move |bytes| {
        let packet = Packet::parse(bytes).expect("the source sends valid RTP");
        if packet.ssrc() == audio_ssrc {
            let _ = late_tx.lock().unwrap().send((Instant::now() + audio_delay, bytes.to_vec()));
        } else {
            to_player.push_rtp(bytes);
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let steady = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_secs(3));
    let presented = player.presented_since(steady);
    let holds = player.lip_sync_holds();
    assert_eq!(source.error(), None);
    source.stop();
    delay_line.join().unwrap();
    let player = Arc::try_unwrap(player).expect("the stopped source released the player");
    assert_eq!(player.error(), None);
    player.stop();
    (presented, holds)
}

#[test]
fn lip_sync_presents_late_audio_with_its_video() {
    let delay = Duration::from_millis(200);
    let (unsynced, holds) = play_with_late_audio(false, delay);
    assert_eq!(holds, [0.0, 0.0]);
    let skew = unsynced.skew_ms().expect("both kinds were presented");
    eprintln!("without lip sync: audio trails video by {skew:.1} ms");
    assert!(skew > 120.0, "without lip sync the audio should trail by about 200 ms, skew {skew:.0} ms");

    let (synced, holds) = play_with_late_audio(true, delay);
    let skew = synced.skew_ms().expect("both kinds were presented");
    eprintln!("with lip sync: skew {skew:.1} ms, holds {holds:?}");
    assert!(skew.abs() < 25.0, "lip sync left a skew of {skew:.0} ms (holds {holds:?})");
    assert!(holds[0] > 0.12 && holds[1] == 0.0, "the video should wait for the audio: holds {holds:?}");
    // Every presented frame traced back to its capture.
    assert!(synced.video_ms.len() > 60, "{} video samples", synced.video_ms.len());
    let g2g = media::median(&synced.video_ms).unwrap();
    assert!(g2g > 200.0, "video presented {g2g:.0} ms after capture, before the audio could be");
}
