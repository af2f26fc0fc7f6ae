//! Per-stream distribution trees, as seen from one node.
//!
//! A stream is either being joined (a request went upstream, and other
//! requests for the same stream wait on it) or active (an upstream, a set of
//! downstream neighbours, and a count of local viewers at a POP). The
//! decision for an incoming stream request is a pure function of this state
//! and the route table; the driver carries it out (sends the request on,
//! starts the server's pipeline) and reports back with [`Trees::joined`] or
//! [`Trees::failed`]. The last viewer leaving prunes the branch upward.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::routing::{NoUpstream, RouteTable};

/// How long a branch told that its upstream repairs feeds no new neighbour,
/// at most (see [`Trees::upstream_repairing`]): the reroot notice that ends
/// the hold may overtake that news, or never come. A repair that lasts
/// tells its subtree again every half of this.
pub const UPSTREAM_REPAIR_HOLD: Duration = Duration::from_secs(2);

/// Who asked for a stream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Requester {
    /// A downstream neighbour, by name.
    Neighbour(String),
    /// A viewer of this POP.
    Local,
}

/// Where a node receives a stream from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// This server's own pipeline.
    Local,
    /// An upstream neighbour.
    Neighbour(String),
}

/// Description of a stream as the tree carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDesc {
    pub stream: String,
    /// Server at the root.
    pub server: String,
    /// RTP SSRCs: video first, then audio.
    pub ssrcs: Vec<u32>,
    /// Overlay hops from the root to this node.
    pub depth: u32,
    /// Nodes from the root server to this node, both included.
    pub route: Vec<String>,
    /// Summed one-way link delay along the tree from the root server to
    /// this node (µs), each link as its lower end measures it. A move is
    /// kept only if it lowers it, since a branch's tree may run longer
    /// than its upstream's best route.
    pub delay_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NakReason {
    UnknownStream,
    NoRoute,
    Loop,
    Timeout,
}

/// A stream request's failure, with a detail that names node and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    pub reason: NakReason,
    pub detail: String,
}

impl fmt::Display for Nak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// What the driver must do with a stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    /// The requester is attached now; answer with this description.
    Attached(StreamDesc),
    /// Send the request to `to` with this path; report the outcome.
    Forward { to: String, path: Vec<String> },
    /// Start this server's pipeline for the stream; report the outcome.
    ServeLocal,
    /// A join for this stream is under way; the outcome answers this one too.
    Wait,
    /// Refuse the request.
    Nak(Nak),
}

/// A request waiting for a join under way; `ticket` is the driver's handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    pub requester: Requester,
    pub ticket: u64,
}

/// What leaving a stream requires of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prune {
    /// Others still watch; nothing to do.
    Nothing,
    /// The branch is empty: send a prune to this upstream neighbour.
    Upstream(String),
    /// The branch is empty and rooted here: stop the server's pipeline.
    StopLocal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Joining { via: Option<String>, waiters: Vec<Waiter> },
    Active(Branch),
}

/// An active stream at this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub source: Source,
    pub desc: StreamDesc,
    pub downstream: BTreeSet<String>,
    pub local_viewers: usize,
    /// The upstream was lost; a new one is being sought. Downstreams and
    /// viewers keep their place meanwhile.
    pub repairing: bool,
    /// The downstreams were told to look for another way (see `orphan`).
    pub orphaned: bool,
    /// An upstream further up lost its way to the root and is looking for
    /// another (see [`Trees::upstream_repairing`]): the route this branch
    /// knows is stale, and may by now run through a neighbour asking. Set
    /// until the new route comes down, or at most until this time.
    pub upstream_repairing: Option<Instant>,
}

impl Branch {
    /// Whether the branch feeds no new neighbour at `now`: it is looking
    /// for a way to the root, or one of its upstreams is.
    pub fn looking(&self, now: Instant) -> bool {
        self.repairing || self.orphaned || self.upstream_repairing.is_some_and(|until| now < until)
    }

    fn is_empty(&self) -> bool {
        self.downstream.is_empty() && self.local_viewers == 0
    }

    fn attach(&mut self, requester: &Requester) {
        match requester {
            Requester::Neighbour(n) => {
                self.downstream.insert(n.clone());
            }
            Requester::Local => self.local_viewers += 1,
        }
    }
}

/// Every stream this node is joining or carrying.
#[derive(Debug, Clone)]
pub struct Trees {
    me: String,
    offered: BTreeSet<String>,
    streams: BTreeMap<String, State>,
}

impl Trees {
    /// `offered` are the streams this node serves itself (servers only).
    pub fn new(me: impl Into<String>, offered: impl IntoIterator<Item = String>) -> Self {
        Trees { me: me.into(), offered: offered.into_iter().collect(), streams: BTreeMap::new() }
    }

    /// This server serves `stream` from now on (a live publish began).
    pub fn offer(&mut self, stream: &str) {
        self.offered.insert(stream.to_string());
    }

    /// This server no longer serves `stream` (its publisher went away for
    /// good). A tree it rooted is dropped here; its downstreams are
    /// returned, to be told that this root gave up. Joins waiting on it
    /// are returned too, to be refused.
    pub fn withdraw(&mut self, stream: &str) -> (Vec<String>, Vec<Waiter>) {
        self.offered.remove(stream);
        match self.streams.get(stream) {
            Some(State::Active(b)) if b.source == Source::Local => {}
            Some(State::Joining { via: None, .. }) => return (Vec::new(), self.failed(stream)),
            _ => return (Vec::new(), Vec::new()),
        }
        match self.streams.remove(stream) {
            Some(State::Active(b)) => (b.downstream.into_iter().collect(), Vec::new()),
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// Whether this node serves `stream` itself.
    pub fn offers(&self, stream: &str) -> bool {
        self.offered.contains(stream)
    }

    fn nak(&self, reason: NakReason, stream: &str, why: &str) -> JoinDecision {
        JoinDecision::Nak(Nak { reason, detail: format!("node {}: stream {stream:?}: {why}", self.me) })
    }

    /// Decides what to do with a request for `stream` from `requester`,
    /// which has been through `path` (first requester first).
    pub fn request(
        &mut self,
        stream: &str,
        requester: Requester,
        path: &[String],
        ticket: u64,
        routes: &RouteTable,
        now: Instant,
    ) -> JoinDecision {
        if path.contains(&self.me) {
            return self.nak(NakReason::Loop, stream, "request came back to this node");
        }
        match self.streams.get_mut(stream) {
            Some(State::Active(branch)) => {
                if let Requester::Neighbour(r) = &requester {
                    let upstream = matches!(&branch.source, Source::Neighbour(up) if up == r);
                    if upstream || branch.desc.route.contains(r) {
                        return self.nak(NakReason::Loop, stream, "requester is upstream of this node");
                    }
                    // Its route to the root is stale: a neighbour attached
                    // now could close a loop through this node's own repair.
                    if branch.repairing || branch.orphaned {
                        return self.nak(
                            NakReason::NoRoute,
                            stream,
                            "this node is itself looking for a way to the root",
                        );
                    }
                    // The same one step removed: the repair upstream may be
                    // taking its way through the requester right now, and
                    // this node's route would not show it. Refused as a
                    // loop: the requester tries its next way at once.
                    if branch.looking(now) {
                        return self.nak(
                            NakReason::Loop,
                            stream,
                            "an upstream of this node is looking for a way to the root",
                        );
                    }
                }
                branch.attach(&requester);
                JoinDecision::Attached(branch.desc.clone())
            }
            Some(State::Joining { via, waiters }) => {
                if matches!((via.as_ref(), &requester), (Some(up), Requester::Neighbour(r)) if up == r) {
                    return self.nak(NakReason::Loop, stream, "requester is where this node's own request went");
                }
                waiters.push(Waiter { requester, ticket });
                JoinDecision::Wait
            }
            None if self.offered.contains(stream) => {
                let waiters = vec![Waiter { requester, ticket }];
                self.streams.insert(stream.to_string(), State::Joining { via: None, waiters });
                JoinDecision::ServeLocal
            }
            None => {
                let exclude: Vec<&str> = path.iter().map(String::as_str).collect();
                match routes.upstream_for(stream, now, &exclude) {
                    Ok(up) => {
                        let to = up.via().to_string();
                        let waiters = vec![Waiter { requester, ticket }];
                        self.streams.insert(stream.to_string(), State::Joining { via: Some(to.clone()), waiters });
                        let mut path = path.to_vec();
                        path.push(self.me.clone());
                        JoinDecision::Forward { to, path }
                    }
                    Err(NoUpstream::UnknownStream) => self.nak(NakReason::UnknownStream, stream, "no server offers it"),
                    Err(NoUpstream::NoRoute) => self.nak(
                        NakReason::NoRoute,
                        stream,
                        "servers offer it but no neighbour off the request's path leads to one",
                    ),
                }
            }
        }
    }

    /// The join under way succeeded: `desc` is the upstream's description
    /// (its depth is the upstream's). Every waiter is now attached.
    pub fn joined(&mut self, source: Source, mut desc: StreamDesc) -> Vec<Waiter> {
        let Some(State::Joining { waiters, .. }) = self.streams.remove(&desc.stream) else {
            return Vec::new();
        };
        match source {
            Source::Neighbour(_) => desc.depth += 1,
            Source::Local => desc.route.clear(),
        }
        desc.route.push(self.me.clone());
        let mut branch = Branch {
            source,
            desc: desc.clone(),
            downstream: BTreeSet::new(),
            local_viewers: 0,
            repairing: false,
            orphaned: false,
            upstream_repairing: None,
        };
        for w in &waiters {
            branch.attach(&w.requester);
        }
        self.streams.insert(desc.stream.clone(), State::Active(branch));
        waiters
    }

    /// The join under way through its upstream failed (refused, timed out,
    /// or that upstream stopped answering): the next way to the root that
    /// avoids the request's `path` and every neighbour in `tried`, which
    /// the join now goes through. None: no way is left, and the caller
    /// refuses the waiters with [`Trees::failed`].
    pub fn redirect(
        &mut self,
        stream: &str,
        path: &[String],
        tried: &[String],
        routes: &RouteTable,
        now: Instant,
    ) -> Option<String> {
        let Some(State::Joining { via: Some(via), .. }) = self.streams.get_mut(stream) else { return None };
        let exclude: Vec<&str> = path.iter().chain(tried).map(String::as_str).collect();
        let next = routes.upstream_for(stream, now, &exclude).ok()?.via().to_string();
        *via = next.clone();
        Some(next)
    }

    /// The join under way failed; every waiter gets the NAK.
    pub fn failed(&mut self, stream: &str) -> Vec<Waiter> {
        match self.streams.get(stream) {
            Some(State::Joining { .. }) => match self.streams.remove(stream) {
                Some(State::Joining { waiters, .. }) => waiters,
                _ => unreachable!(),
            },
            _ => Vec::new(),
        }
    }

    /// `requester` no longer needs `stream`.
    pub fn leave(&mut self, stream: &str, requester: &Requester) -> Prune {
        let Some(State::Active(branch)) = self.streams.get_mut(stream) else {
            return Prune::Nothing;
        };
        match requester {
            Requester::Neighbour(n) => {
                branch.downstream.remove(n);
            }
            Requester::Local => branch.local_viewers = branch.local_viewers.saturating_sub(1),
        }
        if !branch.is_empty() {
            return Prune::Nothing;
        }
        let source = branch.source.clone();
        self.streams.remove(stream);
        match source {
            Source::Local => Prune::StopLocal,
            Source::Neighbour(up) => Prune::Upstream(up),
        }
    }

    /// The link to `neighbour` or the neighbour itself is gone. Branches fed
    /// by it start repairing (their streams are returned); branches feeding
    /// it lose it as a downstream (the prunes this needs are returned).
    pub fn neighbour_lost(&mut self, neighbour: &str) -> (Vec<String>, Vec<(String, Prune)>) {
        (self.upstream_lost(neighbour), self.downstream_lost(neighbour))
    }

    /// Branches fed by `neighbour` start repairing; returns their streams
    /// (each once, however often it is called).
    pub fn upstream_lost(&mut self, neighbour: &str) -> Vec<String> {
        let mut repair = Vec::new();
        for (stream, state) in self.streams.iter_mut() {
            if let State::Active(b) = state {
                if matches!(&b.source, Source::Neighbour(up) if up == neighbour) && !b.repairing {
                    b.repairing = true;
                    b.upstream_repairing = None;
                    repair.push(stream.clone());
                }
            }
        }
        repair
    }

    /// `neighbour` leaves every branch it is a downstream of; returns the
    /// prunes this needs.
    pub fn downstream_lost(&mut self, neighbour: &str) -> Vec<(String, Prune)> {
        let fed: Vec<String> =
            self.active().filter(|b| b.downstream.contains(neighbour)).map(|b| b.desc.stream.clone()).collect();
        fed.into_iter()
            .map(|s| {
                let p = self.leave(&s, &Requester::Neighbour(neighbour.to_string()));
                (s, p)
            })
            .collect()
    }

    /// Where a repairing branch should ask next: never through its own
    /// downstream (nor through `tried`, neighbours that refused as a loop).
    pub fn repair_target(
        &self,
        stream: &str,
        routes: &RouteTable,
        now: Instant,
        tried: &[String],
    ) -> Result<(String, Vec<String>), Nak> {
        let Some(b) = self.branch(stream).filter(|b| b.repairing) else {
            return Err(Nak {
                reason: NakReason::NoRoute,
                detail: format!("node {}: stream {stream:?}: not repairing", self.me),
            });
        };
        let mut exclude: Vec<&str> = b.downstream.iter().map(String::as_str).collect();
        exclude.extend(tried.iter().map(String::as_str));
        exclude.push(&self.me);
        match routes.upstream_for(stream, now, &exclude) {
            Ok(up) => Ok((up.via().to_string(), vec![self.me.clone()])),
            Err(why) => Err(Nak {
                reason: if why == NoUpstream::UnknownStream { NakReason::UnknownStream } else { NakReason::NoRoute },
                detail: format!("node {}: stream {stream:?}: no upstream left to repair through", self.me),
            }),
        }
    }

    /// The repair succeeded: `upstream` now feeds the branch (its `desc`).
    /// Returns the downstreams to tell about the new route to the root and
    /// the old upstream to leave (when it was another node), or None if the
    /// branch is gone (pruned meanwhile) or the new upstream is below this
    /// node (a loop).
    pub fn repaired(&mut self, upstream: &str, mut desc: StreamDesc) -> Option<(Vec<String>, Option<String>)> {
        if desc.route.contains(&self.me) {
            return None;
        }
        let me = self.me.clone();
        let Some(State::Active(b)) = self.streams.get_mut(&desc.stream) else { return None };
        // A way to the root through one of this branch's own downstreams
        // (the upstream's route is older than the news that reached us)
        // is a way through our own subtree.
        if desc.route.iter().any(|n| b.downstream.contains(n)) {
            return None;
        }
        desc.depth += 1;
        desc.route.push(me);
        let old = match std::mem::replace(&mut b.source, Source::Neighbour(upstream.to_string())) {
            Source::Neighbour(old) if old != upstream => Some(old),
            _ => None,
        };
        b.desc = desc;
        b.repairing = false;
        b.orphaned = false;
        b.upstream_repairing = None;
        Some((b.downstream.iter().cloned().collect(), old))
    }

    /// The upstream's route to the root changed (it was repaired or
    /// moved); `delay_us` is this node's tree delay through it. Returns the
    /// downstreams to pass it on to. Ignored unless from the upstream.
    pub fn rerooted(
        &mut self,
        stream: &str,
        from: &str,
        server: &str,
        upstream_route: &[String],
        delay_us: u64,
    ) -> Vec<String> {
        let me = self.me.clone();
        let Some(State::Active(b)) = self.streams.get_mut(stream) else { return Vec::new() };
        if !matches!(&b.source, Source::Neighbour(up) if up == from) || upstream_route.contains(&me) {
            return Vec::new();
        }
        b.desc.route = upstream_route.to_vec();
        b.desc.route.push(me);
        b.desc.depth = upstream_route.len() as u32;
        b.desc.server = server.to_string();
        b.desc.delay_us = delay_us;
        // The upstream has a way to the root again.
        b.repairing = false;
        b.orphaned = false;
        b.upstream_repairing = None;
        b.downstream.iter().cloned().collect()
    }

    /// The upstream gave up on the stream (it found no way to the root):
    /// repair like for a lost upstream. False unless `from` is the upstream.
    pub fn upstream_abandoned(&mut self, stream: &str, from: &str) -> bool {
        match self.streams.get_mut(stream) {
            Some(State::Active(b)) if matches!(&b.source, Source::Neighbour(up) if up == from) => {
                b.repairing = true;
                b.upstream_repairing = None;
                true
            }
            _ => false,
        }
    }

    /// The upstream `from` says it (or a node above it) lost its way to the
    /// root and is looking for another. Until a reroot notice brings the
    /// new route, this branch feeds no new neighbour: it would answer with
    /// a route that may already run through that neighbour. The hold ends
    /// after [`UPSTREAM_REPAIR_HOLD`] unless told again, should the reroot
    /// notice overtake this one or never come. Returns the downstreams to
    /// pass the news on to: when it is new, or a repeat that renews a hold
    /// half gone (a copy that went round a loop in a few milliseconds is
    /// not passed on again). `None` unless `from` is the upstream and this
    /// branch is not repairing itself.
    pub fn upstream_repairing(&mut self, stream: &str, from: &str, now: Instant) -> Option<Vec<String>> {
        match self.streams.get_mut(stream) {
            Some(State::Active(b))
                if matches!(&b.source, Source::Neighbour(up) if up == from) && !b.repairing && !b.orphaned =>
            {
                let fresh = b.upstream_repairing.is_some_and(|until| until > now + UPSTREAM_REPAIR_HOLD * 3 / 4);
                b.upstream_repairing = Some(now + UPSTREAM_REPAIR_HOLD);
                (!fresh).then(|| b.downstream.iter().cloned().collect())
            }
            _ => None,
        }
    }

    /// A repairing branch found no way to the root that avoids its own
    /// downstreams: they are told to look for one on their own (returned,
    /// once). Those that find one leave this node, which frees them as
    /// upstreams for its own repair; those that cannot stay attached.
    pub fn orphan(&mut self, stream: &str) -> Vec<String> {
        match self.streams.get_mut(stream) {
            Some(State::Active(b)) if b.repairing && !b.orphaned => {
                b.orphaned = true;
                b.downstream.iter().cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Active branches, by stream.
    pub fn active(&self) -> impl Iterator<Item = &Branch> {
        self.streams.values().filter_map(|s| match s {
            State::Active(b) => Some(b),
            State::Joining { .. } => None,
        })
    }

    pub fn branch(&self, stream: &str) -> Option<&Branch> {
        match self.streams.get(stream) {
            Some(State::Active(b)) => Some(b),
            _ => None,
        }
    }

    /// Established branches with a clearly better way to the same server
    /// than their upstream's (see [`RouteTable::clearly_better`]): the
    /// stream and the neighbour to move to. Never a downstream, never while
    /// repairing; the root server stays the same (another server's stream
    /// would restart the viewers' RTP timing).
    pub fn better_upstreams(&self, routes: &RouteTable, now: Instant) -> Vec<(String, String)> {
        self.active()
            .filter(|b| !b.repairing && !b.orphaned)
            .filter_map(|b| {
                let Source::Neighbour(up) = &b.source else { return None };
                let server = &b.desc.server;
                // Never into the branch's own subtree; a way on through the
                // current upstream is fine (a slower link after it).
                let mut subtree: Vec<&str> = b.downstream.iter().map(String::as_str).collect();
                subtree.push(self.me.as_str());
                let best = routes.best_next_hop_avoiding(server, now, &[up.as_str()], &subtree)?;
                match routes.route_via(server, up, now) {
                    Some(current) => routes.clearly_better(&best, &current),
                    // The upstream no longer offers a way to the server:
                    // its best one now runs back through this node (split
                    // horizon keeps it from us) or it has none. The
                    // branch is off every route; any fresh one is better.
                    None => true,
                }
                .then(|| (b.desc.stream.clone(), best.via))
            })
            .collect()
    }

    /// Upstream neighbours to check at once because a stream they feed has
    /// gone quiet: `silent_ms` says how long each stream has been silent
    /// (`None`: nothing received yet). Branches being repaired, orphaned or
    /// fed by this node itself are not judged. Each neighbour once, sorted.
    pub fn silent_upstreams(&self, silent_ms: impl Fn(&str) -> Option<u64>, limit_ms: u64) -> Vec<String> {
        let silent: BTreeSet<String> =
            self.silent_branches(silent_ms, limit_ms).into_iter().map(|(_, up)| up).collect();
        silent.into_iter().collect()
    }

    /// The branches fed by a neighbour that have been silent at least
    /// `limit_ms`, as (stream, upstream), judged as in
    /// [`Trees::silent_upstreams`]. A branch silent far longer than a
    /// ping takes, while its upstream answers, is no longer fed (the
    /// upstream lost or dropped it): it should be joined again.
    pub fn silent_branches(&self, silent_ms: impl Fn(&str) -> Option<u64>, limit_ms: u64) -> Vec<(String, String)> {
        self.active()
            .filter(|b| !b.repairing && !b.orphaned)
            .filter_map(|b| match &b.source {
                Source::Neighbour(up) if silent_ms(&b.desc.stream).is_some_and(|ms| ms >= limit_ms) => {
                    Some((b.desc.stream.clone(), up.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Streams this node carries (has an active upstream for).
    pub fn carrying(&self) -> Vec<String> {
        self.active().map(|b| b.desc.stream.clone()).collect()
    }

    /// Streams being joined, with the neighbour the request went to.
    pub fn joining(&self) -> Vec<(String, Option<String>)> {
        self.streams
            .iter()
            .filter_map(|(s, st)| match st {
                State::Joining { via, .. } => Some((s.clone(), via.clone())),
                State::Active(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Probe, RoutingConfig};

    fn routes(me: &str, neighbours: &[&str]) -> RouteTable {
        crate::testing::table(me, neighbours)
    }

    fn heard(t: &mut RouteTable, server: &str, via: &str, hops: u32, now: Instant) {
        let p = Probe {
            server: server.into(),
            seq: 1,
            send_time_unix_us: 0,
            hops,
            visited: vec![server.into(), via.into()],
            path_delay_us: 0,
            best_delay_us: 0,
            streams: vec!["test".into()],
            sender: via.into(),
            withdrawn: false,
        };
        t.on_probe(&p, now, 0);
    }

    fn desc(server: &str, depth: u32) -> StreamDesc {
        let mut route = vec![server.to_string()];
        route.extend((1..=depth).map(|i| format!("r{i}")));
        StreamDesc { stream: "test".into(), server: server.into(), ssrcs: vec![1, 2], depth, route, delay_us: 0 }
    }

    fn n(s: &str) -> Requester {
        Requester::Neighbour(s.into())
    }

    #[test]
    fn first_request_goes_upstream_later_ones_wait_then_attach() {
        let now = Instant::now();
        let mut r = routes("o4", &["o3", "o5", "o6", "o8"]);
        heard(&mut r, "s2", "o8", 2, now);
        let mut t = Trees::new("o4", []);
        let d = t.request("test", n("o5"), &["o5".into()], 1, &r, now);
        assert_eq!(d, JoinDecision::Forward { to: "o8".into(), path: vec!["o5".into(), "o4".into()] });
        assert_eq!(t.request("test", n("o6"), &["o6".into()], 2, &r, now), JoinDecision::Wait);
        let waiters = t.joined(Source::Neighbour("o8".into()), desc("s2", 1));
        assert_eq!(waiters.iter().map(|w| w.ticket).collect::<Vec<_>>(), [1, 2]);
        let b = t.branch("test").unwrap();
        assert_eq!(b.desc.depth, 2);
        assert_eq!(b.downstream.iter().collect::<Vec<_>>(), ["o5", "o6"]);
        assert_eq!(t.carrying(), ["test"]);
        // Grafting: a third requester attaches at once.
        assert!(matches!(
            t.request("test", n("o3"), &["o7".into(), "o3".into()], 3, &r, now),
            JoinDecision::Attached(_)
        ));
    }

    #[test]
    fn a_failed_join_goes_around_the_upstream_that_failed_it() {
        // o9 joins through o8, which carries the stream but is wedged;
        // the next way is s1 itself, and after that there is none.
        let now = Instant::now();
        let mut r = routes("o9", &["o3", "o8", "s1"]);
        r.set_carrying("o8", ["test".to_string()]);
        heard(&mut r, "s1", "s1", 1, now);
        let mut t = Trees::new("o9", []);
        let path = vec!["o4".to_string(), "o3".to_string()];
        let JoinDecision::Forward { to, path } = t.request("test", n("o3"), &path, 1, &r, now) else { panic!() };
        assert_eq!(to, "o8", "an existing carrier is preferred");
        let mut tried = vec![to];
        let next = t.redirect("test", &path, &tried, &r, now);
        assert_eq!(next.as_deref(), Some("s1"));
        tried.push(next.unwrap());
        assert_eq!(t.redirect("test", &path, &tried, &r, now), None, "no way left");
        assert_eq!(t.failed("test").iter().map(|w| w.ticket).collect::<Vec<_>>(), [1]);
        assert_eq!(t.redirect("test", &path, &[], &r, now), None, "nothing is joining any more");
    }

    #[test]
    fn server_serves_its_own_streams() {
        let now = Instant::now();
        let r = routes("s1", &["o2"]);
        let mut t = Trees::new("s1", ["test".to_string()]);
        assert_eq!(t.request("test", n("o2"), &["o2".into()], 7, &r, now), JoinDecision::ServeLocal);
        t.joined(Source::Local, desc("s1", 0));
        assert_eq!(t.branch("test").unwrap().desc.depth, 0);
        assert_eq!(t.leave("test", &n("o2")), Prune::StopLocal);
        assert!(t.branch("test").is_none());
    }

    #[test]
    fn a_published_stream_is_offered_then_withdrawn() {
        let now = Instant::now();
        let r = routes("s1", &["o2", "o3"]);
        let mut t = Trees::new("s1", []);
        assert!(matches!(t.request("cam", n("o2"), &["o2".into()], 1, &r, now), JoinDecision::Nak(_)));
        t.offer("cam");
        assert!(t.offers("cam"));
        assert_eq!(t.request("cam", n("o2"), &["o2".into()], 2, &r, now), JoinDecision::ServeLocal);
        t.joined(Source::Local, StreamDesc { stream: "cam".into(), ..desc("s1", 0) });
        assert!(matches!(t.request("cam", n("o3"), &["o3".into()], 3, &r, now), JoinDecision::Attached(_)));
        let (down, waiting) = t.withdraw("cam");
        assert_eq!(down, ["o2", "o3"], "every downstream is told");
        assert!(waiting.is_empty());
        assert!(t.branch("cam").is_none());
        assert!(!t.offers("cam"));
        let JoinDecision::Nak(nak) = t.request("cam", n("o2"), &["o2".into()], 4, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::UnknownStream);
        // A join waiting for the local source is refused.
        t.offer("cam");
        assert_eq!(t.request("cam", n("o2"), &["o2".into()], 5, &r, now), JoinDecision::ServeLocal);
        let (down, waiting) = t.withdraw("cam");
        assert!(down.is_empty());
        assert_eq!(waiting.iter().map(|w| w.ticket).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn naks_name_the_reason() {
        let now = Instant::now();
        let mut r = routes("o5", &["o4"]);
        let mut t = Trees::new("o5", []);
        let JoinDecision::Nak(nak) = t.request("test", Requester::Local, &[], 1, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::UnknownStream);
        assert_eq!(nak.detail, "node o5: stream \"test\": no server offers it");
        heard(&mut r, "s1", "o4", 4, now);
        let JoinDecision::Nak(nak) = t.request("nope", Requester::Local, &[], 1, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::UnknownStream);
        // The only route goes through the requester: no route.
        let JoinDecision::Nak(nak) = t.request("test", n("o4"), &["o4".into()], 1, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::NoRoute);
        assert!(t.joining().is_empty(), "a NAK records nothing");
    }

    #[test]
    fn loops_are_refused() {
        let now = Instant::now();
        let mut r = routes("o3", &["o2", "o9"]);
        heard(&mut r, "s1", "o2", 2, now);
        let mut t = Trees::new("o3", []);
        let JoinDecision::Nak(nak) = t.request("test", n("o9"), &["o3".into(), "o9".into()], 1, &r, now) else {
            panic!()
        };
        assert_eq!(nak.reason, NakReason::Loop);
        // While joining via o2, a request from o2 would deadlock: refused.
        assert!(matches!(t.request("test", n("o9"), &["o9".into()], 1, &r, now), JoinDecision::Forward { .. }));
        let JoinDecision::Nak(nak) = t.request("test", n("o2"), &["o2".into()], 2, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::Loop);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        let JoinDecision::Nak(nak) = t.request("test", n("o2"), &["o2".into()], 3, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::Loop);
    }

    #[test]
    fn failed_join_answers_every_waiter_and_forgets() {
        let now = Instant::now();
        let mut r = routes("o4", &["o3", "o5"]);
        heard(&mut r, "s1", "o3", 3, now);
        let mut t = Trees::new("o4", []);
        t.request("test", n("o5"), &["o5".into()], 1, &r, now);
        t.request("test", Requester::Local, &[], 2, &r, now);
        assert_eq!(t.failed("test").len(), 2);
        assert!(t.joining().is_empty() && t.branch("test").is_none());
    }

    /// A probe from `server` through `via` that says `delay_us` to here.
    fn heard_at(t: &mut RouteTable, server: &str, via: &str, hops: u32, delay_us: u64, seq: u64, now: Instant) {
        heard_on(t, &[server, via], hops, delay_us, seq, now);
    }

    /// A copy that came along `path` (server first, the neighbour last).
    fn heard_on(t: &mut RouteTable, path: &[&str], hops: u32, delay_us: u64, seq: u64, now: Instant) {
        let p = Probe {
            server: path[0].into(),
            seq,
            send_time_unix_us: 0,
            hops,
            visited: path.iter().map(|s| s.to_string()).collect(),
            path_delay_us: delay_us,
            best_delay_us: delay_us,
            streams: vec!["test".into()],
            sender: path.last().unwrap().to_string(),
            withdrawn: false,
        };
        t.on_probe(&p, now, 0);
    }

    #[test]
    fn an_established_branch_moves_only_for_a_clear_win_to_the_same_server() {
        let now = Instant::now();
        let cfg = RoutingConfig { tie_floor_us: 0, ..RoutingConfig::default() };
        let mut r = crate::testing::table_with("o3", &["o2", "o9", "o4", "o7"], cfg);
        heard_at(&mut r, "s1", "o2", 2, 13_500, 1, now);
        heard_at(&mut r, "s1", "o9", 3, 13_000, 1, now);
        let mut t = Trees::new("o3", []);
        t.request("test", n("o7"), &["o7".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        assert!(t.better_upstreams(&r, now).is_empty(), "within the tie band, o2 has fewer hops");
        // o2-o3 gets slow: through o9 is now clearly better.
        heard_at(&mut r, "s1", "o2", 2, 31_000, 2, now);
        assert_eq!(t.better_upstreams(&r, now), [("test".to_string(), "o9".to_string())]);
        // Never toward a downstream, however good.
        t.request("test", n("o9"), &["o9".into()], 2, &r, now);
        assert!(t.better_upstreams(&r, now).is_empty());
        // An upstream whose own best way now runs through this node stops
        // offering the server to it (split horizon): once its route is
        // stale, any fresh way is a move.
        let mut t = Trees::new("o3", []);
        t.request("test", n("o7"), &["o7".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        let later = now + cfg.stale_after + std::time::Duration::from_millis(1);
        heard_at(&mut r, "s1", "o9", 3, 40_000, 3, later);
        assert_eq!(t.better_upstreams(&r, later), [("test".to_string(), "o9".to_string())]);
        // Another server, however close, is not a move.
        let mut t = Trees::new("o3", []);
        t.request("test", n("o7"), &["o7".into()], 1, &r, now);
        t.joined(Source::Neighbour("o4".into()), desc("s2", 2));
        heard_at(&mut r, "s2", "o4", 3, 40_000, 1, now);
        assert!(t.better_upstreams(&r, now).is_empty());
        // Nor while repairing.
        let mut t = Trees::new("o3", []);
        t.request("test", n("o7"), &["o7".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        r.neighbour_down("o2");
        t.neighbour_lost("o2");
        assert!(t.better_upstreams(&r, now).is_empty());
    }

    fn heard_along(t: &mut RouteTable, path: &[&str], delay_us: u64, seq: u64, now: Instant) {
        heard_on(t, path, path.len() as u32, delay_us, seq, now);
    }

    #[test]
    fn a_move_may_go_on_through_the_upstream_but_never_through_the_subtree() {
        let now = Instant::now();
        let cfg = RoutingConfig { tie_floor_us: 0, ..RoutingConfig::default() };
        let mut r = crate::testing::table_with("o3", &["o2", "o9", "o7"], cfg);
        heard_along(&mut r, &["s1", "o2"], 5_000, 1, now);
        let mut t = Trees::new("o3", []);
        t.request("test", n("o7"), &["o7".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        // o2-o3 went slow; o9's way runs on through o2: s1-o2-o9-o3.
        heard_along(&mut r, &["s1", "o2"], 30_000, 2, now);
        heard_along(&mut r, &["s1", "o2", "o9"], 6_000, 2, now);
        assert_eq!(t.better_upstreams(&r, now), [("test".to_string(), "o9".to_string())]);
        // A way through the branch's own downstream is no way.
        heard_along(&mut r, &["s1", "x", "o7", "o9"], 6_000, 3, now);
        heard_along(&mut r, &["s1", "o2"], 30_000, 3, now);
        assert!(t.better_upstreams(&r, now).is_empty());
    }

    #[test]
    fn a_quiet_stream_points_at_its_upstream_unless_already_repairing() {
        let now = Instant::now();
        let mut r = routes("o3", &["o2", "o4", "o9"]);
        heard(&mut r, "s1", "o2", 2, now);
        let mut t = Trees::new("o3", ["own".to_string()]);
        t.request("test", n("o9"), &["o9".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        t.request("own", n("o9"), &["o9".into()], 2, &r, now);
        let own = StreamDesc { stream: "own".into(), ..desc("o3", 0) };
        t.joined(Source::Local, own);
        let silence = |test: Option<u64>| move |s: &str| if s == "test" { test } else { Some(5_000) };
        assert!(t.silent_upstreams(silence(None), 150).is_empty(), "nothing heard yet: not judged");
        assert!(t.silent_upstreams(silence(Some(149)), 150).is_empty());
        // Our own quiet stream is not a neighbour's fault.
        assert_eq!(t.silent_upstreams(silence(Some(150)), 150), ["o2"]);
        assert_eq!(t.silent_branches(silence(Some(150)), 150), [("test".to_string(), "o2".to_string())]);
        // Once marked for a rejoin, the branch is repairing and not judged again.
        assert!(t.upstream_abandoned("test", "o2"));
        assert!(t.silent_branches(silence(Some(5_000)), 150).is_empty());
        assert!(t.silent_upstreams(silence(Some(5_000)), 150).is_empty());
        t.repaired("o2", desc("s1", 1));
        r.neighbour_down("o2");
        t.neighbour_lost("o2");
        assert!(t.silent_upstreams(silence(Some(900)), 150).is_empty(), "already repairing");
    }

    #[test]
    fn a_repairing_branch_takes_no_new_neighbour() {
        // o2 lost its server and is repairing: o9, asking on behalf of o3
        // (o2's old downstream), must not be attached to o2's stale route,
        // or o3 -> o9 -> o2 -> (nothing) becomes a loop with no root.
        let now = Instant::now();
        let mut r = routes("o2", &["s1", "o3", "o9"]);
        heard(&mut r, "s1", "s1", 1, now);
        let mut t = Trees::new("o2", []);
        t.request("test", n("o3"), &["o3".into()], 1, &r, now);
        t.joined(Source::Neighbour("s1".into()), desc("s1", 0));
        r.neighbour_down("s1");
        t.neighbour_lost("s1");
        match t.request("test", n("o9"), &["o3".into(), "o9".into()], 2, &r, now) {
            JoinDecision::Nak(nak) => assert_eq!(nak.reason, NakReason::NoRoute),
            other => panic!("expected a NAK, got {other:?}"),
        }
        // The POP's own viewers still wait with the branch.
        assert!(matches!(t.request("test", Requester::Local, &[], 3, &r, now), JoinDecision::Attached(_)));
    }

    #[test]
    fn a_branch_whose_upstream_repairs_takes_no_new_neighbour_until_rerooted() {
        // o2 is fed by o1, which lost its own way and says so. o9 asks o2:
        // o1 may be repairing through o9 this very moment.
        let now = Instant::now();
        let mut r = routes("o2", &["o1", "o3", "o9"]);
        heard(&mut r, "s1", "o1", 1, now);
        let mut t = Trees::new("o2", []);
        t.request("test", n("o3"), &["o3".into()], 1, &r, now);
        t.joined(Source::Neighbour("o1".into()), desc("s1", 1));
        assert_eq!(t.upstream_repairing("test", "o9", now), None, "only the upstream's word counts");
        assert_eq!(t.upstream_repairing("test", "o1", now), Some(vec!["o3".to_string()]), "passed down");
        assert_eq!(t.upstream_repairing("test", "o1", now), None, "a copy at once is not passed on");
        match t.request("test", n("o9"), &["o9".into()], 2, &r, now) {
            JoinDecision::Nak(nak) => assert_eq!(nak.reason, NakReason::Loop),
            other => panic!("expected a NAK, got {other:?}"),
        }
        assert!(matches!(t.request("test", Requester::Local, &[], 3, &r, now), JoinDecision::Attached(_)));
        // A repeat renews the hold.
        let renewed = now + UPSTREAM_REPAIR_HOLD / 2;
        assert_eq!(t.upstream_repairing("test", "o1", renewed), Some(vec!["o3".to_string()]), "a repeat renews");
        let later = renewed + UPSTREAM_REPAIR_HOLD - Duration::from_millis(1);
        match t.request("test", n("o9"), &["o9".into()], 4, &r, later) {
            JoinDecision::Nak(nak) => assert_eq!(nak.reason, NakReason::Loop),
            other => panic!("still held: {other:?}"),
        }
        // Should the news that ends it never come, the hold ends anyway.
        let later = renewed + UPSTREAM_REPAIR_HOLD;
        assert!(matches!(t.request("test", n("o9"), &["o9".into()], 5, &r, later), JoinDecision::Attached(_)));
        t.leave("test", &n("o9"));
        // Held again; o1 finds its way: the new route comes down, o9 is taken.
        assert!(t.upstream_repairing("test", "o1", later).is_some());
        let route: Vec<String> = ["s1", "o7", "o1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(t.rerooted("test", "o1", "s1", &route, 0), ["o3"]);
        assert!(matches!(t.request("test", n("o9"), &["o9".into()], 6, &r, later), JoinDecision::Attached(_)));
    }

    #[test]
    fn last_viewer_prunes_upward() {
        let now = Instant::now();
        let mut r = routes("o5", &["o4"]);
        heard(&mut r, "s1", "o4", 4, now);
        let mut t = Trees::new("o5", []);
        t.request("test", Requester::Local, &[], 1, &r, now);
        t.joined(Source::Neighbour("o4".into()), desc("s1", 3));
        t.request("test", Requester::Local, &[], 2, &r, now);
        assert_eq!(t.branch("test").unwrap().local_viewers, 2);
        assert_eq!(t.leave("test", &Requester::Local), Prune::Nothing);
        assert_eq!(t.leave("test", &Requester::Local), Prune::Upstream("o4".into()));
        assert_eq!(t.leave("test", &Requester::Local), Prune::Nothing);
    }

    #[test]
    fn lost_upstream_repairs_through_another_neighbour_never_downstream() {
        let now = Instant::now();
        // o3 is fed by o2; o9 is its downstream; o4 another neighbour.
        let mut r = routes("o3", &["o2", "o9", "o4"]);
        heard(&mut r, "s1", "o2", 2, now);
        heard(&mut r, "s1", "o9", 2, now);
        heard(&mut r, "s2", "o4", 3, now);
        let mut t = Trees::new("o3", []);
        t.request("test", n("o9"), &["o9".into()], 1, &r, now);
        t.joined(Source::Neighbour("o2".into()), desc("s1", 1));
        assert_eq!(t.branch("test").unwrap().desc.route, ["s1", "r1", "o3"]);

        r.neighbour_down("o2");
        let (repair, prunes) = t.neighbour_lost("o2");
        assert_eq!(repair, ["test"]);
        assert!(prunes.is_empty());
        assert!(t.branch("test").unwrap().repairing);
        assert_eq!(t.neighbour_lost("o2").0, Vec::<String>::new(), "repair starts once");
        // o9 has a route to s1 but is downstream: the repair goes to o4 (s2).
        let (to, path) = t.repair_target("test", &r, now, &[]).unwrap();
        assert_eq!((to.as_str(), path), ("o4", vec!["o3".to_string()]));
        // A new upstream whose route passes through o3 is a loop.
        let mut looped = desc("s2", 2);
        looped.route = vec!["s2".into(), "o3".into(), "o4".into()];
        assert_eq!(t.repaired("o4", looped), None);
        let mut via_o4 = desc("s2", 2);
        via_o4.route = vec!["s2".into(), "o8".into(), "o4".into()];
        assert_eq!(t.repaired("o4", via_o4), Some((vec!["o9".to_string()], Some("o2".to_string()))));
        let b = t.branch("test").unwrap();
        assert!(!b.repairing);
        assert_eq!(b.source, Source::Neighbour("o4".into()));
        assert_eq!(b.desc.route, ["s2", "o8", "o4", "o3"]);
        assert_eq!(b.desc.server, "s2");
        assert_eq!(b.desc.depth, 3);
        assert_eq!(b.downstream.iter().collect::<Vec<_>>(), ["o9"], "the downstream kept its place");
        // An ancestor asking to join below us is refused as a loop.
        let JoinDecision::Nak(nak) = t.request("test", n("o8"), &["o8".into()], 5, &r, now) else { panic!() };
        assert_eq!(nak.reason, NakReason::Loop);
    }

    #[test]
    fn lost_downstream_is_pruned_and_nothing_left_means_no_repair_target() {
        let now = Instant::now();
        let mut r = routes("o4", &["o8", "o5"]);
        heard(&mut r, "s2", "o8", 2, now);
        let mut t = Trees::new("o4", []);
        t.request("test", n("o5"), &["o5".into()], 1, &r, now);
        t.joined(Source::Neighbour("o8".into()), desc("s2", 1));
        let (repair, prunes) = t.neighbour_lost("o5");
        assert!(repair.is_empty());
        assert_eq!(prunes, [("test".to_string(), Prune::Upstream("o8".into()))]);
        assert!(t.branch("test").is_none());

        t.request("test", n("o5"), &["o5".into()], 2, &r, now);
        t.joined(Source::Neighbour("o8".into()), desc("s2", 1));
        r.neighbour_down("o8");
        t.neighbour_lost("o8");
        let err = t.repair_target("test", &r, now, &[]).unwrap_err();
        assert_eq!(err.reason, NakReason::NoRoute);
    }

    #[test]
    fn a_new_route_to_the_root_flows_down() {
        let now = Instant::now();
        let mut r = routes("o4", &["o3", "o5"]);
        heard(&mut r, "s1", "o3", 3, now);
        let mut t = Trees::new("o4", []);
        t.request("test", n("o5"), &["o5".into()], 1, &r, now);
        t.joined(Source::Neighbour("o3".into()), desc("s1", 2));
        let route = vec!["s2".to_string(), "o8".to_string(), "o9".to_string(), "o3".to_string()];
        assert!(t.rerooted("test", "o5", "s2", &route, 0).is_empty(), "only the upstream may say so");
        assert_eq!(t.rerooted("test", "o3", "s2", &route, 0), ["o5"]);
        let b = t.branch("test").unwrap();
        assert_eq!(b.desc.route.last().unwrap(), "o4");
        assert_eq!((b.desc.depth, b.desc.server.as_str()), (4, "s2"));
    }

    #[test]
    fn a_branch_that_cannot_repair_hands_its_downstream_the_job() {
        let now = Instant::now();
        let mut r = routes("o8", &["o4", "o9"]);
        let mut t = Trees::new("o8", []);
        heard(&mut r, "s1", "o9", 2, now);
        t.request("test", n("o4"), &["o5".into(), "o4".into()], 1, &r, now);
        t.joined(Source::Neighbour("o9".into()), desc("s1", 1));
        r.neighbour_down("o9");
        t.neighbour_lost("o9");
        assert!(t.repair_target("test", &r, now, &[]).is_err());
        assert_eq!(t.orphan("test"), ["o4"]);
        assert!(t.orphan("test").is_empty(), "told once");
        assert!(t.branch("test").unwrap().repairing, "o4 stays attached meanwhile");
        // o4 finds another way and leaves: o8 may now repair through o4.
        t.leave("test", &n("o4"));
        assert!(t.branch("test").is_none(), "nothing left below: pruned");

        // Below, o4 hears it from its upstream and repairs, not through o8.
        let mut r4 = routes("o4", &["o8", "o3", "o5"]);
        heard(&mut r4, "s1", "o8", 3, now);
        heard(&mut r4, "s1", "o3", 3, now);
        let mut t4 = Trees::new("o4", []);
        t4.request("test", n("o5"), &["o5".into()], 1, &r4, now);
        t4.joined(Source::Neighbour("o8".into()), desc("s1", 2));
        assert!(!t4.upstream_abandoned("test", "o3"), "only the upstream can abandon");
        assert!(t4.upstream_abandoned("test", "o8"));
        let (to, _) = t4.repair_target("test", &r4, now, &["o8".to_string()]).unwrap();
        assert_eq!(to, "o3");
        let mut via_o3 = desc("s1", 2);
        via_o3.route = vec!["s1".into(), "o2".into(), "o3".into()];
        let (_, old) = t4.repaired("o3", via_o3).unwrap();
        assert_eq!(old.as_deref(), Some("o8"), "o4 leaves the upstream that gave up");
    }

    #[test]
    fn a_downstream_that_cannot_repair_recovers_when_its_upstream_does() {
        let now = Instant::now();
        let mut r = routes("o5", &["o4"]);
        heard(&mut r, "s1", "o4", 4, now);
        let mut t = Trees::new("o5", []);
        t.request("test", Requester::Local, &[], 1, &r, now);
        t.joined(Source::Neighbour("o4".into()), desc("s1", 3));
        assert!(t.upstream_abandoned("test", "o4"));
        assert!(t.repair_target("test", &r, now, &["o4".to_string()]).is_err());
        let route = vec!["s1".to_string(), "o2".to_string(), "o3".to_string(), "o4".to_string()];
        t.rerooted("test", "o4", "s1", &route, 0);
        assert!(!t.branch("test").unwrap().repairing);
    }
}
