//! Tree moves: a branch whose routes show a clearly better upstream than
//! its own ([`Trees::better_upstreams`]) moves there, but only once its
//! tree has been still for the settle time, so that a tree does not chase
//! every change of the routes (each move is a join, a leave and a burst of
//! reroot notices). [`Moves`] keeps when each branch last changed and says
//! which moves are due; [`accept`] judges a move's answer when it comes.
//! Time is passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::routing::RouteTable;
use crate::tree::{Source, Trees};

/// A move to make: ask `to` to feed `stream`, then leave `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub stream: String,
    pub from: String,
    pub to: String,
}

/// When each branch last changed its upstream.
#[derive(Debug, Clone)]
pub struct Moves {
    settle: Duration,
    changed: BTreeMap<String, Instant>,
}

impl Moves {
    pub fn new(settle: Duration) -> Moves {
        Moves { settle, changed: BTreeMap::new() }
    }

    /// The branch of `stream` got a new upstream at `now` (joined,
    /// repaired, moved): its settle time starts again.
    pub fn changed(&mut self, stream: &str, now: Instant) {
        self.changed.insert(stream.to_string(), now);
    }

    /// The moves due at `now`: branches with a clearly better upstream that
    /// have been still for the settle time (a branch first seen now starts
    /// its settle time now). Each move due counts as a change, so a move
    /// that fails is tried again a settle time later, not at once.
    pub fn due(&mut self, trees: &Trees, routes: &RouteTable, now: Instant) -> Vec<Move> {
        let mut moves = Vec::new();
        for (stream, to) in trees.better_upstreams(routes, now) {
            let Some(Source::Neighbour(from)) = trees.branch(&stream).map(|b| &b.source) else { continue };
            let changed = *self.changed.entry(stream.clone()).or_insert(now);
            if now.saturating_duration_since(changed) >= self.settle {
                self.changed.insert(stream.clone(), now);
                moves.push(Move { stream, from: from.clone(), to });
            }
        }
        moves
    }

    /// Forgets the branches no longer carried.
    pub fn retain_carried(&mut self, trees: &Trees) {
        self.changed.retain(|stream, _| trees.branch(stream).is_some());
    }
}

/// What to make of a move's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Take the new upstream ([`Trees::repaired`]).
    Take,
    /// The branch changed meanwhile (repaired, moved, pruned): leave the
    /// new upstream.
    Stale,
    /// The new upstream feeds the stream from another server than the
    /// branch's root (`root`): leave it, since another server's stream would
    /// restart the viewers' RTP timing.
    OtherRoot { root: String },
}

/// Judges the answer to `m` that says the stream comes from `server`.
pub fn accept(trees: &Trees, m: &Move, server: &str) -> Verdict {
    let Some(b) = trees.branch(&m.stream) else { return Verdict::Stale };
    if b.repairing || b.source != Source::Neighbour(m.from.clone()) {
        return Verdict::Stale;
    }
    if b.desc.server != server {
        return Verdict::OtherRoot { root: b.desc.server.clone() };
    }
    Verdict::Take
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingConfig;
    use crate::testing::{carrying, probe};

    const SETTLE: Duration = Duration::from_secs(30);

    /// Round `seq` of s1's probes at `at`: slow through o2, fast through o9.
    fn round(routes: &mut RouteTable, seq: u64, at: Instant) {
        for (via, delay_us) in [("o2", 90_000), ("o9", 10_000)] {
            routes.on_probe(&probe("s1", seq, via, &["s1", via], delay_us), at, 0);
        }
    }

    /// o3 fed by o2 (a slow way to s1) while o9 offers a fast one.
    fn slow_branch(now: Instant) -> (Trees, RouteTable) {
        let neighbours = ["o2", "o4", "o9"].iter().map(|s| s.to_string()).collect();
        let mut routes = RouteTable::new("o3", neighbours, RoutingConfig::default());
        round(&mut routes, 1, now);
        let trees = carrying(&routes, "o2", "o4", now);
        (trees, routes)
    }

    #[test]
    fn a_better_upstream_is_moved_to_once_the_tree_has_settled() {
        let now = Instant::now();
        let (trees, mut routes) = slow_branch(now);
        let mut moves = Moves::new(SETTLE);
        moves.changed("test", now);
        assert_eq!(trees.better_upstreams(&routes, now), [("test".to_string(), "o9".to_string())]);
        let mut at = |seq: u64, after: Duration| {
            round(&mut routes, seq, now + after);
            moves.due(&trees, &routes, now + after)
        };
        assert!(at(2, SETTLE / 2).is_empty(), "not settled yet");
        assert_eq!(at(3, SETTLE), [Move { stream: "test".into(), from: "o2".into(), to: "o9".into() }]);
        // One attempt per settle time.
        assert!(at(4, SETTLE + Duration::from_secs(1)).is_empty());
        assert_eq!(at(5, SETTLE * 2).len(), 1);
    }

    #[test]
    fn a_branch_first_seen_starts_its_settle_time_then() {
        let now = Instant::now();
        let (trees, mut routes) = slow_branch(now);
        let mut moves = Moves::new(SETTLE);
        assert!(moves.due(&trees, &routes, now).is_empty());
        round(&mut routes, 2, now + SETTLE);
        assert_eq!(moves.due(&trees, &routes, now + SETTLE).len(), 1);
    }

    #[test]
    fn an_answer_is_taken_only_while_the_branch_is_as_it_was_and_from_its_root() {
        let now = Instant::now();
        let (mut trees, _) = slow_branch(now);
        let m = Move { stream: "test".into(), from: "o2".into(), to: "o9".into() };
        assert_eq!(accept(&trees, &m, "s1"), Verdict::Take);
        assert_eq!(accept(&trees, &m, "s2"), Verdict::OtherRoot { root: "s1".into() });
        let moved_meanwhile = Move { from: "o8".into(), ..m.clone() };
        assert_eq!(accept(&trees, &moved_meanwhile, "s1"), Verdict::Stale);
        trees.upstream_lost("o2");
        assert_eq!(accept(&trees, &m, "s1"), Verdict::Stale, "repairing");
        let mut moves = Moves::new(SETTLE);
        moves.changed("gone", now);
        moves.retain_carried(&trees);
        assert!(moves.changed.is_empty());
    }
}
