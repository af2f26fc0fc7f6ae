//! Client sessions at a POP: CONNECT_POP opens one, SETUP binds it to a
//! stream and an RTP destination, PLAY and PAUSE switch the unicast copy on
//! and off, TEARDOWN ends it. Session ids come from the driver (random) so
//! this state stays deterministic.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected, no stream yet.
    Connected,
    /// Set up: the POP carries the stream, nothing is sent yet.
    Ready,
    Playing,
    Paused,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connected => "connected",
            Phase::Ready => "ready",
            Phase::Playing => "playing",
            Phase::Paused => "paused",
        })
    }
}

/// Session ids are 32 hex digits; anything sent as one is shown by at
/// most this many characters in errors and logs.
pub const ID_SHOWN: usize = 8;

/// The first [`ID_SHOWN`] characters of a session id, for messages.
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(ID_SHOWN) {
        Some((at, _)) => &id[..at],
        None => id,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("session {}: no such session", short_id(.0))]
    Unknown(String),
    #[error("session {}: cannot {op} while {phase}", short_id(.id))]
    BadPhase { id: String, op: &'static str, phase: Phase },
    /// RTP may only go to the host that asked for it (RFC 7826 §21).
    #[error("session {}: media may only go to the address the session was opened from ({peer}), not {dest}", short_id(.id))]
    ForeignDestination { id: String, peer: IpAddr, dest: IpAddr },
    #[error("too many sessions from {peer}: at most {limit} per client address")]
    TooManyFromAddress { peer: IpAddr, limit: usize },
    #[error("too many sessions at this POP: at most {limit}")]
    TooMany { limit: usize },
}

/// Bounds on open sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub per_address: usize,
    pub total: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits { per_address: 16, total: 1024 }
    }
}

/// Where one track of a stream goes for a player that takes RTP and RTCP
/// on two ports (RTSP over UDP). `track` indexes the stream's SSRCs
/// (video first, then audio).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackDest {
    pub track: usize,
    pub rtp: SocketAddr,
    pub rtcp: SocketAddr,
    /// The packets go to a loopback socket of the POP's own, which writes
    /// them into the player's RTSP connection (RTP/AVP/TCP).
    pub interleaved: bool,
}

/// What a player's RTCP receiver reports (RFC 3550 §6.4.1) say about
/// one track it receives: the latest report's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reception {
    /// Reports taken in.
    pub reports: u64,
    /// Packets lost since the player's previous report, out of 256.
    pub fraction_lost: u8,
    /// Packets lost since the start (negative when duplicates arrived).
    pub cumulative_lost: i32,
    /// The highest sequence number received, extended with its cycles.
    pub highest_seq: u32,
    /// Interarrival jitter in microseconds.
    pub jitter_us: u64,
}

/// One report block of a receiver report, as it came (see [`Reception`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportBlock {
    pub ssrc: u32,
    pub fraction_lost: u8,
    /// The 24-bit field, two's complement.
    pub cumulative_lost: u32,
    pub highest_seq: u32,
    /// In the track's timestamp units.
    pub jitter: u32,
}

impl Reception {
    /// Takes in one report block for a track with `clock_rate` Hz.
    pub fn update(&mut self, block: &ReportBlock, clock_rate: u32) {
        self.reports += 1;
        self.fraction_lost = block.fraction_lost;
        // Sign-extend the 24-bit count.
        self.cumulative_lost = ((block.cumulative_lost << 8) as i32) >> 8;
        self.highest_seq = block.highest_seq;
        self.jitter_us = u64::from(block.jitter) * 1_000_000 / u64::from(clock_rate.max(1));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub client: String,
    /// The address the session was opened from: its media goes there only.
    pub peer: IpAddr,
    pub phase: Phase,
    pub stream: Option<String>,
    pub rtp_dest: Option<SocketAddr>,
    /// Per-track destinations (RTSP players), instead of `rtp_dest`.
    pub tracks: Vec<TrackDest>,
    /// The last time the client was heard (any request, a keepalive, or
    /// an RTCP report).
    pub last_seen: Instant,
    /// What the player's receiver reports say, per track.
    pub reception: BTreeMap<usize, Reception>,
}

#[derive(Debug, Clone, Default)]
pub struct Sessions {
    sessions: BTreeMap<String, Session>,
    limits: SessionLimits,
    pub counts: SessionCounts,
}

/// Sessions since the node started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub opened: u64,
    /// Refused because the POP holds its most sessions.
    pub refused_full: u64,
    /// Refused because their client address holds its most sessions.
    pub refused_address: u64,
    /// Ended because their client went silent.
    pub timed_out: u64,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Sessions {
        Sessions { sessions: BTreeMap::new(), limits, counts: SessionCounts::default() }
    }

    /// Opens a session for a client at `peer`, within the limits.
    pub fn connect(&mut self, id: String, client: String, peer: IpAddr, now: Instant) -> Result<(), SessionError> {
        if self.sessions.len() >= self.limits.total {
            self.counts.refused_full += 1;
            return Err(SessionError::TooMany { limit: self.limits.total });
        }
        if self.sessions.values().filter(|s| s.peer == peer).count() >= self.limits.per_address {
            self.counts.refused_address += 1;
            return Err(SessionError::TooManyFromAddress { peer, limit: self.limits.per_address });
        }
        self.counts.opened += 1;
        let session = Session {
            client,
            peer,
            phase: Phase::Connected,
            stream: None,
            rtp_dest: None,
            tracks: Vec::new(),
            last_seen: now,
            reception: BTreeMap::new(),
        };
        self.sessions.insert(id, session);
        Ok(())
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The client is still there.
    pub fn touch(&mut self, id: &str, now: Instant) -> Result<Phase, SessionError> {
        let s = self.get_mut(id)?;
        s.last_seen = now;
        Ok(s.phase)
    }

    /// Ends the sessions whose client has not been heard for `idle` (it
    /// crashed or lost its network) and returns them. A session whose
    /// stream is `starved` (no media comes to this node, e.g. a publisher
    /// in its grace period) counts as heard: players report on the media
    /// they get, and one that gets none has nothing to say.
    pub fn expire(&mut self, now: Instant, idle: Duration, starved: impl Fn(&str) -> bool) -> Vec<(String, Session)> {
        for s in self.sessions.values_mut() {
            if s.stream.as_deref().is_some_and(&starved) {
                s.last_seen = now;
            }
        }
        let gone: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) > idle)
            .map(|(id, _)| id.clone())
            .collect();
        self.counts.timed_out += gone.len() as u64;
        gone.into_iter().filter_map(|id| self.sessions.remove(&id).map(|s| (id, s))).collect()
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut Session, SessionError> {
        self.sessions.get_mut(id).ok_or_else(|| SessionError::Unknown(id.to_string()))
    }

    fn expect(&mut self, id: &str, op: &'static str, allowed: &[Phase]) -> Result<&mut Session, SessionError> {
        let s = self.get_mut(id)?;
        if !allowed.contains(&s.phase) {
            return Err(SessionError::BadPhase { id: id.to_string(), op, phase: s.phase });
        }
        Ok(s)
    }

    /// Checks that SETUP may proceed (the tree join happens in between):
    /// the session is fresh and its media would go back to its own host.
    pub fn check_setup_to(&mut self, id: &str, dest: IpAddr) -> Result<(), SessionError> {
        let s = self.expect(id, "SETUP", &[Phase::Connected])?;
        if s.peer != dest {
            return Err(SessionError::ForeignDestination { id: id.to_string(), peer: s.peer, dest });
        }
        Ok(())
    }

    /// SETUP succeeded: the POP carries `stream`.
    pub fn set_up(&mut self, id: &str, stream: String, dest: SocketAddr) -> Result<(), SessionError> {
        let s = self.expect(id, "SETUP", &[Phase::Connected])?;
        if s.peer != dest.ip() {
            return Err(SessionError::ForeignDestination { id: id.to_string(), peer: s.peer, dest: dest.ip() });
        }
        s.phase = Phase::Ready;
        s.stream = Some(stream);
        s.rtp_dest = Some(dest);
        Ok(())
    }

    /// SETUP of one track (RTSP): the first binds the session to `stream`,
    /// later ones add tracks of the same stream (or replace one).
    pub fn set_up_track(&mut self, id: &str, stream: &str, dest: TrackDest) -> Result<(), SessionError> {
        let s = self.expect(id, "SETUP", &[Phase::Connected, Phase::Ready])?;
        for ip in [dest.rtp.ip(), dest.rtcp.ip()] {
            // Interleaved: the POP's own loopback socket, bound to the
            // player's connection, is the only other place media may go.
            let own = dest.interleaved && ip.is_loopback();
            if s.peer != ip && !own {
                return Err(SessionError::ForeignDestination { id: id.to_string(), peer: s.peer, dest: ip });
            }
        }
        if s.phase == Phase::Ready && s.stream.as_deref() != Some(stream) {
            return Err(SessionError::BadPhase { id: id.to_string(), op: "SETUP of another stream", phase: s.phase });
        }
        s.phase = Phase::Ready;
        s.stream = Some(stream.to_string());
        s.tracks.retain(|t| t.track != dest.track);
        s.tracks.push(dest);
        Ok(())
    }

    pub fn play(&mut self, id: &str) -> Result<Phase, SessionError> {
        let s = self.expect(id, "PLAY", &[Phase::Ready, Phase::Paused, Phase::Playing])?;
        s.phase = Phase::Playing;
        Ok(s.phase)
    }

    pub fn pause(&mut self, id: &str) -> Result<Phase, SessionError> {
        let s = self.expect(id, "PAUSE", &[Phase::Playing, Phase::Paused])?;
        s.phase = Phase::Paused;
        Ok(s.phase)
    }

    /// Ends the session; returns it so the driver can leave its stream.
    pub fn teardown(&mut self, id: &str) -> Result<Session, SessionError> {
        self.sessions.remove(id).ok_or_else(|| SessionError::Unknown(id.to_string()))
    }

    /// RTP destinations of the sessions playing `stream`.
    pub fn playing(&self, stream: &str) -> impl Iterator<Item = SocketAddr> + '_ {
        let stream = stream.to_string();
        self.sessions
            .values()
            .filter(move |s| s.phase == Phase::Playing && s.stream.as_deref() == Some(stream.as_str()))
            .filter_map(|s| s.rtp_dest)
    }

    /// Per-track destinations of the sessions playing `stream`.
    pub fn playing_tracks(&self, stream: &str) -> impl Iterator<Item = TrackDest> + '_ {
        let stream = stream.to_string();
        self.sessions
            .values()
            .filter(move |s| s.phase == Phase::Playing && s.stream.as_deref() == Some(stream.as_str()))
            .flat_map(|s| s.tracks.iter().copied())
    }

    /// The session and track a UDP player sends its RTCP from `addr` for
    /// (its RTCP port is where the POP sends the track's RTCP).
    pub fn track_by_rtcp(&self, addr: SocketAddr) -> Option<(String, usize)> {
        self.sessions.iter().find_map(|(id, s)| {
            s.tracks.iter().find(|t| !t.interleaved && t.rtcp == addr).map(|t| (id.clone(), t.track))
        })
    }

    /// Takes in the report blocks of one RTCP packet for a track of
    /// session `id`: the player is alive (a report keeps the session as a
    /// keepalive does, also one with no block yet).
    pub fn report(
        &mut self,
        id: &str,
        track: usize,
        blocks: &[ReportBlock],
        clock_rate: u32,
        now: Instant,
    ) -> Result<(), SessionError> {
        let s = self.get_mut(id)?;
        s.last_seen = now;
        for block in blocks {
            s.reception.entry(track).or_default().update(block, clock_rate);
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Session)> {
        self.sessions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn life_of_a_session() {
        let mut s = Sessions::default();
        let dest: SocketAddr = "10.0.6.20:5000".parse().unwrap();
        s.connect("a".into(), "c1".into(), dest.ip(), Instant::now()).unwrap();
        assert_eq!(s.play("a").unwrap_err().to_string(), "session a: cannot PLAY while connected");
        s.check_setup_to("a", dest.ip()).unwrap();
        s.set_up("a", "test".into(), dest).unwrap();
        assert_eq!(s.playing("test").count(), 0);
        s.play("a").unwrap();
        assert_eq!(s.playing("test").collect::<Vec<_>>(), [dest]);
        s.pause("a").unwrap();
        assert_eq!(s.playing("test").count(), 0);
        s.play("a").unwrap();
        assert!(s.check_setup_to("a", dest.ip()).is_err());
        let gone = s.teardown("a").unwrap();
        assert_eq!(gone.stream.as_deref(), Some("test"));
        assert_eq!(s.teardown("a").unwrap_err(), SessionError::Unknown("a".into()));
    }

    #[test]
    fn an_rtsp_session_sets_up_each_track_of_one_stream_to_its_own_host() {
        let mut s = Sessions::default();
        let me: IpAddr = "10.0.6.20".parse().unwrap();
        s.connect("r".into(), "rtsp".into(), me, Instant::now()).unwrap();
        let track = |track, port: u16, ip: IpAddr| TrackDest {
            track,
            rtp: SocketAddr::new(ip, port),
            rtcp: SocketAddr::new(ip, port + 1),
            interleaved: false,
        };
        let other: IpAddr = "10.0.7.20".parse().unwrap();
        assert!(matches!(
            s.set_up_track("r", "test", track(0, 5000, other)),
            Err(SessionError::ForeignDestination { .. })
        ));
        s.set_up_track("r", "test", track(0, 5000, me)).unwrap();
        s.set_up_track("r", "test", track(1, 5002, me)).unwrap();
        assert!(s.set_up_track("r", "clip", track(1, 5002, me)).is_err(), "one stream per session");
        assert_eq!(s.playing_tracks("test").count(), 0);
        s.play("r").unwrap();
        assert_eq!(s.playing_tracks("test").collect::<Vec<_>>(), [track(0, 5000, me), track(1, 5002, me)]);
        assert_eq!(s.playing("test").count(), 0, "no one-port destination");
        assert!(s.set_up_track("r", "test", track(0, 5004, me)).is_err(), "no SETUP while playing");
        s.pause("r").unwrap();
        assert_eq!(s.playing_tracks("test").count(), 0);

        // Interleaved: the POP's own loopback socket, and nothing else.
        s.connect("t".into(), "rtsp".into(), me, Instant::now()).unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mut inner = track(0, 40000, lo);
        assert!(s.set_up_track("t", "test", inner).is_err(), "loopback only when interleaved");
        inner.interleaved = true;
        s.set_up_track("t", "test", inner).unwrap();
        let mut foreign = track(1, 5000, other);
        foreign.interleaved = true;
        assert!(s.set_up_track("t", "test", foreign).is_err(), "interleaved does not open other hosts");
    }

    #[test]
    fn receiver_reports_are_matched_by_port_and_keep_the_session() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let me: IpAddr = "10.0.6.20".parse().unwrap();
        s.connect("r".into(), "rtsp".into(), me, t0).unwrap();
        for (track, port) in [(0, 5000), (1, 5002)] {
            let dest = TrackDest {
                track,
                rtp: SocketAddr::new(me, port),
                rtcp: SocketAddr::new(me, port + 1),
                interleaved: false,
            };
            s.set_up_track("r", "test", dest).unwrap();
        }
        assert_eq!(s.track_by_rtcp("10.0.6.20:5003".parse().unwrap()), Some(("r".into(), 1)));
        assert_eq!(s.track_by_rtcp("10.0.6.20:5000".parse().unwrap()), None, "an RTP port sends no reports");
        assert_eq!(s.track_by_rtcp("10.0.6.21:5003".parse().unwrap()), None, "another host");
        // 3 of 256 lost lately, 0xFFFFFF = -1 in all (a duplicate), 480
        // units of a 48 kHz clock = 10 ms of jitter.
        let block =
            ReportBlock { ssrc: 7, fraction_lost: 3, cumulative_lost: 0xFF_FFFF, highest_seq: 70_000, jitter: 480 };
        let later = t0 + Duration::from_secs(50);
        s.report("r", 1, &[block], 48_000, later).unwrap();
        let r = s.get("r").unwrap().reception[&1];
        assert_eq!(
            r,
            Reception { reports: 1, fraction_lost: 3, cumulative_lost: -1, highest_seq: 70_000, jitter_us: 10_000 }
        );
        assert!(
            s.expire(t0 + Duration::from_secs(60), Duration::from_secs(30), |_| false).is_empty(),
            "the report kept it alive"
        );
        assert!(s.report("gone", 0, &[block], 90_000, later).is_err());
        // An empty report keeps the session too, and adds no figures.
        s.report("r", 0, &[], 90_000, t0 + Duration::from_secs(80)).unwrap();
        assert!(s.expire(t0 + Duration::from_secs(100), Duration::from_secs(30), |_| false).is_empty());
        assert!(!s.get("r").unwrap().reception.contains_key(&0));
    }

    #[test]
    fn silent_clients_expire() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let ip: IpAddr = "10.0.6.20".parse().unwrap();
        s.connect("a".into(), "c1".into(), ip, t0).unwrap();
        s.connect("b".into(), "c2".into(), ip, t0).unwrap();
        s.set_up("a", "test".into(), "10.0.6.20:5000".parse().unwrap()).unwrap();
        s.touch("b", t0 + Duration::from_secs(8)).unwrap();
        assert!(s.expire(t0 + Duration::from_secs(9), Duration::from_secs(10), |_| false).is_empty());
        let gone = s.expire(t0 + Duration::from_secs(11), Duration::from_secs(10), |_| false);
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0.as_str(), gone[0].1.stream.as_deref()), ("a", Some("test")));
        assert!(s.touch("a", t0).is_err());
        assert_eq!(s.touch("b", t0 + Duration::from_secs(12)), Ok(Phase::Connected));
    }

    #[test]
    fn viewers_of_a_starved_stream_do_not_expire() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let ip: IpAddr = "10.0.6.20".parse().unwrap();
        s.connect("a".into(), "c1".into(), ip, t0).unwrap();
        s.set_up("a", "cam".into(), "10.0.6.20:5000".parse().unwrap()).unwrap();
        let idle = Duration::from_secs(10);
        assert!(s.expire(t0 + Duration::from_secs(30), idle, |stream| stream == "cam").is_empty());
        // Media is back at 30 s: the viewer has `idle` from then to speak.
        assert!(s.expire(t0 + Duration::from_secs(39), idle, |_| false).is_empty());
        assert_eq!(s.expire(t0 + Duration::from_secs(41), idle, |_| false).len(), 1);
        assert_eq!(s.counts.timed_out, 1);
    }

    #[test]
    fn media_goes_only_to_the_host_that_asked() {
        let mut s = Sessions::default();
        let me: IpAddr = "10.0.6.20".parse().unwrap();
        s.connect("a".repeat(32), "c1".into(), me, Instant::now()).unwrap();
        let id = "a".repeat(32);
        let victim: IpAddr = "10.0.7.20".parse().unwrap();
        let err = s.check_setup_to(&id, victim).unwrap_err();
        assert_eq!(
            err.to_string(),
            "session aaaaaaaa: media may only go to the address the session was opened from (10.0.6.20), not 10.0.7.20"
        );
        assert!(s.set_up(&id, "test".into(), SocketAddr::new(victim, 5000)).is_err());
        s.check_setup_to(&id, me).unwrap();
        s.set_up(&id, "test".into(), SocketAddr::new(me, 5000)).unwrap();
    }

    #[test]
    fn sessions_are_bounded_per_address_and_in_total() {
        let mut s = Sessions::new(SessionLimits { per_address: 2, total: 3 });
        let (a, b): (IpAddr, IpAddr) = ("10.0.6.20".parse().unwrap(), "10.0.6.21".parse().unwrap());
        let now = Instant::now();
        s.connect("1".into(), "c".into(), a, now).unwrap();
        s.connect("2".into(), "c".into(), a, now).unwrap();
        assert_eq!(
            s.connect("3".into(), "c".into(), a, now),
            Err(SessionError::TooManyFromAddress { peer: a, limit: 2 })
        );
        s.connect("3".into(), "c".into(), b, now).unwrap();
        assert_eq!(s.connect("4".into(), "c".into(), b, now), Err(SessionError::TooMany { limit: 3 }));
        s.teardown("1").unwrap();
        s.connect("4".into(), "c".into(), a, now).unwrap();
        assert_eq!(s.len(), 3);
        let c = s.counts;
        assert_eq!((c.opened, c.refused_address, c.refused_full, c.timed_out), (4, 1, 1, 0));
    }

    #[test]
    fn errors_show_only_a_prefix_of_what_was_sent() {
        let mut s = Sessions::default();
        let huge = "x".repeat(1 << 20);
        assert_eq!(s.play(&huge).unwrap_err().to_string(), "session xxxxxxxx: no such session");
    }
}
