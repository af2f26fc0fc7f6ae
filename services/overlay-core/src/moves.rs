//! Tree moves: a branch whose routes show a clearly better upstream than
//! its own ([`Trees::better_upstreams`]) moves there, but only once its
//! tree has been still for the settle time, so that a tree does not chase
//! every change of the routes (each move is a join, a leave and a burst of
//! reroot notices). [`Moves`] keeps when each branch last changed and says
//! which moves are due; [`accept`] judges a move's answer when it comes.
//! Time is passed in.
//!
//! A move is chosen by the routes, but what it buys is the new upstream's
//! delay along its tree, which its answer tells: an upstream whose own
//! branch runs longer than its best route may offer no gain. A move that
//! would not lower the branch's delay is undone, and the same move is not
//! tried again for a few settle times. (Choosing moves by the tree's delay
//! instead of the routes was tried: at 1,000 nodes it sent branches after
//! upstreams whose trees were as long as their own, and the worst POP
//! ended twice as far from its root.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::routing::RouteTable;
use crate::tree::{Source, StreamDesc, Trees};

/// Settle times for which a move whose answer offered no gain is not tried
/// again (the upstream's tree may have moved by then).
const NO_GAIN_SETTLES: u32 = 4;

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
    /// Per stream, a move target whose answer offered no gain, and when.
    no_gain: BTreeMap<String, (String, Instant)>,
}

impl Moves {
    pub fn new(settle: Duration) -> Moves {
        Moves { settle, changed: BTreeMap::new(), no_gain: BTreeMap::new() }
    }

    /// The move of `stream` to `to` was answered with no gain at `now`:
    /// it is not tried again for a few settle times.
    pub fn no_gain(&mut self, stream: &str, to: &str, now: Instant) {
        self.no_gain.insert(stream.to_string(), (to.to_string(), now));
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
            let quiet = self.settle.saturating_mul(NO_GAIN_SETTLES);
            if self.no_gain.get(&stream).is_some_and(|(t, at)| *t == to && now.saturating_duration_since(*at) < quiet) {
                continue;
            }
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
        self.no_gain.retain(|stream, _| trees.branch(stream).is_some());
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
    /// Through the new upstream the branch's delay along the tree would be
    /// `offered_us`, no lower than its `tree_us` now: leave it.
    NoGain { tree_us: u64, offered_us: u64 },
}

/// Judges the answer to `m`: `offered` is the new upstream's description,
/// its delay already counting the link to it. The branch's delay now is
/// its delay along the tree, or the route through its upstream where that
/// is longer (a tree delay learnt before the links were measured).
pub fn accept(trees: &Trees, routes: &RouteTable, m: &Move, offered: &StreamDesc, now: Instant) -> Verdict {
    let Some(b) = trees.branch(&m.stream) else { return Verdict::Stale };
    if b.repairing || b.source != Source::Neighbour(m.from.clone()) {
        return Verdict::Stale;
    }
    if b.desc.server != offered.server {
        return Verdict::OtherRoot { root: b.desc.server.clone() };
    }
    let mut current = (b.desc.delay_us, b.desc.depth);
    if let Some(r) = routes.route_via(&b.desc.server, &m.from, now).filter(|r| r.delay_us > current.0) {
        current = (r.delay_us, r.hops);
    }
    let (tree_us, offered_us) = (current.0, offered.delay_us);
    // Any gain is taken, not only a clear one: the move puts the branch on
    // its best route, and when the new upstream's own tree moves closer,
    // the branch gains with it.
    if offered_us >= tree_us && !routes.improves_on((offered_us, offered.depth + 1), current) {
        return Verdict::NoGain { tree_us, offered_us };
    }
    Verdict::Take
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut routes = crate::testing::table("o3", &["o2", "o4", "o9"]);
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

    /// o9's answer to a move: the stream from `server`, `delay_us` away
    /// along o9's tree (the link to o9 counted).
    fn offer(server: &str, delay_us: u64) -> StreamDesc {
        StreamDesc {
            stream: "test".into(),
            server: server.into(),
            ssrcs: vec![1, 2],
            depth: 1,
            route: vec![server.into(), "o9".into()],
            delay_us,
        }
    }

    #[test]
    fn an_answer_is_taken_only_while_the_branch_is_as_it_was_and_from_its_root() {
        let now = Instant::now();
        let (mut trees, routes) = slow_branch(now);
        let m = Move { stream: "test".into(), from: "o2".into(), to: "o9".into() };
        assert_eq!(accept(&trees, &routes, &m, &offer("s1", 10_000), now), Verdict::Take);
        assert_eq!(accept(&trees, &routes, &m, &offer("s2", 10_000), now), Verdict::OtherRoot { root: "s1".into() });
        let moved_meanwhile = Move { from: "o8".into(), ..m.clone() };
        assert_eq!(accept(&trees, &routes, &moved_meanwhile, &offer("s1", 10_000), now), Verdict::Stale);
        trees.upstream_lost("o2");
        assert_eq!(accept(&trees, &routes, &m, &offer("s1", 10_000), now), Verdict::Stale, "repairing");
        let mut moves = Moves::new(SETTLE);
        moves.changed("gone", now);
        moves.retain_carried(&trees);
        assert!(moves.changed.is_empty());
    }

    #[test]
    fn a_move_that_offers_no_gain_is_left_and_not_tried_again_for_a_while() {
        let now = Instant::now();
        let (trees, mut routes) = slow_branch(now);
        let m = Move { stream: "test".into(), from: "o2".into(), to: "o9".into() };
        // o9's route is 10 ms, but its branch runs 92 ms: no gain over the
        // 90 ms through o2. At 85 ms it would be a gain, if a small one.
        assert_eq!(
            accept(&trees, &routes, &m, &offer("s1", 92_000), now),
            Verdict::NoGain { tree_us: 90_000, offered_us: 92_000 }
        );
        assert_eq!(accept(&trees, &routes, &m, &offer("s1", 85_000), now), Verdict::Take);
        let mut moves = Moves::new(SETTLE);
        moves.changed("test", now);
        moves.no_gain("test", "o9", now);
        let mut at = |seq: u64, after: Duration| {
            round(&mut routes, seq, now + after);
            moves.due(&trees, &routes, now + after)
        };
        assert!(at(2, SETTLE).is_empty());
        assert!(at(3, SETTLE * 3).is_empty());
        assert_eq!(at(4, SETTLE * NO_GAIN_SETTLES).len(), 1, "tried again after a few settle times");
    }
}
