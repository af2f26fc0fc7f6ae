//! Neighbour liveness from heartbeats: which beats are still out, the round
//! trip of each answer, and when a neighbour has missed enough beats in a
//! row to be declared lost. A driver sends a datagram for every beat
//! [`Liveness::send`] numbers, hands answers to [`Liveness::on_reply`], and
//! calls [`Liveness::expire`] at [`Liveness::next_deadline`]. Time is passed
//! in; nothing here reads a clock or touches a socket.
//!
//! Some beats only ask "are you there right now?" (a stream went silent):
//! they get an answer or expire like the others, but their expiry is not a
//! miss of the periodic heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Beats in a row a neighbour may miss before it is declared lost.
pub const MISS_LIMIT: u32 = 3;
/// Beats out at once, across all neighbours; more are refused (the oldest
/// stay, so a flood of checks cannot push the heartbeats out).
const MAX_OUTSTANDING: usize = 4096;

/// What a beat is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeatKind {
    /// The periodic heartbeat: its expiry counts as a miss.
    Periodic,
    /// A one-off check; its expiry is only reported back to the asker.
    Check,
}

#[derive(Debug, Clone)]
struct Beat {
    neighbour: String,
    sent: Instant,
    deadline: Instant,
    kind: BeatKind,
}

/// An answer matched to its beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub seq: u64,
    pub rtt: Duration,
    pub kind: BeatKind,
}

/// What expired at a deadline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Checks that got no answer in time (their sequence numbers).
    pub checks: Vec<u64>,
    /// Neighbours whose periodic beats have now been missed
    /// [`MISS_LIMIT`] times in a row (reported once per loss).
    pub lost: Vec<String>,
}

/// Heartbeat bookkeeping of one node; see the module doc.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    next_seq: u64,
    outstanding: BTreeMap<u64, Beat>,
    misses: HashMap<String, u32>,
    /// Per neighbour: periodic beats sent, and those missed, since start.
    totals: HashMap<String, BeatTotals>,
}

/// Periodic beats to one neighbour since the node started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BeatTotals {
    pub sent: u64,
    pub missed: u64,
}

impl Liveness {
    /// Numbering starts at `first_seq` (a driver may start from the clock,
    /// so that a restarted node's answers are not taken for its old beats).
    pub fn new(first_seq: u64) -> Liveness {
        Liveness { next_seq: first_seq, ..Liveness::default() }
    }

    /// Numbers a beat to `neighbour` that is answered in time if its answer
    /// comes before `now + timeout`; `None` when too many are out already.
    pub fn send(&mut self, neighbour: &str, kind: BeatKind, now: Instant, timeout: Duration) -> Option<u64> {
        if self.outstanding.len() >= MAX_OUTSTANDING {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        if kind == BeatKind::Periodic {
            self.totals.entry(neighbour.to_string()).or_default().sent += 1;
        }
        self.outstanding
            .insert(seq, Beat { neighbour: neighbour.to_string(), sent: now, deadline: now + timeout, kind });
        Some(seq)
    }

    /// An answer from `neighbour` to beat `seq`. `None` when no such beat is
    /// out to that neighbour (late, duplicated, or not ours): ignore it.
    /// An answer to any beat ends the neighbour's run of misses.
    pub fn on_reply(&mut self, neighbour: &str, seq: u64, now: Instant) -> Option<Answer> {
        if self.outstanding.get(&seq)?.neighbour != neighbour {
            return None;
        }
        let beat = self.outstanding.remove(&seq)?;
        self.misses.insert(beat.neighbour, 0);
        Some(Answer { seq, rtt: now.saturating_duration_since(beat.sent), kind: beat.kind })
    }

    /// Ends the beats whose time is up at `now`.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let due: Vec<u64> = self.outstanding.iter().filter(|(_, b)| b.deadline <= now).map(|(s, _)| *s).collect();
        let mut out = Expired::default();
        for seq in due {
            let Some(beat) = self.outstanding.remove(&seq) else { continue };
            match beat.kind {
                BeatKind::Check => out.checks.push(seq),
                BeatKind::Periodic => {
                    self.totals.entry(beat.neighbour.clone()).or_default().missed += 1;
                    let misses = self.misses.entry(beat.neighbour.clone()).or_insert(0);
                    *misses += 1;
                    if *misses == MISS_LIMIT {
                        out.lost.push(beat.neighbour);
                    }
                }
            }
        }
        out
    }

    /// The earliest deadline of a beat still out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.outstanding.values().map(|b| b.deadline).min()
    }

    /// The neighbour was declared lost some other way (a silent stream,
    /// the bootstrapper): it counts as having missed every beat, so a
    /// later miss does not declare it lost a second time.
    pub fn mark_lost(&mut self, neighbour: &str) {
        self.misses.insert(neighbour.to_string(), MISS_LIMIT);
    }

    /// Periodic beats missed in a row by `neighbour`.
    pub fn misses(&self, neighbour: &str) -> u32 {
        self.misses.get(neighbour).copied().unwrap_or(0)
    }

    /// Periodic beats sent to `neighbour` and missed by it, since start.
    pub fn totals(&self, neighbour: &str) -> BeatTotals {
        self.totals.get(neighbour).copied().unwrap_or_default()
    }

    /// Beats out now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(250);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_answer_gives_the_round_trip_and_ends_the_beat() {
        let t0 = Instant::now();
        let mut l = Liveness::new(10);
        let seq = l.send("o2", BeatKind::Periodic, t0, T).unwrap();
        assert_eq!(seq, 10);
        let a = l.on_reply("o2", seq, t0 + ms(7)).unwrap();
        assert_eq!(a.rtt, ms(7));
        assert_eq!(a.kind, BeatKind::Periodic);
        assert_eq!(l.outstanding(), 0);
        // A duplicate, a late or a foreign answer is ignored.
        assert!(l.on_reply("o2", seq, t0 + ms(8)).is_none());
        let seq2 = l.send("o2", BeatKind::Periodic, t0, T).unwrap();
        assert!(l.on_reply("o3", seq2, t0 + ms(8)).is_none(), "o3 cannot answer o2's beat");
        assert!(l.on_reply("o2", 999, t0 + ms(8)).is_none());
        assert_eq!(l.outstanding(), 1);
    }

    #[test]
    fn three_missed_beats_in_a_row_declare_a_neighbour_lost_once() {
        let t0 = Instant::now();
        let mut l = Liveness::new(0);
        for i in 0..6u64 {
            let now = t0 + ms(100 * i);
            let lost = l.expire(now).lost;
            // Beats sent at 0, 100 and 200 ms expire at 250, 350 and 450 ms.
            assert_eq!(lost.is_empty(), i != 5, "at {i}: {lost:?}");
            l.send("o2", BeatKind::Periodic, now, T);
        }
        assert_eq!(l.misses("o2"), 3);
        // Further misses do not report it again.
        assert!(l.expire(t0 + ms(1000)).lost.is_empty());
        assert_eq!(l.misses("o2"), 6);
        // The totals (for metrics) count every periodic beat and miss;
        // checks are not periodic beats.
        l.send("o2", BeatKind::Check, t0 + ms(1000), T);
        assert_eq!(l.totals("o2"), BeatTotals { sent: 6, missed: 6 });
        assert_eq!(l.totals("o3"), BeatTotals::default());
    }

    #[test]
    fn an_answer_ends_a_run_of_misses() {
        let t0 = Instant::now();
        let mut l = Liveness::new(0);
        l.send("o2", BeatKind::Periodic, t0, T);
        l.send("o2", BeatKind::Periodic, t0 + ms(100), T);
        let third = l.send("o2", BeatKind::Periodic, t0 + ms(200), T).unwrap();
        assert!(l.expire(t0 + ms(360)).lost.is_empty());
        assert_eq!(l.misses("o2"), 2);
        assert!(l.on_reply("o2", third, t0 + ms(400)).is_some());
        assert_eq!(l.misses("o2"), 0);
        l.send("o2", BeatKind::Periodic, t0 + ms(400), T);
        assert!(l.expire(t0 + ms(700)).lost.is_empty(), "one miss after an answer is not a loss");
    }

    #[test]
    fn checks_expire_to_the_asker_and_are_not_misses() {
        let t0 = Instant::now();
        let mut l = Liveness::new(0);
        let check = l.send("o2", BeatKind::Check, t0, ms(100)).unwrap();
        let beat = l.send("o2", BeatKind::Periodic, t0, T).unwrap();
        assert_eq!(l.next_deadline(), Some(t0 + ms(100)));
        let e = l.expire(t0 + ms(100));
        assert_eq!(e.checks, vec![check]);
        assert!(e.lost.is_empty());
        assert_eq!(l.misses("o2"), 0);
        assert_eq!(l.next_deadline(), Some(t0 + T));
        assert_eq!(l.on_reply("o2", beat, t0 + ms(120)).map(|a| a.kind), Some(BeatKind::Periodic));
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn a_neighbour_marked_lost_is_not_reported_again() {
        let t0 = Instant::now();
        let mut l = Liveness::new(0);
        l.mark_lost("o2");
        l.send("o2", BeatKind::Periodic, t0, T);
        assert!(l.expire(t0 + T).lost.is_empty());
    }

    #[test]
    fn beats_out_are_bounded() {
        let t0 = Instant::now();
        let mut l = Liveness::new(0);
        for _ in 0..MAX_OUTSTANDING {
            assert!(l.send("o2", BeatKind::Check, t0, T).is_some());
        }
        assert!(l.send("o2", BeatKind::Periodic, t0, T).is_none());
        l.expire(t0 + T);
        assert!(l.send("o2", BeatKind::Periodic, t0 + T, T).is_some());
    }
}
