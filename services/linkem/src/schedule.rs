//! The emulated link of one direction, as a pure function of time: given a
//! packet's arrival time and length, when it leaves or why it is dropped.
//!
//! A packet first meets random loss, then the rate limit (the link sends one
//! frame at a time, each taking `len * 8 / rate`; a frame that would wait
//! behind more than `queue_ms` of backlog is tail-dropped), then the
//! propagation delay with its jitter. Without `reorder`, a packet never
//! leaves before the one ahead of it (a jittered delay is raised to the
//! previous departure), as on a real wire. Settings change at any time and
//! apply to packets that arrive afterwards; packets already scheduled keep
//! their departure time, so a change loses nothing.
//!
//! Time is in nanoseconds on any monotonic clock; the driver passes it in.
//! The random numbers come from a seeded generator, so a test replays.

use serde::{Deserialize, Serialize};

/// How one direction of the link behaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// One-way propagation delay.
    pub delay_ms: f64,
    /// Delay variation: each packet's delay is uniform in
    /// `delay ± jitter` (never below 0), like netem's.
    pub jitter_ms: f64,
    /// Random loss, percent.
    pub loss_pct: f64,
    /// Link rate in kbit/s (Ethernet frames as sent, header included); 0 is
    /// unlimited.
    pub rate_kbit: u64,
    /// Tail drop: a frame is dropped when the frames queued ahead of it
    /// take longer than this to send at the rate.
    pub queue_ms: f64,
    /// Let jitter reorder packets.
    pub reorder: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { delay_ms: 0.0, jitter_ms: 0.0, loss_pct: 0.0, rate_kbit: 0, queue_ms: 100.0, reorder: false }
    }
}

/// A change of some settings; unset fields stay as they are. Also the
/// command-line options of every tool that changes a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// One-way delay, ms
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// Delay jitter, ms
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// Random loss, percent
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// Rate limit, kbit/s (0: unlimited)
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_kbit: Option<u64>,
    /// The rate limit's queue, ms at the rate
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Let jitter reorder packets
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<bool>,
}

/// A setting that cannot be applied, with the field and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("{field}: {value} must be a number of 0 or more")]
    Negative { field: &'static str, value: f64 },
    #[error("loss_pct: {0} is not a percentage from 0 to 100")]
    Loss(f64),
    #[error("queue_ms: {0} must be more than 0")]
    Queue(f64),
    #[error("{0:?}: expected key=value (keys: delay_ms jitter_ms loss_pct rate_kbit queue_ms reorder)")]
    Syntax(String),
    #[error("{key}: {value:?} is not a valid value")]
    Value { key: String, value: String },
}

impl Update {
    /// Parses `delay_ms=30,loss_pct=1.5,reorder=true` (commas or spaces
    /// between pairs; an empty text changes nothing).
    pub fn parse(text: &str) -> Result<Update, SettingsError> {
        let mut u = Update::default();
        for pair in text.split([',', ' ']).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| SettingsError::Syntax(pair.to_string()))?;
            let bad = || SettingsError::Value { key: key.to_string(), value: value.to_string() };
            let num = || value.parse::<f64>().map_err(|_| bad());
            match key {
                "delay_ms" => u.delay_ms = Some(num()?),
                "jitter_ms" => u.jitter_ms = Some(num()?),
                "loss_pct" => u.loss_pct = Some(num()?),
                "rate_kbit" => u.rate_kbit = Some(value.parse().map_err(|_| bad())?),
                "queue_ms" => u.queue_ms = Some(num()?),
                "reorder" => u.reorder = Some(value.parse().map_err(|_| bad())?),
                _ => return Err(SettingsError::Syntax(pair.to_string())),
            }
        }
        Ok(u)
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Update::default()
    }

    /// `base` with this update applied, checked.
    pub fn apply(&self, base: &Settings) -> Result<Settings, SettingsError> {
        let s = Settings {
            delay_ms: self.delay_ms.unwrap_or(base.delay_ms),
            jitter_ms: self.jitter_ms.unwrap_or(base.jitter_ms),
            loss_pct: self.loss_pct.unwrap_or(base.loss_pct),
            rate_kbit: self.rate_kbit.unwrap_or(base.rate_kbit),
            queue_ms: self.queue_ms.unwrap_or(base.queue_ms),
            reorder: self.reorder.unwrap_or(base.reorder),
        };
        s.check()?;
        Ok(s)
    }
}

impl std::fmt::Display for Update {
    /// The `key=value,...` form [`Update::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let mut num = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        num("delay_ms", self.delay_ms);
        num("jitter_ms", self.jitter_ms);
        num("loss_pct", self.loss_pct);
        num("queue_ms", self.queue_ms);
        if let Some(r) = self.rate_kbit {
            parts.push(format!("rate_kbit={r}"));
        }
        if let Some(r) = self.reorder {
            parts.push(format!("reorder={r}"));
        }
        f.write_str(&parts.join(","))
    }
}

impl Settings {
    /// Checks every field's range.
    pub fn check(&self) -> Result<(), SettingsError> {
        for (field, value) in [("delay_ms", self.delay_ms), ("jitter_ms", self.jitter_ms)] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(SettingsError::Negative { field, value });
            }
        }
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return Err(SettingsError::Loss(self.loss_pct));
        }
        if !(self.queue_ms > 0.0 && self.queue_ms.is_finite()) {
            return Err(SettingsError::Queue(self.queue_ms));
        }
        Ok(())
    }
}

/// A small seeded generator (SplitMix64): fast, and the same sequence on
/// every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it at this time (ns).
    Forward { at_ns: u64 },
    /// Lost at random.
    DropLoss,
    /// The rate limit's queue is full.
    DropQueue,
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

/// One direction of the link: settings, the rate limiter's state and the
/// last departure.
#[derive(Debug, Clone)]
pub struct Scheduler {
    settings: Settings,
    rng: Rng,
    /// When the rate-limited link finishes sending what it has accepted.
    link_free_at: u64,
    /// The latest departure handed out.
    last_departure: u64,
}

impl Scheduler {
    pub fn new(settings: Settings, seed: u64) -> Scheduler {
        Scheduler { settings, rng: Rng::new(seed), link_free_at: 0, last_departure: 0 }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// New settings for packets that arrive from now on.
    pub fn set(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Time to send `len` bytes at the rate (0 when unlimited).
    pub fn serialization_ns(&self, len: usize) -> u64 {
        match self.settings.rate_kbit {
            0 => 0,
            kbit => ((len as u128 * 8_000_000) / kbit as u128) as u64,
        }
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now_ns`.
    pub fn on_packet(&mut self, now_ns: u64, len: usize) -> Verdict {
        let s = self.settings;
        if s.loss_pct > 0.0 && self.rng.next_f64() * 100.0 < s.loss_pct {
            return Verdict::DropLoss;
        }
        let sent = if s.rate_kbit > 0 {
            let start = self.link_free_at.max(now_ns);
            if start - now_ns > ms_to_ns(s.queue_ms) {
                return Verdict::DropQueue;
            }
            self.link_free_at = start + self.serialization_ns(len);
            self.link_free_at
        } else {
            now_ns
        };
        let mut delay = ms_to_ns(s.delay_ms) as i64;
        if s.jitter_ms > 0.0 {
            let j = ms_to_ns(s.jitter_ms) as i64;
            delay += (self.rng.next_f64() * (2 * j + 1) as f64) as i64 - j;
        }
        let mut at = sent + delay.max(0) as u64;
        if !s.reorder {
            at = at.max(self.last_departure);
        }
        self.last_departure = self.last_departure.max(at);
        Verdict::Forward { at_ns: at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn with(u: &str) -> Settings {
        Update::parse(u).unwrap().apply(&Settings::default()).unwrap()
    }

    fn at(v: Verdict) -> u64 {
        match v {
            Verdict::Forward { at_ns } => at_ns,
            other => panic!("expected a departure, got {other:?}"),
        }
    }

    #[test]
    fn a_clean_link_forwards_at_once() {
        let mut s = Scheduler::new(Settings::default(), 1);
        assert_eq!(s.on_packet(5 * MS, 1500), Verdict::Forward { at_ns: 5 * MS });
    }

    #[test]
    fn delay_is_added() {
        let mut s = Scheduler::new(with("delay_ms=30"), 1);
        assert_eq!(at(s.on_packet(MS, 100)), 31 * MS);
        assert_eq!(at(s.on_packet(2 * MS, 100)), 32 * MS);
    }

    #[test]
    fn jitter_stays_in_its_band_and_keeps_order() {
        let mut s = Scheduler::new(with("delay_ms=20,jitter_ms=5"), 7);
        let mut last = 0;
        for i in 0..10_000u64 {
            let now = i * 100_000; // 0.1 ms apart: jitter alone would reorder
            let t = at(s.on_packet(now, 100));
            assert!(t >= last, "packet {i} leaves before the one ahead of it");
            assert!(t >= now + 15 * MS && t <= now + 25 * MS);
            last = t;
        }
        // Sparse packets see the whole band.
        let delays: Vec<u64> =
            (0..1000u64).map(|i| 2000 * MS + i * 50 * MS).map(|now| at(s.on_packet(now, 100)) - now).collect();
        assert!(delays.iter().all(|d| (15 * MS..=25 * MS).contains(d)));
        assert!(*delays.iter().min().unwrap() < 16 * MS && *delays.iter().max().unwrap() > 24 * MS);
    }

    #[test]
    fn jitter_reorders_when_asked() {
        let mut s = Scheduler::new(with("delay_ms=20,jitter_ms=5,reorder=true"), 7);
        let times: Vec<u64> = (0..1000u64).map(|i| at(s.on_packet(i * 100_000, 100))).collect();
        let inversions = times.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 100, "{inversions}");
        for (i, t) in times.iter().enumerate() {
            let now = i as u64 * 100_000;
            assert!(*t >= now + 15 * MS && *t <= now + 25 * MS);
        }
    }

    #[test]
    fn loss_is_binomial_and_replays_with_the_seed() {
        let n = 100_000;
        let run = |seed| {
            let mut s = Scheduler::new(with("loss_pct=10"), seed);
            (0..n).filter(|i| s.on_packet(*i as u64, 100) == Verdict::DropLoss).count()
        };
        let lost = run(42);
        // Mean 10000, sd about 95.
        assert!((lost as f64 - 10_000.0).abs() < 500.0, "{lost}");
        assert_eq!(run(42), lost);
        assert_ne!(run(43), lost);
    }

    #[test]
    fn rate_spaces_frames_by_their_serialization_time() {
        // 1000 kbit/s: a 1250-byte frame takes 10 ms.
        let mut s = Scheduler::new(with("rate_kbit=1000,queue_ms=1000"), 1);
        assert_eq!(s.serialization_ns(1250), 10 * MS);
        let times: Vec<u64> = (0..5).map(|_| at(s.on_packet(0, 1250))).collect();
        assert_eq!(times, [10 * MS, 20 * MS, 30 * MS, 40 * MS, 50 * MS]);
        // An idle link starts afresh.
        assert_eq!(at(s.on_packet(100 * MS, 1250)), 110 * MS);
    }

    #[test]
    fn a_full_queue_tail_drops() {
        // 10 ms per frame, 25 ms of queue: the fourth frame of a burst would
        // wait 30 ms.
        let mut s = Scheduler::new(with("rate_kbit=1000,queue_ms=25"), 1);
        let v: Vec<Verdict> = (0..5).map(|_| s.on_packet(0, 1250)).collect();
        assert!(matches!(v[0], Verdict::Forward { .. }));
        assert!(matches!(v[2], Verdict::Forward { .. }));
        assert_eq!(v[3], Verdict::DropQueue);
        assert_eq!(v[4], Verdict::DropQueue);
        // Once the queue drains, frames pass again.
        assert!(matches!(s.on_packet(15 * MS, 1250), Verdict::Forward { .. }));
    }

    #[test]
    fn rate_holds_over_a_long_run() {
        // Offer 2 Mbit/s to a 1 Mbit/s link for 10 s: about 1 Mbit/s leaves.
        let mut s = Scheduler::new(with("rate_kbit=1000"), 1);
        let mut bytes = 0u64;
        let mut last = 0;
        for i in 0..2000u64 {
            if let Verdict::Forward { at_ns } = s.on_packet(i * 5 * MS, 1250) {
                bytes += 1250;
                last = at_ns;
            }
        }
        let rate = bytes as f64 * 8.0 / (last as f64 / 1e9);
        assert!((rate - 1e6).abs() < 2e4, "{rate}");
    }

    #[test]
    fn a_lower_delay_never_overtakes_queued_packets() {
        let mut s = Scheduler::new(with("delay_ms=40"), 1);
        let first = at(s.on_packet(0, 100));
        s.set(with("delay_ms=5"));
        let second = at(s.on_packet(MS, 100));
        assert_eq!(first, 40 * MS);
        assert_eq!(second, 40 * MS, "waits for the packet ahead");
        assert_eq!(at(s.on_packet(50 * MS, 100)), 55 * MS);
    }

    #[test]
    fn updates_parse_apply_and_check() {
        let u = Update::parse("delay_ms=30, loss_pct=1.5 reorder=true rate_kbit=2000").unwrap();
        assert_eq!(u.delay_ms, Some(30.0));
        assert_eq!(u.rate_kbit, Some(2000));
        let s = u.apply(&Settings::default()).unwrap();
        assert!(s.reorder && s.loss_pct == 1.5 && s.queue_ms == 100.0);
        assert!(Update::parse("").unwrap().is_empty());
        assert_eq!(Update::parse(&u.to_string()).unwrap(), u);
        assert_eq!(u.to_string(), "delay_ms=30,loss_pct=1.5,rate_kbit=2000,reorder=true");
        assert_eq!(
            Update::parse("delay=3").unwrap_err().to_string(),
            "\"delay=3\": expected key=value (keys: delay_ms jitter_ms loss_pct rate_kbit queue_ms reorder)"
        );
        assert_eq!(Update::parse("rate_kbit=-1").unwrap_err().to_string(), "rate_kbit: \"-1\" is not a valid value");
        let e = Update { loss_pct: Some(120.0), ..Update::default() }.apply(&Settings::default()).unwrap_err();
        assert_eq!(e.to_string(), "loss_pct: 120 is not a percentage from 0 to 100");
        let e = Update { delay_ms: Some(-1.0), ..Update::default() }.apply(&Settings::default()).unwrap_err();
        assert_eq!(e.to_string(), "delay_ms: -1 must be a number of 0 or more");
    }
}
