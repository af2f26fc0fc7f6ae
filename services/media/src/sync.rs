//! Lip sync and presentation timing for the player, without GStreamer.
//!
//! RTCP sender reports map each RTP stream's timestamps to the wall-clock
//! time the server captured that media. With that mapping the player
//! knows, for every packet, how late it arrives after its capture. Audio
//! and video rarely arrive equally late (the encoders hold media for
//! different times, and the network may treat them differently), so
//! [`LipSync`] delays the earlier kind by the difference of their
//! lateness floors: media captured together is then presented together.
//!
//! [`Presentation`] follows each presented buffer back to its capture time
//! (the schedule recorded when its RTP packet left the jitter buffer) and
//! keeps the capture-to-presentation latency of both kinds: video's is the
//! glass-to-glass latency, and the difference of the two is the audio/video
//! skew the viewer would notice.
//!
//! All times are passed in as wall-clock seconds (Unix epoch); nothing here
//! reads a clock.

use std::collections::{BTreeMap, VecDeque};

use overlay_core::rtp::SenderReport;

/// How far back the lateness floors look (seconds): long enough to hold
/// packets that crossed the path without queueing, short enough to follow
/// a path that changed (a repaired tree, another POP).
pub const SYNC_WINDOW_SECS: f64 = 2.0;
/// Offsets move only when the target is this far (seconds) from the one
/// applied: every move is a small jump in the presentation.
pub const SYNC_STEP_SECS: f64 = 0.008;
/// Holds longer than this (seconds) are never right: the mapping behind
/// them is stale, so nothing is held.
pub const MAX_HOLD_SECS: f64 = 1.0;
/// Once set, a hold changes by at most this much (seconds) per second of
/// media: a floor that keeps climbing (a queue building somewhere on one
/// kind's path) is followed slowly, never chased, and a real path change
/// still settles within a few seconds.
pub const MAX_SLEW_PER_SEC: f64 = 0.1;
/// RTP time and arrival time of one stream drifting apart by more than
/// this (seconds) between two packets means another sender took over the
/// SSRC (a tree re-rooted at another server): its old sender report no
/// longer applies. A cached group of pictures sent at once spans far less.
const DISCONTINUITY_SECS: f64 = 30.0;
/// Presentation samples this far (seconds) from the wall clock come from
/// a stale mapping and are dropped.
const SANE_LATENCY_SECS: std::ops::Range<f64> = -5.0..60.0;
/// Scheduled buffers remembered per kind, to find presented buffers'
/// capture times.
const SCHEDULE_LEN: usize = 512;
/// A presented buffer is matched to a scheduled one at most this far
/// (nanoseconds) before it (audio decoders may split buffers).
const MATCH_WITHIN_NS: u64 = 100_000_000;
/// Presentation samples kept per kind (about 20 minutes of video).
const SAMPLES_KEPT: usize = 100_000;

/// The two media kinds of a stream, indexing per-kind state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Video = 0,
    Audio = 1,
}

impl Media {
    pub const BOTH: [Media; 2] = [Media::Video, Media::Audio];

    pub fn name(self) -> &'static str {
        match self {
            Media::Video => "video",
            Media::Audio => "audio",
        }
    }

    pub fn other(self) -> Media {
        match self {
            Media::Video => Media::Audio,
            Media::Audio => Media::Video,
        }
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Media::Video => crate::VIDEO_CLOCK_RATE,
            Media::Audio => crate::AUDIO_CLOCK_RATE,
        }
    }
}

/// The minimum of values seen over roughly the last window: two buckets
/// of half a window each, so memory is constant.
#[derive(Debug, Clone, Default)]
struct WindowMin {
    /// Start time and minimum of the bucket being filled.
    current: Option<(f64, f64)>,
    /// Minimum of the bucket before it.
    previous: Option<f64>,
}

impl WindowMin {
    fn push(&mut self, at: f64, value: f64) {
        match &mut self.current {
            Some((start, min)) if at - *start < SYNC_WINDOW_SECS / 2.0 => *min = min.min(value),
            current => {
                // A bucket older than a whole window says nothing any more.
                self.previous = current.filter(|(start, _)| at - *start < SYNC_WINDOW_SECS).map(|(_, min)| min);
                *current = Some((at, value));
            }
        }
    }

    fn min(&self) -> Option<f64> {
        let current = self.current.map(|(_, min)| min);
        match (current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Per-kind arrival timing.
#[derive(Debug, Clone, Default)]
struct Arrivals {
    /// Lateness (arrival minus capture, seconds) floor.
    floor: WindowMin,
    last_seen: Option<f64>,
    /// SSRC, RTP timestamp and arrival of the last packet.
    last_packet: Option<(u32, u32, f64)>,
}

/// Chooses how long to hold each kind so that both are presented at the
/// same delay after capture; see the module doc.
#[derive(Debug, Clone, Default)]
pub struct LipSync {
    reports: BTreeMap<u32, SenderReport>,
    arrivals: [Arrivals; 2],
    /// Hold applied to each kind (seconds, never negative).
    offsets: [f64; 2],
    /// When the holds last changed (arrival time), once they have been set.
    moved_at: Option<f64>,
}

impl LipSync {
    /// Takes a sender report: from now on, that SSRC's timestamps map to
    /// capture times.
    pub fn on_report(&mut self, report: SenderReport) {
        self.reports.insert(report.ssrc, report);
    }

    /// Capture time (Unix seconds) of `media` at `rtp_timestamp` in the
    /// stream `ssrc`, once a sender report for it has arrived.
    pub fn capture_time(&self, media: Media, ssrc: u32, rtp_timestamp: u32) -> Option<f64> {
        Some(self.reports.get(&ssrc)?.capture_time(rtp_timestamp, media.clock_rate()))
    }

    /// Notes a packet of `media` that arrived at `arrival`. Returns the new
    /// holds `[video, audio]` (seconds) when they should change.
    pub fn on_packet(&mut self, media: Media, ssrc: u32, rtp_timestamp: u32, arrival: f64) -> Option<[f64; 2]> {
        let kind = &mut self.arrivals[media as usize];
        if let Some((last_ssrc, last_ts, last_arrival)) = kind.last_packet {
            let rtp_secs = f64::from(rtp_timestamp.wrapping_sub(last_ts) as i32) / f64::from(media.clock_rate());
            if last_ssrc == ssrc && (rtp_secs - (arrival - last_arrival)).abs() > DISCONTINUITY_SECS {
                self.reports.remove(&ssrc);
                *kind = Arrivals::default();
            }
        }
        kind.last_packet = Some((ssrc, rtp_timestamp, arrival));
        if let Some(capture) = self.capture_time(media, ssrc, rtp_timestamp) {
            let kind = &mut self.arrivals[media as usize];
            kind.floor.push(arrival, arrival - capture);
            kind.last_seen = Some(arrival);
        }
        let Some(target) = self.target(arrival) else {
            // No usable mapping (any more): nothing is held, at once.
            self.moved_at = None;
            if self.offsets == [0.0; 2] {
                return None;
            }
            self.offsets = [0.0; 2];
            return Some(self.offsets);
        };
        if !target.iter().zip(&self.offsets).any(|(t, o)| (t - o).abs() > SYNC_STEP_SECS) {
            return None;
        }
        let next = match self.moved_at {
            // The first holds of a mapping apply at once: nothing has been
            // presented against another offset yet.
            None => target,
            Some(at) => {
                let room = MAX_SLEW_PER_SEC * (arrival - at).max(0.0);
                if room < SYNC_STEP_SECS {
                    return None;
                }
                let mut next = self.offsets;
                for (n, t) in next.iter_mut().zip(target) {
                    *n += (t - *n).clamp(-room, room);
                }
                next
            }
        };
        self.offsets = next;
        self.moved_at = Some(arrival);
        Some(next)
    }

    /// The holds applied now `[video, audio]`, seconds.
    pub fn offsets(&self) -> [f64; 2] {
        self.offsets
    }

    /// The holds that would present both kinds equally late; none while
    /// one kind is missing (a stream without audio plays as it comes).
    fn target(&self, now: f64) -> Option<[f64; 2]> {
        let floor = |media: Media| {
            let kind = &self.arrivals[media as usize];
            kind.last_seen.filter(|seen| now - seen < SYNC_WINDOW_SECS).and(kind.floor.min())
        };
        match (floor(Media::Video), floor(Media::Audio)) {
            (Some(video), Some(audio)) if (video - audio).abs() <= MAX_HOLD_SECS => {
                let latest = video.max(audio);
                Some([latest - video, latest - audio])
            }
            _ => None,
        }
    }
}

/// Capture-to-presentation latencies collected since some time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PresentationSummary {
    /// Video, ms: glass-to-glass latency per presented frame.
    pub video_ms: Vec<f64>,
    /// Audio, ms, per presented buffer.
    pub audio_ms: Vec<f64>,
}

impl PresentationSummary {
    /// Median audio latency minus median video latency (ms): positive when
    /// sound comes after the picture it belongs to.
    pub fn skew_ms(&self) -> Option<f64> {
        Some(median(&self.audio_ms)? - median(&self.video_ms)?)
    }
}

/// The median of `values`, if any.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(sorted[sorted.len() / 2])
}

/// Presented media traced back to its capture; see the module doc.
#[derive(Debug, Clone, Default)]
pub struct Presentation {
    /// (PTS ns, capture Unix seconds) of buffers leaving the jitter buffer.
    schedule: [VecDeque<(u64, f64)>; 2],
    /// (presentation Unix seconds, latency ms) of presented buffers.
    samples: [VecDeque<(f64, f64)>; 2],
}

impl Presentation {
    /// A buffer of `media` with timestamp `pts` (ns) was scheduled; its
    /// media was captured at `capture`.
    pub fn on_scheduled(&mut self, media: Media, pts: u64, capture: f64) {
        let schedule = &mut self.schedule[media as usize];
        if schedule.len() == SCHEDULE_LEN {
            schedule.pop_front();
        }
        schedule.push_back((pts, capture));
    }

    /// A buffer of `media` with timestamp `pts` (ns) is presented at
    /// `presented` (Unix seconds). Returns its latency (ms) when its
    /// capture time is known.
    pub fn on_presented(&mut self, media: Media, pts: u64, presented: f64) -> Option<f64> {
        let (at, capture) = self.schedule[media as usize]
            .iter()
            .filter(|(at, _)| *at <= pts && pts - *at <= MATCH_WITHIN_NS)
            .max_by_key(|(at, _)| *at)
            .copied()?;
        let capture = capture + (pts - at) as f64 / 1e9;
        if !SANE_LATENCY_SECS.contains(&(presented - capture)) {
            return None;
        }
        let latency_ms = (presented - capture) * 1000.0;
        let samples = &mut self.samples[media as usize];
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back((presented, latency_ms));
        Some(latency_ms)
    }

    /// Latencies of what was presented at or after `since` (Unix seconds).
    pub fn since(&self, since: f64) -> PresentationSummary {
        let pick = |media: Media| {
            self.samples[media as usize].iter().filter(|(at, _)| *at >= since).map(|(_, ms)| *ms).collect()
        };
        PresentationSummary { video_ms: pick(Media::Video), audio_ms: pick(Media::Audio) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIDEO_SSRC: u32 = 1;
    const AUDIO_SSRC: u32 = 2;

    /// Reports capturing RTP time 0 of both streams at t = 100 s.
    fn synced() -> LipSync {
        let mut sync = LipSync::default();
        for ssrc in [VIDEO_SSRC, AUDIO_SSRC] {
            sync.on_report(SenderReport { ssrc, unix_secs: 100.0, rtp_timestamp: 0 });
        }
        sync
    }

    /// RTP timestamp of media captured `secs` after t = 100 s.
    fn ts(media: Media, secs: f64) -> u32 {
        (secs * f64::from(media.clock_rate())) as u32
    }

    /// Feeds `secs` of media: video every 33 ms arriving `video_late`
    /// after capture, audio every 20 ms arriving `audio_late` after it.
    /// Returns the last change of holds.
    fn feed(sync: &mut LipSync, from: f64, secs: f64, video_late: f64, audio_late: f64) -> Option<[f64; 2]> {
        let mut events: Vec<(f64, Media, f64)> = Vec::new();
        let mut t = from;
        while t < from + secs {
            events.push((t + video_late, Media::Video, t));
            t += 1.0 / 30.0;
        }
        let mut t = from;
        while t < from + secs {
            events.push((t + audio_late, Media::Audio, t));
            t += 0.02;
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut last = None;
        for (arrival, media, captured) in events {
            let ssrc = if media == Media::Video { VIDEO_SSRC } else { AUDIO_SSRC };
            if let Some(change) = sync.on_packet(media, ssrc, ts(media, captured), 100.0 + arrival) {
                last = Some(change);
            }
        }
        last
    }

    fn assert_close(got: [f64; 2], want: [f64; 2]) {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.002, "holds {got:?}, want {want:?}");
        }
    }

    #[test]
    fn the_earlier_kind_waits_for_the_later_one() {
        let mut sync = synced();
        let holds = feed(&mut sync, 0.0, 1.0, 0.030, 0.180).expect("a hold is set");
        assert_close(holds, [0.150, 0.0]);
        let mut sync = synced();
        let holds = feed(&mut sync, 0.0, 1.0, 0.120, 0.020).expect("a hold is set");
        assert_close(holds, [0.0, 0.100]);
    }

    #[test]
    fn holds_follow_the_floor_not_the_jitter() {
        let mut sync = synced();
        feed(&mut sync, 0.0, 1.0, 0.030, 0.180);
        // A burst of old packets (a cached group of pictures sent at join)
        // arrives very late: the floor, and so the holds, do not move.
        for i in 0..30 {
            let captured = f64::from(i) / 60.0;
            assert_eq!(sync.on_packet(Media::Video, VIDEO_SSRC, ts(Media::Video, captured), 101.1), None);
        }
        assert_close(sync.offsets(), [0.150, 0.0]);
    }

    #[test]
    fn holds_move_when_a_path_changes_and_stay_within_a_step() {
        let mut sync = synced();
        feed(&mut sync, 0.0, 3.0, 0.030, 0.180);
        // Video's path got 100 ms longer: after the window the old floor is
        // forgotten and video needs only 50 ms of hold.
        feed(&mut sync, 3.0, 3.0, 0.130, 0.180);
        assert_close(sync.offsets(), [0.050, 0.0]);
        // A change smaller than a step leaves the holds alone.
        assert_eq!(feed(&mut sync, 6.0, 3.0, 0.134, 0.180), None);
    }

    #[test]
    fn a_climbing_floor_is_followed_slowly_not_chased() {
        let mut sync = synced();
        feed(&mut sync, 0.0, 2.0, 0.030, 0.080);
        assert_close(sync.offsets(), [0.050, 0.0]);
        // Video's lateness climbs 300 ms per second for two seconds (a
        // queue building before its encoder): its hold may drop toward the
        // target and audio's grow, but by no more than the slew allows.
        let mut t = 2.0;
        let mut worst: f64 = 0.0;
        while t < 4.0 {
            let late = 0.030 + (t - 2.0) * 0.3;
            let video = sync.on_packet(Media::Video, VIDEO_SSRC, ts(Media::Video, t), 100.0 + t + late);
            let audio = sync.on_packet(Media::Audio, AUDIO_SSRC, ts(Media::Audio, t), 100.0 + t + 0.080);
            for holds in video.into_iter().chain(audio) {
                worst = worst.max(holds[1]);
            }
            t += 0.02;
        }
        assert!(worst <= 2.0 * MAX_SLEW_PER_SEC + SYNC_STEP_SECS, "audio hold reached {worst} in 2 s");
        // Once the path is stable again the holds settle on the new floors.
        feed(&mut sync, 4.0, 8.0, 0.630, 0.080);
        let holds = sync.offsets();
        assert!(holds[0] == 0.0 && (holds[1] - 0.550).abs() <= SYNC_STEP_SECS, "holds {holds:?}");
    }

    #[test]
    fn no_hold_without_both_kinds_and_their_reports() {
        let mut sync = LipSync::default();
        sync.on_report(SenderReport { ssrc: VIDEO_SSRC, unix_secs: 100.0, rtp_timestamp: 0 });
        // Audio has no report yet: nothing to compare with.
        assert_eq!(feed(&mut sync, 0.0, 1.0, 0.030, 0.180), None);
        let mut sync = synced();
        feed(&mut sync, 0.0, 1.0, 0.030, 0.180);
        // Audio stops: video plays as it comes again.
        let mut change = None;
        for i in 0..120 {
            let captured = 1.0 + f64::from(i) / 30.0;
            change = sync.on_packet(Media::Video, VIDEO_SSRC, ts(Media::Video, captured), 100.03 + captured).or(change);
        }
        assert_eq!(change, Some([0.0, 0.0]));
    }

    #[test]
    fn a_new_sender_on_the_ssrc_drops_the_old_mapping() {
        let mut sync = synced();
        feed(&mut sync, 0.0, 1.0, 0.030, 0.180);
        assert_close(sync.offsets(), [0.150, 0.0]);
        // Another server takes over the video SSRC: its RTP time starts
        // elsewhere. The old report would put its capture hours away.
        let other = 1_000_000_000u32;
        assert_eq!(sync.on_packet(Media::Video, VIDEO_SSRC, other, 101.2), Some([0.0, 0.0]));
        assert_eq!(sync.capture_time(Media::Video, VIDEO_SSRC, other), None);
        // Its first report restores the mapping, and the holds come back.
        sync.on_report(SenderReport { ssrc: VIDEO_SSRC, unix_secs: 101.2, rtp_timestamp: other });
        let mut change = None;
        for i in 1..30 {
            let secs = f64::from(i) / 30.0;
            let video_ts = other.wrapping_add((secs * 90_000.0) as u32);
            change = sync.on_packet(Media::Video, VIDEO_SSRC, video_ts, 101.2 + secs + 0.030).or(change);
            let audio_ts = ts(Media::Audio, 1.2 + secs);
            change = sync.on_packet(Media::Audio, AUDIO_SSRC, audio_ts, 101.2 + secs + 0.180).or(change);
        }
        assert_close(change.expect("holds set again"), [0.150, 0.0]);
    }

    #[test]
    fn absurd_holds_are_not_applied() {
        let mut sync = synced();
        // Audio's report is off by a minute: no hold of a minute.
        sync.on_report(SenderReport { ssrc: AUDIO_SSRC, unix_secs: 40.0, rtp_timestamp: 0 });
        assert_eq!(feed(&mut sync, 0.0, 1.0, 0.030, 0.180), None);
        assert_eq!(sync.offsets(), [0.0, 0.0]);
    }

    #[test]
    fn presented_buffers_trace_back_to_their_capture() {
        let mut p = Presentation::default();
        p.on_scheduled(Media::Video, 1_000_000_000, 50.0);
        p.on_scheduled(Media::Video, 1_033_000_000, 50.033);
        p.on_scheduled(Media::Audio, 1_000_000_000, 50.0);
        // Decoded audio buffers may carry a PTS inside a scheduled packet.
        assert_eq!(p.on_presented(Media::Audio, 1_010_000_000, 50.110).map(|ms| ms.round()), Some(100.0));
        assert_eq!(p.on_presented(Media::Video, 1_033_000_000, 50.113).map(|ms| ms.round()), Some(80.0));
        // Nothing scheduled at or shortly before: no sample.
        assert_eq!(p.on_presented(Media::Video, 900_000_000, 50.2), None);
        assert_eq!(p.on_presented(Media::Video, 2_000_000_000, 51.2), None);
        // A capture time hours away is a stale mapping, not a latency.
        p.on_scheduled(Media::Video, 3_000_000_000, 50.0 - 7200.0);
        assert_eq!(p.on_presented(Media::Video, 3_000_000_000, 50.3), None);
        let all = p.since(0.0);
        assert_eq!(all.skew_ms().map(f64::round), Some(20.0));
        assert_eq!(p.since(50.112), PresentationSummary { video_ms: all.video_ms.clone(), audio_ms: vec![] });
        assert_eq!(p.since(50.112).skew_ms(), None);
    }
}
