//! Watching the streams a node receives, faster than heartbeats can: a
//! stream that has gone quiet gets its upstream pinged at once, with a
//! timeout of a few link round trips ([`ping_limit`]); no answer means the
//! upstream or the link is lost. An upstream that answers is left alone
//! (it may be repairing its own way up) and asked again a while later; a
//! stream that stays quiet far longer while its upstream answers is no
//! longer fed (the upstream dropped the branch), and is joined again.
//!
//! The driver calls [`Silence::tick`] every third of the silence limit with
//! how long each stream has been quiet, pings the upstreams it names and
//! repairs the streams it names. Time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::routing::RouteTable;
use crate::tree::Trees;

/// The shortest wait for a quiet stream's upstream to answer a ping.
pub const PING_FLOOR: Duration = Duration::from_millis(100);
/// An upstream pinged for a quiet stream is not pinged again sooner.
pub const RECHECK: Duration = Duration::from_secs(1);
/// A stream quiet this long while its upstream answers pings is no longer
/// fed: it is joined again. Longer than an upstream's own repair usually
/// takes, shorter than the 3.6 s after which viewers leave a POP that
/// answers.
pub const REJOIN_AFTER: Duration = Duration::from_secs(2);

/// How long a ping to neighbour `up` may take: three link round trips,
/// never less than [`PING_FLOOR`].
pub fn ping_limit(routes: &RouteTable, up: &str) -> Duration {
    let rtt = Duration::from_micros(2 * routes.link_delay_us(up).unwrap_or(0));
    (rtt * 3).max(PING_FLOOR)
}

/// What one look at the streams calls for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// Streams to join again (their branches now repair).
    pub rejoin: Vec<(String, String)>,
    /// Upstreams to ping now, each with its timeout.
    pub ping: Vec<(String, Duration)>,
}

/// The quiet streams' checks under way.
#[derive(Debug, Clone)]
pub struct Silence {
    limit: Duration,
    /// Upstreams pinged, and when they may be pinged again.
    next_check: BTreeMap<String, Instant>,
}

impl Silence {
    /// Streams quiet for `limit` get their upstream pinged.
    pub fn new(limit: Duration) -> Silence {
        Silence { limit, next_check: BTreeMap::new() }
    }

    /// How often [`Silence::tick`] should run.
    pub fn period(&self) -> Duration {
        (self.limit / 3).max(Duration::from_millis(10))
    }

    /// One look at the streams; `silent_ms` says how long each has been
    /// quiet (`None`: nothing received yet). Upstreams already known down
    /// are left to the repair under way.
    pub fn tick(
        &mut self,
        trees: &mut Trees,
        routes: &RouteTable,
        silent_ms: impl Fn(&str) -> Option<u64>,
        now: Instant,
    ) -> Watch {
        let mut watch = Watch::default();
        let rejoin_ms = REJOIN_AFTER.as_millis() as u64;
        for (stream, up) in trees.silent_branches(&silent_ms, rejoin_ms) {
            if !routes.is_down(&up) && trees.upstream_abandoned(&stream, &up) {
                watch.rejoin.push((stream, up));
            }
        }
        for up in trees.silent_upstreams(&silent_ms, self.limit.as_millis() as u64) {
            if routes.is_down(&up) || self.next_check.get(&up).is_some_and(|next| now < *next) {
                continue;
            }
            self.next_check.insert(up.clone(), now + RECHECK);
            watch.ping.push((up.clone(), ping_limit(routes, &up)));
        }
        self.next_check.retain(|_, next| now < *next);
        watch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingConfig;
    use crate::testing::{carrying, probe};

    /// o3 fed `test` by o2 (link round trip 80 ms), feeding o4.
    fn fed_by_o2(now: Instant) -> (Trees, RouteTable) {
        let neighbours = ["o2", "o4"].iter().map(|s| s.to_string()).collect();
        let mut routes = RouteTable::new("o3", neighbours, RoutingConfig::default());
        routes.on_link_rtt("o2", 80_000);
        routes.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 0), now, 0);
        let trees = carrying(&routes, "o2", "o4", now);
        (trees, routes)
    }

    #[test]
    fn a_quiet_stream_gets_its_upstream_pinged_once_a_recheck() {
        let now = Instant::now();
        let (mut trees, routes) = fed_by_o2(now);
        let mut s = Silence::new(Duration::from_millis(150));
        assert_eq!(s.period(), Duration::from_millis(50));
        assert_eq!(s.tick(&mut trees, &routes, |_| Some(100), now), Watch::default(), "not quiet long enough");
        let quiet = |_: &str| Some(200);
        // Three round trips of 80 ms (the link delay is half of one).
        let ping = vec![("o2".to_string(), Duration::from_millis(240))];
        assert_eq!(s.tick(&mut trees, &routes, quiet, now).ping, ping);
        assert!(s.tick(&mut trees, &routes, quiet, now + RECHECK / 2).ping.is_empty(), "asked lately");
        assert_eq!(s.tick(&mut trees, &routes, quiet, now + RECHECK).ping, ping);
    }

    #[test]
    fn an_upstream_known_down_is_left_to_the_repair() {
        let now = Instant::now();
        let (mut trees, mut routes) = fed_by_o2(now);
        routes.neighbour_down("o2");
        let mut s = Silence::new(Duration::from_millis(150));
        assert_eq!(s.tick(&mut trees, &routes, |_| Some(5_000), now), Watch::default());
    }

    #[test]
    fn a_stream_quiet_long_while_its_upstream_answers_is_joined_again_once() {
        let now = Instant::now();
        let (mut trees, routes) = fed_by_o2(now);
        let mut s = Silence::new(Duration::from_millis(150));
        let long = |_: &str| Some(REJOIN_AFTER.as_millis() as u64);
        let w = s.tick(&mut trees, &routes, long, now);
        assert_eq!(w.rejoin, [("test".to_string(), "o2".to_string())]);
        assert!(w.ping.is_empty(), "a repairing branch is not judged");
        assert!(trees.branch("test").unwrap().repairing);
        assert_eq!(s.tick(&mut trees, &routes, long, now), Watch::default());
        // Never anything for a stream not heard yet.
        let (mut fresh, routes) = fed_by_o2(now);
        assert_eq!(s.tick(&mut fresh, &routes, |_| None, now), Watch::default());
    }

    #[test]
    fn the_ping_limit_has_a_floor() {
        let routes = RouteTable::new("o3", vec!["o2".into()], RoutingConfig::default());
        assert_eq!(ping_limit(&routes, "o2"), PING_FLOOR);
    }
}
