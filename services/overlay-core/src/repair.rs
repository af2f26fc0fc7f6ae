//! One branch's tree repair as a state machine: which neighbour to ask
//! next, when a round of attempts is over, when to give up and hand the
//! downstreams their own search (the orphan hand-off), and when to wait.
//!
//! The driver asks [`Repair::next`] what to do, carries it out (a join
//! request to the neighbour named, or a wait of one heartbeat), and tells
//! the outcome back: [`Repair::refused`] for a refusal or a timeout,
//! [`Repair::undone`] when the answer put the branch below itself. A
//! success ends the repair ([`crate::tree::Trees::repaired`]). No clock and
//! no sockets here: the same inputs give the same steps.

use std::time::Instant;

use crate::routing::RouteTable;
use crate::tree::{NakReason, Trees};

/// Attempts (refusals, and rounds with no way left) before the branch's
/// downstreams are told to look on their own (at once when the first
/// round has no way at all, or only ways that loop).
pub const GIVE_UP_AFTER: u32 = 5;

/// What the driver does next for a repairing branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask `to` to feed the branch: a join request along `path`.
    Ask { to: String, path: Vec<String> },
    /// Wait a heartbeat, then ask [`Repair::next`] again; first tell the
    /// downstreams to look on their own when `orphan` (see
    /// [`Trees::orphan`]).
    Wait { orphan: bool },
    /// The branch no longer repairs (repaired, pruned or gone): stop.
    Done,
}

/// What the driver does after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterRefusal {
    /// Tell the downstreams to look on their own first.
    pub orphan: bool,
    /// Wait a heartbeat before the next attempt (a loop refusal is
    /// answered at once: the next way may be fine).
    pub wait: bool,
}

/// The repair of one stream's branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    stream: String,
    /// Neighbours not to ask in the first round (the way that just
    /// failed).
    avoid: Vec<String>,
    /// Neighbours asked this round, `avoid` included.
    tried: Vec<String>,
    /// Attempts so far that came to nothing.
    stuck: u32,
    /// Whether every way tried this round led back into the branch's own
    /// subtree: then no later round does better, and the downstreams are
    /// better off looking on their own at once.
    only_loops: bool,
}

impl Repair {
    pub fn new(stream: impl Into<String>, avoid: Vec<String>) -> Repair {
        Repair { stream: stream.into(), tried: avoid.clone(), avoid, stuck: 0, only_loops: true }
    }

    /// The next step, from the branch's state and the routes now.
    pub fn next(&mut self, trees: &Trees, routes: &RouteTable, now: Instant) -> Step {
        if trees.branch(&self.stream).is_none_or(|b| !b.repairing) {
            return Step::Done;
        }
        match trees.repair_target(&self.stream, routes, now, &self.tried) {
            Ok((to, path)) => Step::Ask { to, path },
            Err(_) => {
                // A round is over with no way left: start the next one from
                // scratch after a wait (routes change meanwhile).
                self.stuck += 1;
                let tried_some = self.tried.len() > self.avoid.len();
                let looped = self.only_loops && tried_some;
                // No way at all at the first look: every neighbour left is
                // a downstream, so the only ways up run through the
                // subtree. The downstreams look on their own at once
                // rather than after five rounds of nothing.
                let walled_in = self.stuck == 1 && !tried_some;
                let orphan = self.stuck == GIVE_UP_AFTER || looped || walled_in;
                self.only_loops = true;
                // The neighbour avoided (it gave up, or its link failed)
                // may have found a way meanwhile, or restarted: from the
                // next round on it is asked like any other.
                self.avoid.clear();
                self.tried.clear();
                Step::Wait { orphan }
            }
        }
    }

    /// `to` refused to feed the branch (or did not answer in time).
    pub fn refused(&mut self, to: &str, reason: NakReason) -> AfterRefusal {
        self.only_loops &= reason == NakReason::Loop;
        self.tried.push(to.to_string());
        self.stuck += 1;
        AfterRefusal { orphan: self.stuck == GIVE_UP_AFTER, wait: reason != NakReason::Loop }
    }

    /// `to` answered, but the answer would put the branch below itself (or
    /// the branch went meanwhile): the driver leaves `to`; the next step
    /// tries elsewhere at once. It counts as a loop.
    pub fn undone(&mut self, to: &str) {
        self.tried.push(to.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{carrying, probe};
    use crate::tree::StreamDesc;

    /// o3 fed by o2 from s1, feeding o4; `ways` are (neighbour, path from
    /// the server) it has heard a probe from. o2 then goes down.
    fn lost_upstream(ways: &[(&str, &[&str])], now: Instant) -> (Trees, RouteTable) {
        let mut routes = crate::testing::table("o3", &["o2", "o4", "o9"]);
        for (via, path) in ways {
            routes.on_probe(&probe("s1", 1, via, path, 0), now, 0);
        }
        let mut trees = carrying(&routes, "o2", "o4", now);
        routes.neighbour_down("o2");
        assert_eq!(trees.upstream_lost("o2"), ["test"]);
        (trees, routes)
    }

    #[test]
    fn asks_each_way_once_a_round_then_waits_and_starts_over() {
        let now = Instant::now();
        let (trees, routes) = lost_upstream(&[("o9", &["s1", "o9"])], now);
        let mut r = Repair::new("test", vec!["o2".into()]);
        assert_eq!(r.next(&trees, &routes, now), Step::Ask { to: "o9".into(), path: vec!["o3".into()] });
        assert_eq!(r.refused("o9", NakReason::Timeout), AfterRefusal { orphan: false, wait: true });
        assert_eq!(r.next(&trees, &routes, now), Step::Wait { orphan: false }, "o9 tried, o4 is downstream");
        assert_eq!(r.next(&trees, &routes, now), Step::Ask { to: "o9".into(), path: vec!["o3".into()] }, "a new round");
    }

    #[test]
    fn a_round_of_loops_only_hands_the_downstreams_their_own_search_at_once() {
        // The only way left runs back into the subtree: o9's answer says
        // the stream would come through o3 itself.
        let now = Instant::now();
        let (trees, routes) = lost_upstream(&[("o9", &["s1", "o9"])], now);
        let mut r = Repair::new("test", vec!["o2".into()]);
        assert!(matches!(r.next(&trees, &routes, now), Step::Ask { .. }));
        assert_eq!(r.refused("o9", NakReason::Loop), AfterRefusal { orphan: false, wait: false });
        assert_eq!(r.next(&trees, &routes, now), Step::Wait { orphan: true });
    }

    #[test]
    fn a_branch_whose_only_ways_up_run_through_its_subtree_hands_off_at_once() {
        // o3's upstream o2 died and its routes know no way but through o4,
        // its downstream (o9 has not been heard from).
        let now = Instant::now();
        let (trees, routes) = lost_upstream(&[("o2", &["s1", "o2"]), ("o4", &["s1", "x", "o4"])], now);
        let mut r = Repair::new("test", vec!["o2".into()]);
        assert_eq!(r.next(&trees, &routes, now), Step::Wait { orphan: true });
        // Later rounds with nothing to try wait without handing off again.
        for _ in 0..3 {
            assert_eq!(r.next(&trees, &routes, now), Step::Wait { orphan: false });
        }
    }

    #[test]
    fn gives_up_after_five_attempts_that_come_to_nothing() {
        let now = Instant::now();
        let (trees, routes) = lost_upstream(&[("o9", &["s1", "o9"])], now);
        let mut r = Repair::new("test", vec!["o2".into()]);
        let mut orphaned = 0;
        for _ in 0..20 {
            match r.next(&trees, &routes, now) {
                Step::Ask { to, .. } => orphaned += usize::from(r.refused(&to, NakReason::NoRoute).orphan),
                Step::Wait { orphan } => orphaned += usize::from(orphan),
                Step::Done => unreachable!(),
            }
        }
        assert_eq!(orphaned, 1, "the hand-off is made once");
    }

    #[test]
    fn an_answer_from_below_is_undone_and_counts_as_a_loop() {
        let now = Instant::now();
        let (trees, routes) = lost_upstream(&[("o9", &["s1", "o9"]), ("o2", &["s1", "o2"])], now);
        let mut r = Repair::new("test", Vec::new());
        assert_eq!(r.next(&trees, &routes, now), Step::Ask { to: "o9".into(), path: vec!["o3".into()] });
        r.undone("o9");
        // No way left (o2 is down, o4 downstream), and the one tried led
        // below the branch: the downstreams look on their own.
        assert_eq!(r.next(&trees, &routes, now), Step::Wait { orphan: true });
    }

    #[test]
    fn ends_when_the_branch_no_longer_repairs() {
        let now = Instant::now();
        let (mut trees, routes) = lost_upstream(&[("o9", &["s1", "o9"])], now);
        let mut r = Repair::new("test", vec!["o2".into()]);
        let Step::Ask { to, .. } = r.next(&trees, &routes, now) else { panic!("a way") };
        let desc = StreamDesc {
            stream: "test".into(),
            server: "s1".into(),
            ssrcs: vec![1, 2],
            depth: 1,
            route: vec!["s1".into(), "o9".into()],
            delay_us: 0,
        };
        assert!(trees.repaired(&to, desc).is_some());
        assert_eq!(r.next(&trees, &routes, now), Step::Done);
        let mut gone = Repair::new("other", Vec::new());
        assert_eq!(gone.next(&trees, &routes, now), Step::Done);
    }
}
