//! One stream request sent upstream, as a state machine: it has one join
//! timeout in all, and a way that fails inside it (a refusal, or an
//! upstream that stopped answering) is followed by the next way to the
//! root, each neighbour once ([`Trees::redirect`]). Two nodes that asked
//! each other for the stream at the same moment (each with a stale view of
//! who carries it) refuse each other as a loop; the other side then goes
//! another way, so the same way is asked once more after a short pause.
//!
//! The driver sends the request [`Join::ask`] names, with the time left,
//! and hands a refusal to [`Join::refused`]; an answer ends the join
//! ([`Trees::joined`]), as does [`JoinStep::GiveUp`] ([`Trees::failed`]).
//! Time is passed in.

use std::time::{Duration, Instant};

use crate::routing::RouteTable;
use crate::tree::{NakReason, Trees};

/// A failed way is followed by another only if this much time is left.
pub const RETRY_FLOOR: Duration = Duration::from_millis(100);
/// The pause before a way refused as a crossing loop is asked again.
pub const CROSSING_PAUSE: Duration = Duration::from_millis(150);

/// What the driver does after a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinStep {
    /// Ask `to` now, with the time left.
    Ask { to: String, timeout: Duration },
    /// Wait `pause`, then ask `to` again (a crossing).
    AskAfter { to: String, pause: Duration },
    /// No way is left in the time: the join failed.
    GiveUp,
}

/// A stream request under way through one upstream after another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    stream: String,
    /// The request's path (who asked, this node last).
    path: Vec<String>,
    deadline: Instant,
    to: String,
    tried: Vec<String>,
    crossed: bool,
}

impl Join {
    /// A request for `stream` along `path`, first through `to`, with
    /// `timeout` in all from `now`.
    pub fn new(stream: &str, path: Vec<String>, to: String, now: Instant, timeout: Duration) -> Join {
        Join { stream: stream.to_string(), path, deadline: now + timeout, to, tried: Vec::new(), crossed: false }
    }

    /// The upstream asked now, and the time it has to answer.
    pub fn ask(&self, now: Instant) -> (&str, Duration) {
        (&self.to, self.deadline.saturating_duration_since(now))
    }

    /// The request's path.
    pub fn path(&self) -> &[String] {
        &self.path
    }

    /// The upstream asked last refused (or did not answer in time).
    pub fn refused(&mut self, reason: NakReason, trees: &mut Trees, routes: &RouteTable, now: Instant) -> JoinStep {
        self.tried.push(self.to.clone());
        let left = self.deadline.saturating_duration_since(now);
        let next =
            if left > RETRY_FLOOR { trees.redirect(&self.stream, &self.path, &self.tried, routes, now) } else { None };
        match next {
            Some(next) => {
                self.to = next.clone();
                JoinStep::Ask { to: next, timeout: left }
            }
            None if reason == NakReason::Loop && !self.crossed && left > CROSSING_PAUSE + RETRY_FLOOR => {
                self.crossed = true;
                JoinStep::AskAfter { to: self.to.clone(), pause: CROSSING_PAUSE }
            }
            None => JoinStep::GiveUp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Probe;
    use crate::tree::{JoinDecision, Requester};

    const TIMEOUT: Duration = Duration::from_secs(3);

    /// o4 has heard of s1 through o3 (2 hops) and o8 (3 hops); o5 asks it
    /// for `test`, so it joins through o3 first.
    fn joining(now: Instant) -> (Trees, RouteTable, Join) {
        let mut routes = crate::testing::table("o4", &["o3", "o5", "o8"]);
        for (via, visited) in [("o3", vec!["s1", "o3"]), ("o8", vec!["s1", "x", "o8"])] {
            let p = Probe {
                server: "s1".into(),
                seq: 1,
                send_time_unix_us: 0,
                hops: visited.len() as u32,
                visited: visited.iter().map(|s| s.to_string()).collect(),
                path_delay_us: 1_000,
                best_delay_us: 1_000,
                streams: vec!["test".into()],
                sender: via.into(),
                withdrawn: false,
            };
            routes.on_probe(&p, now, 0);
        }
        let mut trees = Trees::new("o4", []);
        let path = ["o5".to_string(), "o4".to_string()];
        let JoinDecision::Forward { to, path } =
            trees.request("test", Requester::Neighbour("o5".into()), &path[..1], 1, &routes, now)
        else {
            panic!("the request goes upstream")
        };
        let join = Join::new("test", path, to, now, TIMEOUT);
        (trees, routes, join)
    }

    #[test]
    fn a_refused_way_is_followed_by_the_next_each_neighbour_once() {
        let now = Instant::now();
        let (mut trees, routes, mut join) = joining(now);
        assert_eq!(join.ask(now), ("o3", TIMEOUT));
        assert_eq!(join.path(), ["o5", "o4"]);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            join.refused(NakReason::NoRoute, &mut trees, &routes, later),
            JoinStep::Ask { to: "o8".into(), timeout: TIMEOUT - Duration::from_secs(1) }
        );
        assert_eq!(join.ask(later).0, "o8");
        assert_eq!(join.refused(NakReason::Timeout, &mut trees, &routes, later), JoinStep::GiveUp, "o3 and o8 tried");
    }

    #[test]
    fn no_next_way_when_too_little_time_is_left() {
        let now = Instant::now();
        let (mut trees, routes, mut join) = joining(now);
        let late = now + TIMEOUT - RETRY_FLOOR;
        assert_eq!(join.refused(NakReason::NoRoute, &mut trees, &routes, late), JoinStep::GiveUp);
    }

    #[test]
    fn a_crossing_is_asked_again_once_after_a_pause() {
        let now = Instant::now();
        let (mut trees, routes, mut join) = joining(now);
        assert!(matches!(join.refused(NakReason::Loop, &mut trees, &routes, now), JoinStep::Ask { .. }));
        // o8 refuses as a loop too, and no way is left: o8 once more.
        assert_eq!(
            join.refused(NakReason::Loop, &mut trees, &routes, now),
            JoinStep::AskAfter { to: "o8".into(), pause: CROSSING_PAUSE }
        );
        assert_eq!(join.refused(NakReason::Loop, &mut trees, &routes, now), JoinStep::GiveUp, "once");
    }
}
