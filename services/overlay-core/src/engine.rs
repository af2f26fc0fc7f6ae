//! One node's side of the tree protocol as one object: the route table,
//! the trees, the joins under way, the repairs, the moves, the quiet
//! streams' checks, the downstreams given grace and the requests waiting
//! for routes. Inputs come in with the time (a stream request, the answer
//! to one this node sent, a prune, a reroot notice, a lost neighbour, a
//! timer); what the node must do comes out as [`Effect`] values; the next
//! timer is [`Engine::poll_timeout`]. No sockets and no clock: onode runs
//! it over gRPC and UDP, overlay-sim runs a thousand of them on a virtual
//! clock.
//!
//! The route table is a field (a state machine of its own, see
//! [`crate::routing`]); the engine hands it the STATUS probes, link
//! notices and heartbeat answers, and returns the copies it passes on as
//! effects.
//!
//! The engine watches its neighbours ([`crate::liveness`]): it numbers a
//! heartbeat to each every [`EngineConfig::heartbeat`] and asks a single
//! one "are you there?" when a stream goes quiet or the bootstrapper
//! reports a neighbour failed ([`Effect::Beat`]). The driver sends the
//! datagrams and hands the answers to [`Engine::heartbeat_answered`]; a
//! neighbour that misses [`MISS_LIMIT`] beats in a row is lost.
//!
//! Every stream request this node sends is an [`Effect::Ask`] with an id;
//! its outcome comes back through [`Engine::answered`] with that id, and
//! the engine knows what the request was for: a join on behalf of
//! requesters ([`Join`]), a branch's repair ([`Repair`]) or a move to a
//! better upstream ([`Move`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::join::{Join, JoinStep};
use crate::liveness::{BeatKind, BeatTotals, Liveness, MISS_LIMIT};
use crate::moves::{self, Move, Moves, Verdict};
use crate::repair::{Repair, Step};
use crate::routing::{LinkNotice, Probe, RouteTable};
use crate::silence::Silence;
use crate::tree::{JoinDecision, Nak, NakReason, Prune, Requester, Source, StreamDesc, Trees, UPSTREAM_REPAIR_HOLD};

/// The engine's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// How long a stream request sent upstream may take, in all.
    pub join_timeout: Duration,
    /// The pause between a repair's rounds (a heartbeat).
    pub retry: Duration,
    /// The STATUS probe interval: requests that find no way while routes
    /// are still learnt wait a few of them.
    pub probe_interval: Duration,
    /// How long a downstream that may only have missed heartbeats keeps
    /// its branches.
    pub downstream_grace: Duration,
    /// A stream this quiet gets its upstream pinged (None: not watched).
    pub silence: Option<Duration>,
    /// A branch keeps its upstream this long before it may move to a
    /// better one (None: trees never move).
    pub settle: Option<Duration>,
    /// Every neighbour gets a heartbeat this often (None: the driver
    /// watches the neighbours itself, and reports through
    /// [`Engine::neighbour_lost`] and [`Engine::link_measured`]).
    pub heartbeat: Option<Duration>,
}

impl Default for EngineConfig {
    /// onode's defaults.
    fn default() -> Self {
        EngineConfig {
            join_timeout: Duration::from_secs(3),
            retry: Duration::from_millis(100),
            probe_interval: Duration::from_millis(500),
            downstream_grace: Duration::from_secs(3),
            silence: Some(Duration::from_millis(150)),
            settle: Some(Duration::from_secs(30)),
            heartbeat: Some(Duration::from_millis(100)),
        }
    }
}

/// A downstream whose heartbeat answers say, this long (and at least
/// three heartbeats), that it does not carry a stream it is fed here no
/// longer wants it (it restarted, or its prune was lost): its branch is
/// pruned. A downstream just attached is judged from then on.
pub const STRAY_AFTER: Duration = Duration::from_secs(1);
/// How often the downstreams are checked against their answers.
const AUDIT: Duration = Duration::from_millis(500);

/// How often a repair that lasts tells its subtree again: every half of
/// the hold it renews ([`UPSTREAM_REPAIR_HOLD`]).
const REPAIRING_RETOLD: Duration = Duration::from_millis(UPSTREAM_REPAIR_HOLD.as_millis() as u64 / 2);

/// What the node must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a stream request for `stream` along `path` to neighbour `to`,
    /// waiting at most `timeout`; its outcome goes to [`Engine::answered`]
    /// with `id`.
    Ask { id: u64, to: String, stream: String, path: Vec<String>, timeout: Duration },
    /// Answer the stream request the driver gave `ticket`.
    Answer { ticket: u64, result: Result<StreamDesc, Nak> },
    /// Ask `from` for its last GOP of `stream` (this node's table is
    /// ready); then answer the local viewers `tickets` with `desc` (their
    /// first picture is on its way), or after a short wait if it is slow.
    Refresh { from: String, stream: String, tickets: Vec<u64>, desc: StreamDesc },
    /// Send a prune of `stream` to the upstream `to`.
    Leave { to: String, stream: String },
    /// Tell downstream `to` the stream's new route to the root; an empty
    /// route says this node found no way to the root (see [`gave_up`]).
    Reroot { to: String, desc: StreamDesc },
    /// Tell downstream `to` that this branch of `stream` lost its way to
    /// the root and is looking for another (or passes that on from its own
    /// upstream); the driver hands it to [`Engine::upstream_repairing`].
    Repairing { to: String, stream: String },
    /// Start this server's own source of `stream`; report with
    /// [`Engine::local_started`].
    StartLocal { stream: String },
    /// Stop this server's own source of `stream` (nobody watches).
    StopLocal { stream: String },
    /// Send heartbeat `seq` to neighbour `to`; its answer goes to
    /// [`Engine::heartbeat_answered`].
    Beat { to: String, seq: u64 },
    /// The driver's check `seq` (see [`Engine::check`]) is over: the
    /// neighbour answered in time, or not.
    Checked { seq: u64, answered: bool },
    /// A branch's repair starts: the last packet before it is the start of
    /// the media gap.
    RepairStarted { stream: String },
    /// A branch is fed again after a repair, by `upstream` from `server`,
    /// `took` after the repair started.
    Repaired { stream: String, upstream: String, server: String, took: Duration },
    /// The trees changed: the forwarding table is built again.
    Republish,
    /// Send this STATUS probe copy (a refresh, an update or a withdrawal)
    /// to neighbour `to`.
    Probe { to: String, probe: Probe },
    /// Send this link notice to neighbour `to`, and the same copy again
    /// [`crate::routing::NOTICE_REPEAT`] later (it rides on UDP).
    Notice { to: String, notice: LinkNotice },
    /// What happened, for the log.
    Note(Note),
}

/// How loud a [`Note`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// A line for the node's log: how loud, about which stream, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub level: Level,
    pub stream: String,
    pub what: String,
}

/// The reroot notice that says "I found no way to the root" (empty route).
pub fn gave_up(stream: &str) -> StreamDesc {
    StreamDesc {
        stream: stream.to_string(),
        server: String::new(),
        ssrcs: Vec::new(),
        depth: 0,
        route: Vec::new(),
        delay_us: 0,
    }
}

/// What a stream request this node sent is for.
#[derive(Debug, Clone)]
enum Purpose {
    Join,
    Repair,
    Move(Move, Instant),
}

#[derive(Debug, Clone)]
struct Asked {
    stream: String,
    to: String,
    purpose: Purpose,
}

/// A join under way: asking (an id) or pausing until a time.
#[derive(Debug, Clone)]
struct JoinRun {
    join: Join,
    resume_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct RepairRun {
    repair: Repair,
    /// Upstreams that gave up on the branch (or closed a loop): in the
    /// first round, an answer whose route to the root runs through one of
    /// them is stale (its sender has not heard yet), and taking it could
    /// close a loop with a sibling branch repairing at the same moment.
    stale: Vec<String>,
    started: Instant,
    /// When the downstreams were last told the branch repairs: told again
    /// while it lasts, so that their hold does not run out first.
    told: Instant,
    /// Asking (the id), or waiting until a time.
    asking: Option<u64>,
    resume_at: Option<Instant>,
}

/// A request that found no way yet, waiting for the routes.
#[derive(Debug, Clone)]
struct Held {
    stream: String,
    requester: Requester,
    path: Vec<String>,
    ticket: u64,
    /// When it is refused for good.
    until_no_route: Instant,
    until_unknown: Instant,
    retry_at: Instant,
}

/// One node's tree protocol.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    pub routes: RouteTable,
    pub trees: Trees,
    moves: Moves,
    silence: Option<Silence>,
    started: Instant,
    next_id: u64,
    asks: BTreeMap<u64, Asked>,
    joins: BTreeMap<String, JoinRun>,
    repairs: BTreeMap<String, RepairRun>,
    held: Vec<Held>,
    /// Downstreams that missed heartbeats: pruned at this time if still
    /// down then.
    graces: BTreeMap<String, Instant>,
    /// Prunes sent to neighbours that were down, by neighbour.
    unsent_leaves: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Downstreams whose answers say they do not carry a stream they are
    /// fed here, since when: (stream, neighbour).
    not_carrying: BTreeMap<(String, String), Instant>,
    next_audit: Instant,
    next_move: Instant,
    next_silence: Instant,
    /// The id of this node's next link notice: unique per notice, also
    /// across restarts (see [`Engine::numbering_from`]).
    next_notice: u64,
    liveness: Liveness,
    /// One-off heartbeats out, by number: to whom, and what for.
    checks: BTreeMap<u64, (String, Check)>,
    next_beat: Instant,
}

/// Why a single neighbour was asked whether it is there.
#[derive(Debug, Clone)]
enum Check {
    /// A stream it feeds went quiet.
    Quiet,
    /// The bootstrapper reports it failed.
    Failed,
    /// The driver asked ([`Engine::check`]).
    Driver,
}

impl Engine {
    /// `offered` are the streams a server serves itself.
    pub fn new(
        routes: RouteTable,
        offered: impl IntoIterator<Item = String>,
        config: EngineConfig,
        now: Instant,
    ) -> Engine {
        Engine {
            trees: Trees::new(routes.me(), offered),
            routes,
            moves: Moves::new(config.settle.unwrap_or(Duration::MAX)),
            silence: config.silence.map(Silence::new),
            config,
            started: now,
            next_id: 1,
            asks: BTreeMap::new(),
            joins: BTreeMap::new(),
            repairs: BTreeMap::new(),
            held: Vec::new(),
            graces: BTreeMap::new(),
            unsent_leaves: BTreeMap::new(),
            not_carrying: BTreeMap::new(),
            next_audit: now + AUDIT,
            next_move: now + Self::move_period(&config),
            next_silence: now,
            next_notice: 1,
            liveness: Liveness::new(1),
            checks: BTreeMap::new(),
            next_beat: now,
        }
    }

    /// Numbers this node's link notices and heartbeats from `first` on.
    /// Other nodes remember the notices they passed on by id, and a late
    /// answer to a beat of a node's last life must not count in this one,
    /// so a restarted node must not start where its last life did: onode
    /// starts from its wall clock in µs.
    pub fn numbering_from(mut self, first: u64) -> Engine {
        self.next_notice = first;
        self.liveness = Liveness::new(first);
        self
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn move_period(config: &EngineConfig) -> Duration {
        (config.probe_interval * 2).max(Duration::from_millis(500))
    }

    fn note(out: &mut Vec<Effect>, level: Level, stream: &str, what: String) {
        out.push(Effect::Note(Note { level, stream: stream.to_string(), what }));
    }

    fn ask(
        &mut self,
        out: &mut Vec<Effect>,
        stream: &str,
        to: &str,
        path: Vec<String>,
        timeout: Duration,
        purpose: Purpose,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.asks.insert(id, Asked { stream: stream.to_string(), to: to.to_string(), purpose });
        out.push(Effect::Ask { id, to: to.to_string(), stream: stream.to_string(), path, timeout });
        id
    }

    /// Whether a stream request for `stream` this node sent is unanswered.
    pub fn asking(&self, stream: &str) -> bool {
        self.asks.values().any(|a| a.stream == stream)
    }

    /// Whether this node's unanswered requests include one to `to` for
    /// `stream`.
    fn asking_to(&self, stream: &str, to: &str) -> bool {
        self.asks.values().any(|a| a.stream == stream && a.to == to)
    }

    /// Whether `neighbour` feeds this node's branch of `stream`.
    fn fed_by(&self, stream: &str, neighbour: &str) -> bool {
        self.trees.branch(stream).is_some_and(|b| matches!(&b.source, Source::Neighbour(up) if up == neighbour))
    }

    /// Streams whose branches are being repaired (a repair under way).
    pub fn repairing(&self) -> impl Iterator<Item = &str> {
        self.repairs.keys().map(String::as_str)
    }

    // ---- stream requests ----

    /// A stream request for `stream` from `requester` (a neighbour, or a
    /// viewer of this POP), which has been through `path`; the driver
    /// answers `ticket` when an [`Effect::Answer`] names it. Right after
    /// start routes are still being learnt, and a neighbour that missed
    /// heartbeats comes back with the next probe: a request that finds no
    /// way yet waits a few probe intervals before it is refused.
    pub fn request(
        &mut self,
        stream: &str,
        requester: Requester,
        path: Vec<String>,
        ticket: u64,
        now: Instant,
    ) -> Vec<Effect> {
        let p = self.config.probe_interval;
        let held = Held {
            stream: stream.to_string(),
            requester,
            path,
            ticket,
            until_no_route: (now + p * 3).max(self.started + p * 4),
            until_unknown: self.started + p * 4,
            retry_at: now,
        };
        let mut out = Vec::new();
        self.decide(held, now, &mut out);
        out
    }

    fn decide(&mut self, held: Held, now: Instant, out: &mut Vec<Effect>) {
        let stream = held.stream.clone();
        if let Requester::Neighbour(r) = &held.requester {
            // Its answers are judged from its (new) attachment on.
            self.not_carrying.remove(&(stream.clone(), r.clone()));
            // This node asked the requester for the same stream (a repair
            // or a move) and waits for its answer: accepting would let
            // each take the stream from the other.
            if self.asking_to(&stream, r) {
                let nak = Nak {
                    reason: NakReason::Loop,
                    detail: format!("node {}: stream {stream:?}: this node is asking {r} for it", self.routes.me()),
                };
                Self::note(out, Level::Info, &stream, format!("stream request of {r} crossed this node's own"));
                out.push(Effect::Answer { ticket: held.ticket, result: Err(nak) });
                return;
            }
        }
        let d = self.trees.request(&stream, held.requester.clone(), &held.path, held.ticket, &self.routes, now);
        match d {
            JoinDecision::Attached(desc) => {
                Self::note(out, Level::Info, &stream, format!("{:?} attached to the existing tree", held.requester));
                out.push(Effect::Republish);
                out.push(Effect::Answer { ticket: held.ticket, result: Ok(desc) });
            }
            JoinDecision::Nak(nak) => {
                // A branch looking for its own way to the root (or below
                // one that is) refuses at once: held, the request would use
                // up the requester's join time on one neighbour while other
                // ways may be open.
                let looking = self.trees.branch(&stream).is_some_and(|b| b.looking(now));
                let until = match nak.reason {
                    _ if looking => now,
                    NakReason::NoRoute => held.until_no_route,
                    NakReason::UnknownStream => held.until_unknown,
                    _ => now,
                };
                if now < until {
                    self.held.push(Held { retry_at: now + self.config.probe_interval / 2, ..held });
                    return;
                }
                Self::note(
                    out,
                    Level::Info,
                    &stream,
                    format!("stream request of {:?} refused: {}", held.requester, nak.detail),
                );
                out.push(Effect::Answer { ticket: held.ticket, result: Err(nak) });
            }
            JoinDecision::Wait => {
                Self::note(out, Level::Debug, &stream, "waiting for the join under way".into());
            }
            JoinDecision::Forward { to, path } => {
                Self::note(out, Level::Info, &stream, format!("stream request sent upstream to {to}, path {path:?}"));
                let join = Join::new(&stream, path.clone(), to.clone(), now, self.config.join_timeout);
                let (_, timeout) = join.ask(now);
                self.joins.insert(stream.clone(), JoinRun { join, resume_at: None });
                self.ask(out, &stream, &to, path, timeout, Purpose::Join);
            }
            JoinDecision::ServeLocal => out.push(Effect::StartLocal { stream }),
        }
    }

    /// The outcome of the stream request [`Effect::Ask`] `id`.
    pub fn answered(&mut self, id: u64, result: Result<StreamDesc, Nak>, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(asked) = self.asks.remove(&id) else { return out };
        // The answer's tree delay is the upstream's.
        let result = result.map(|desc| StreamDesc { delay_us: self.delay_through(&asked.to, desc.delay_us), ..desc });
        match asked.purpose {
            Purpose::Join => self.join_answered(asked, result, now, &mut out),
            Purpose::Repair => self.repair_answered(id, asked, result, now, &mut out),
            Purpose::Move(m, started) => self.move_answered(m, started, result, now, &mut out),
        }
        out
    }

    fn join_answered(&mut self, asked: Asked, result: Result<StreamDesc, Nak>, now: Instant, out: &mut Vec<Effect>) {
        let Asked { stream, to, .. } = asked;
        let Some(mut run) = self.joins.remove(&stream) else {
            // The join ended meanwhile: an answer that attached us is
            // undone.
            if result.is_ok() {
                self.send_leave(to, stream, out);
            }
            return;
        };
        let nak = match result {
            Ok(desc) => {
                self.moves.changed(&stream, now);
                let waiters = self.trees.joined(Source::Neighbour(to.clone()), desc);
                let desc = self.trees.branch(&stream).map(|b| b.desc.clone()).expect("just joined");
                Self::note(out, Level::Info, &stream, format!("joined the tree through {to}"));
                out.push(Effect::Republish);
                // Neighbours are answered at once (they ask for their own
                // GOP); viewers once the GOP is on its way, or a PLAY could
                // start them mid-GOP.
                let mut viewers = Vec::new();
                for w in waiters {
                    match w.requester {
                        Requester::Local => viewers.push(w.ticket),
                        Requester::Neighbour(_) => {
                            out.push(Effect::Answer { ticket: w.ticket, result: Ok(desc.clone()) })
                        }
                    }
                }
                out.push(Effect::Refresh { from: to, stream, tickets: viewers, desc });
                return;
            }
            Err(nak) => nak,
        };
        match run.join.refused(nak.reason, &mut self.trees, &self.routes, now) {
            JoinStep::Ask { to: next, timeout } => {
                Self::note(
                    out,
                    Level::Info,
                    &stream,
                    format!("stream request failed at {to} ({}): trying {next}", nak.detail),
                );
                let path = run.join.path().to_vec();
                self.joins.insert(stream.clone(), run);
                self.ask(out, &stream, &next, path, timeout, Purpose::Join);
            }
            JoinStep::AskAfter { pause, .. } => {
                Self::note(
                    out,
                    Level::Info,
                    &stream,
                    format!("stream request crossed another at {to} ({}): asking again", nak.detail),
                );
                run.resume_at = Some(now + pause);
                self.joins.insert(stream, run);
            }
            JoinStep::GiveUp => {
                Self::note(out, Level::Warn, &stream, format!("join through {to} failed: {}", nak.detail));
                for w in self.trees.failed(&stream) {
                    out.push(Effect::Answer { ticket: w.ticket, result: Err(nak.clone()) });
                }
                out.push(Effect::Republish);
            }
        }
    }

    /// This server's own source of `stream` started (its description) or
    /// failed to.
    pub fn local_started(&mut self, stream: &str, result: Result<StreamDesc, Nak>) -> Vec<Effect> {
        let mut out = Vec::new();
        let (waiters, answer) = match result {
            Ok(desc) => {
                Self::note(&mut out, Level::Info, stream, "this server roots the tree".into());
                let waiters = self.trees.joined(Source::Local, desc);
                (waiters, Ok(self.trees.branch(stream).map(|b| b.desc.clone()).expect("just joined")))
            }
            Err(nak) => {
                Self::note(&mut out, Level::Warn, stream, format!("source failed to start: {}", nak.detail));
                (self.trees.failed(stream), Err(nak))
            }
        };
        for w in waiters {
            out.push(Effect::Answer { ticket: w.ticket, result: answer.clone() });
        }
        out.push(Effect::Republish);
        out
    }

    /// This server serves `stream` from now on (a publisher began).
    pub fn offer(&mut self, stream: &str) -> Vec<Effect> {
        self.trees.offer(stream);
        vec![Effect::Republish]
    }

    /// This server no longer serves `stream`: its tree is dropped, its
    /// downstreams told the root gave up, waiting requests refused.
    pub fn withdraw(&mut self, stream: &str, nak: Nak) -> Vec<Effect> {
        let mut out = Vec::new();
        let (downstream, waiting) = self.trees.withdraw(stream);
        for w in waiting {
            out.push(Effect::Answer { ticket: w.ticket, result: Err(nak.clone()) });
        }
        Self::note(&mut out, Level::Info, stream, format!("stream withdrawn; downstreams {downstream:?} told"));
        for d in downstream {
            out.push(Effect::Reroot { to: d, desc: gave_up(stream) });
        }
        out.push(Effect::Republish);
        out
    }

    // ---- leaves ----

    /// `requester` no longer needs `stream`.
    pub fn leave(&mut self, stream: &str, requester: Requester) -> Vec<Effect> {
        if let Requester::Neighbour(n) = &requester {
            // Until its next heartbeat answer says otherwise.
            self.routes.stopped_carrying(n, stream);
        }
        let prune = self.trees.leave(stream, &requester);
        let mut out = Vec::new();
        self.prune(stream, prune, &mut out);
        out
    }

    fn prune(&mut self, stream: &str, prune: Prune, out: &mut Vec<Effect>) {
        match prune {
            Prune::Nothing => Self::note(out, Level::Debug, stream, "left; others still watch".into()),
            Prune::Upstream(up) => {
                Self::note(out, Level::Info, stream, format!("last viewer left: pruning upstream {up}"));
                self.send_leave(up, stream.to_string(), out);
            }
            Prune::StopLocal => {
                Self::note(out, Level::Info, stream, "last branch pruned".into());
                out.push(Effect::StopLocal { stream: stream.to_string() });
            }
        }
        out.push(Effect::Republish);
    }

    /// Sends a prune of `stream` to `to`. One to a neighbour that is down
    /// may not arrive: it is sent again when the neighbour is back
    /// ([`Engine::neighbour_up`]), or the neighbour would go on sending the
    /// stream to this node for nothing, and could even take it from here
    /// later while still sending it here (the link used both ways).
    fn send_leave(&mut self, to: String, stream: String, out: &mut Vec<Effect>) {
        // An answer undone (stale, or the branch healed meanwhile) may come
        // from the branch's own upstream: that prune would cut its feed.
        if self.fed_by(&stream, &to) {
            return;
        }
        if self.routes.is_down(&to) {
            self.unsent_leaves.entry(to.clone()).or_default().insert(stream.clone());
        }
        out.push(Effect::Leave { to, stream });
    }

    // ---- routes and links ----

    fn send_probes(out: &mut Vec<Effect>, probes: Vec<(String, Probe)>) {
        out.extend(probes.into_iter().map(|(to, probe)| Effect::Probe { to, probe }));
    }

    fn send_notices(out: &mut Vec<Effect>, notices: Vec<(String, LinkNotice)>) {
        out.extend(notices.into_iter().map(|(to, notice)| Effect::Notice { to, notice }));
    }

    /// This server's probe round `seq`, offering `streams`.
    pub fn originate(&mut self, seq: u64, send_time_unix_us: u64, streams: Vec<String>) -> Vec<Effect> {
        let mut out = Vec::new();
        Self::send_probes(&mut out, self.routes.originate(seq, send_time_unix_us, streams));
        out
    }

    /// A STATUS probe copy from a neighbour (see
    /// [`RouteTable::on_probe`]).
    pub fn on_probe(&mut self, probe: &Probe, now: Instant, now_unix_us: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        Self::send_probes(&mut out, self.routes.on_probe(probe, now, now_unix_us));
        out
    }

    /// A link notice from a neighbour: a new one is passed on, and the
    /// neighbours hear what the routes it killed change.
    pub fn on_link_notice(&mut self, notice: &LinkNotice, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let notices = self.routes.on_link_notice(notice, now);
        if notices.is_empty() {
            return out;
        }
        let (a, b) = (&notice.a, &notice.b);
        let what = if notice.up {
            format!("link notice: {a}-{b} is back")
        } else {
            format!("link notice: {a}-{b} is dead, routes through it withdrawn")
        };
        Self::note(&mut out, Level::Info, "", what);
        Self::send_notices(&mut out, notices);
        Self::send_probes(&mut out, self.routes.tell_changes(now));
        out
    }

    /// `neighbour` answered heartbeat `seq` and says it carries
    /// `carrying`; `None` if that beat is not one of ours still out (late,
    /// duplicated, or forged): the driver counts it and drops it. The
    /// answer ends the neighbour's run of missed beats and measures the
    /// link; one that was down is back ([`Engine::link_measured`]).
    pub fn heartbeat_answered(
        &mut self,
        neighbour: &str,
        seq: u64,
        carrying: impl IntoIterator<Item = String>,
        now: Instant,
    ) -> Option<Vec<Effect>> {
        let answer = self.liveness.on_reply(neighbour, seq, now)?;
        let mut out = Vec::new();
        // A periodic beat has no entry here.
        match self.checks.remove(&seq).map(|(_, why)| why) {
            Some(Check::Quiet) => Self::note(
                &mut out,
                Level::Debug,
                "",
                format!("a stream went quiet but its upstream {neighbour} answers"),
            ),
            Some(Check::Failed) => Self::note(
                &mut out,
                Level::Warn,
                "",
                format!("the bootstrapper reports {neighbour} failed but it answers: kept"),
            ),
            Some(Check::Driver) => out.push(Effect::Checked { seq, answered: true }),
            None => {}
        }
        out.extend(self.link_measured(neighbour, answer.rtt.as_micros() as u64, carrying));
        Some(out)
    }

    /// `neighbour` answered after `rtt_us` (the driver's own heartbeat, or
    /// this engine's) and says it carries `carrying`. One that was down is
    /// back: the overlay hears so (a link notice), and the prunes sent
    /// while it was down go again.
    pub fn link_measured(
        &mut self,
        neighbour: &str,
        rtt_us: u64,
        carrying: impl IntoIterator<Item = String>,
    ) -> Vec<Effect> {
        self.routes.on_link_rtt(neighbour, rtt_us);
        self.routes.set_carrying(neighbour, carrying);
        if !self.routes.is_down(neighbour) {
            return Vec::new();
        }
        self.routes.neighbour_up(neighbour);
        let mut out = Vec::new();
        Self::note(&mut out, Level::Info, "", format!("neighbour {neighbour} answers again"));
        let id = self.notice_id();
        Self::send_notices(&mut out, self.routes.announce_link(neighbour, true, id));
        out.extend(self.neighbour_up(neighbour));
        out
    }

    /// Asks `neighbour` once whether it is there, for the driver (a stream
    /// request that waits long): the beat to send, numbered `seq`, and
    /// later [`Effect::Checked`] with that number. `None` if too many
    /// beats are out already (count it unanswered).
    pub fn check(&mut self, neighbour: &str, timeout: Duration, now: Instant) -> Option<(u64, Effect)> {
        self.ask_once(neighbour, Check::Driver, timeout, now)
    }

    /// Asks `neighbour` once whether it is there, for `why`: the beat's
    /// number and the beat to send.
    fn ask_once(&mut self, neighbour: &str, why: Check, timeout: Duration, now: Instant) -> Option<(u64, Effect)> {
        let seq = self.liveness.send(neighbour, BeatKind::Check, now, timeout)?;
        self.checks.insert(seq, (neighbour.to_string(), why));
        Some((seq, Effect::Beat { to: neighbour.to_string(), seq }))
    }

    /// How long a heartbeat may take to be answered: two beats, and at
    /// least 250 ms (a slow link's round trip).
    fn beat_limit(&self) -> Duration {
        (self.config.heartbeat.unwrap_or(self.config.retry) * 2).max(Duration::from_millis(250))
    }

    /// Periodic beats sent to `neighbour` and missed by it, since start.
    pub fn beat_totals(&self, neighbour: &str) -> BeatTotals {
        self.liveness.totals(neighbour)
    }

    /// The beats whose time is up: a neighbour that missed [`MISS_LIMIT`]
    /// in a row is lost; an unanswered check does what it was for.
    fn expire_beats(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let expired = self.liveness.expire(now);
        for seq in expired.checks {
            let Some((to, why)) = self.checks.remove(&seq) else { continue };
            match why {
                Check::Driver => out.push(Effect::Checked { seq, answered: false }),
                Check::Quiet if !self.routes.is_down(&to) => {
                    Self::note(
                        out,
                        Level::Warn,
                        "",
                        format!("a stream went silent and its upstream does not answer: {to} declared lost"),
                    );
                    out.extend(self.neighbour_lost(&to, false, now));
                }
                Check::Quiet => {}
                Check::Failed => out.extend(self.believe_failed(&to, now)),
            }
        }
        for n in expired.lost {
            if !self.routes.is_down(&n) {
                Self::note(
                    out,
                    Level::Warn,
                    "",
                    format!("neighbour {n} missed {MISS_LIMIT} heartbeats: declared lost"),
                );
                out.extend(self.neighbour_lost(&n, false, now));
            }
        }
    }

    fn notice_id(&mut self) -> u64 {
        let id = self.next_notice;
        self.next_notice += 1;
        id
    }

    /// The bootstrapper's report that `node` failed. A neighbour that
    /// still looks alive may only have lost its way to the bootstrapper (a
    /// partition): it is asked once more, and if it answers it is believed
    /// over the report. Otherwise routes through the node die here, the
    /// neighbours hear what that changes, and a neighbour's branches are
    /// repaired and pruned at once.
    pub fn node_failed(&mut self, node: &str, now: Instant) -> Vec<Effect> {
        if self.routes.neighbours().iter().any(|n| n == node) && !self.routes.is_down(node) {
            if let Some((_, beat)) = self.ask_once(node, Check::Failed, self.beat_limit(), now) {
                return vec![beat];
            }
        }
        self.believe_failed(node, now)
    }

    fn believe_failed(&mut self, node: &str, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.routes.node_failed(node, now);
        Self::send_probes(&mut out, self.routes.tell_changes(now));
        if self.routes.neighbours().iter().any(|n| n == node) {
            out.extend(self.neighbour_lost(node, true, now));
        }
        out
    }

    /// `neighbour` answers again (the route table knows already): the
    /// prunes sent while it was down go again, for the streams it does not
    /// feed here now and is not being asked to.
    fn neighbour_up(&mut self, neighbour: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        self.graces.remove(neighbour);
        for stream in self.unsent_leaves.remove(neighbour).unwrap_or_default() {
            if !self.fed_by(&stream, neighbour) && !self.asking_to(&stream, neighbour) {
                Self::note(&mut out, Level::Debug, &stream, format!("prune sent again to {neighbour}, back up"));
                out.push(Effect::Leave { to: neighbour.to_string(), stream });
            }
        }
        out
    }

    /// Every branch this node is fed by a neighbour, to prune at shutdown.
    pub fn upstreams(&self) -> Vec<(String, String)> {
        self.trees
            .active()
            .filter_map(|b| match &b.source {
                Source::Neighbour(up) => Some((b.desc.stream.clone(), up.clone())),
                Source::Local => None,
            })
            .collect()
    }

    // ---- losses and repairs ----

    /// `neighbour` (or the link to it) is lost: routes through it die at
    /// once, everywhere (a link notice, unless the bootstrapper's report
    /// of its failure came first and told every node already), and the
    /// branches it fed are repaired at once. The branches it was fed are
    /// pruned at once when the loss is `certain` (the bootstrapper says
    /// it failed); after missed heartbeats, which a lossy link also
    /// causes, only if it is still down after the grace.
    pub fn neighbour_lost(&mut self, neighbour: &str, certain: bool, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        // Should it answer a beat still out, it is not counted lost twice.
        self.liveness.mark_lost(neighbour);
        if !self.routes.is_down(neighbour) {
            self.routes.neighbour_down(neighbour);
            let id = self.notice_id();
            Self::send_notices(&mut out, self.routes.announce_link(neighbour, false, id));
        }
        Self::send_probes(&mut out, self.routes.tell_changes(now));
        for stream in self.trees.upstream_lost(neighbour) {
            Self::note(&mut out, Level::Warn, &stream, format!("upstream {neighbour} lost: repairing the tree"));
            self.start_repair(&stream, Vec::new(), now, &mut out);
        }
        if certain {
            self.graces.remove(neighbour);
            self.prune_downstream(neighbour, &mut out);
        } else {
            self.graces.entry(neighbour.to_string()).or_insert(now + self.config.downstream_grace);
        }
        out.push(Effect::Republish);
        out
    }

    fn prune_downstream(&mut self, neighbour: &str, out: &mut Vec<Effect>) {
        for (stream, prune) in self.trees.downstream_lost(neighbour) {
            Self::note(out, Level::Info, &stream, format!("downstream {neighbour} lost: pruned"));
            // Should it be alive after all, it learns it lost its upstream.
            out.push(Effect::Reroot { to: neighbour.to_string(), desc: gave_up(&stream) });
            self.prune(&stream, prune, out);
        }
    }

    /// The upstream of `stream` told this node the root's route changed
    /// (`route`, and the upstream's delay along the tree), or that it gave
    /// up (empty route).
    pub fn rerooted(
        &mut self,
        stream: &str,
        from: &str,
        server: &str,
        route: &[String],
        delay_us: u64,
        now: Instant,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if route.is_empty() {
            if self.trees.upstream_abandoned(stream, from) {
                Self::note(&mut out, Level::Warn, stream, format!("upstream {from} gave up: repairing the tree"));
                self.start_repair(stream, vec![from.to_string()], now, &mut out);
            } else if let Some(run) = self.repairs.get_mut(stream) {
                // Not (yet) the upstream: an answer of its to this node's
                // repair, which the notice may have overtaken, names a way
                // it no longer has.
                run.stale.push(from.to_string());
            }
            return out;
        }
        if route.iter().any(|n| n == self.routes.me()) {
            // The upstream's way to the root passes through this node:
            // moves or repairs made at the same moment closed a loop.
            if self.trees.upstream_abandoned(stream, from) {
                Self::note(
                    &mut out,
                    Level::Warn,
                    stream,
                    format!(
                        "the route from upstream {from} runs through this node (a loop): left it, repairing the tree"
                    ),
                );
                // Break the loop at once: the repair takes a while, and
                // meanwhile the loop would hold its nodes.
                out.push(Effect::Leave { to: from.to_string(), stream: stream.to_string() });
                self.start_repair(stream, vec![from.to_string()], now, &mut out);
            }
            return out;
        }
        let delay_us = self.delay_through(from, delay_us);
        let downstream = self.trees.rerooted(stream, from, server, route, delay_us);
        if let Some(desc) = self.trees.branch(stream).map(|b| b.desc.clone()) {
            for d in downstream {
                out.push(Effect::Reroot { to: d, desc: desc.clone() });
            }
        }
        out
    }

    /// The upstream `from` of `stream` says it, or a node above it, is
    /// looking for a new way to the root: the branch feeds no new neighbour
    /// until the new route comes down, and its downstreams hear the same.
    pub fn upstream_repairing(&mut self, stream: &str, from: &str, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(downstream) = self.trees.upstream_repairing(stream, from, now) else { return out };
        Self::note(&mut out, Level::Debug, stream, format!("upstream {from} repairs: no new neighbour fed meanwhile"));
        out.extend(downstream.into_iter().map(|to| Effect::Repairing { to, stream: stream.to_string() }));
        out
    }

    /// This node's delay along a tree through `upstream`, whose own is
    /// `upstream_us`: its link added, as this node measures it.
    fn delay_through(&self, upstream: &str, upstream_us: u64) -> u64 {
        upstream_us.saturating_add(self.routes.link_delay_us(upstream).unwrap_or(0))
    }

    fn start_repair(&mut self, stream: &str, avoid: Vec<String>, now: Instant, out: &mut Vec<Effect>) {
        if let Some(run) = self.repairs.get_mut(stream) {
            run.stale.extend(avoid);
            // One repair per branch: one that waits goes on at once.
            if run.asking.is_none() {
                run.resume_at = Some(now);
                self.step_repair(stream, now, out);
            }
            return;
        }
        out.push(Effect::RepairStarted { stream: stream.to_string() });
        self.tell_repairing(stream, out);
        let run = RepairRun {
            repair: Repair::new(stream, avoid.clone()),
            stale: avoid,
            started: now,
            told: now,
            asking: None,
            resume_at: Some(now),
        };
        self.repairs.insert(stream.to_string(), run);
        self.step_repair(stream, now, out);
    }

    /// The subtree stops feeding new neighbours until the new route comes
    /// down: one of them may be where this repair finds its way.
    fn tell_repairing(&self, stream: &str, out: &mut Vec<Effect>) {
        if let Some(b) = self.trees.branch(stream) {
            for d in &b.downstream {
                out.push(Effect::Repairing { to: d.clone(), stream: stream.to_string() });
            }
        }
    }

    /// Takes the repair of `stream` as far as it goes now.
    fn step_repair(&mut self, stream: &str, now: Instant, out: &mut Vec<Effect>) {
        let Some(run) = self.repairs.get_mut(stream) else { return };
        if run.asking.is_some() || run.resume_at.is_some_and(|t| now < t) {
            return;
        }
        run.resume_at = None;
        match run.repair.next(&self.trees, &self.routes, now) {
            Step::Done => {
                self.repairs.remove(stream);
            }
            Step::Wait { orphan } => {
                run.resume_at = Some(now + self.config.retry);
                // Like the neighbour avoided, an upstream that gave up may
                // have found its way by the next round.
                run.stale.clear();
                Self::note(out, Level::Debug, stream, "no repair target left this round".into());
                if orphan {
                    self.orphan(stream, out);
                }
            }
            Step::Ask { to, path } => {
                let id = self.ask(out, stream, &to, path, self.config.join_timeout, Purpose::Repair);
                if let Some(run) = self.repairs.get_mut(stream) {
                    run.asking = Some(id);
                }
            }
        }
    }

    fn orphan(&mut self, stream: &str, out: &mut Vec<Effect>) {
        let downstream = self.trees.orphan(stream);
        if downstream.is_empty() {
            return;
        }
        Self::note(
            out,
            Level::Warn,
            stream,
            format!("no way to the root: downstreams {downstream:?} asked to look on their own"),
        );
        for d in downstream {
            out.push(Effect::Reroot { to: d, desc: gave_up(stream) });
        }
    }

    fn repair_answered(
        &mut self,
        id: u64,
        asked: Asked,
        result: Result<StreamDesc, Nak>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Asked { stream, to, .. } = asked;
        let live = self.repairs.get(&stream).is_some_and(|r| r.asking == Some(id));
        if !live {
            if result.is_ok() {
                self.send_leave(to, stream, out);
            }
            return;
        }
        let run = self.repairs.get_mut(&stream).expect("checked");
        run.asking = None;
        // The upstream found its way again meanwhile (a reroot notice):
        // the branch is fed, and the answer is undone.
        if result.is_ok() && self.trees.branch(&stream).is_none_or(|b| !b.repairing) {
            self.repairs.remove(&stream);
            self.send_leave(to, stream, out);
            return;
        }
        let result = match result {
            Ok(desc) if desc.route.iter().any(|n| run.stale.contains(n)) => {
                // Refused like a loop; the sender is left.
                self.send_leave(to.clone(), stream.clone(), out);
                Err(Nak {
                    reason: NakReason::Loop,
                    detail: format!("{to}'s way to the root runs through an upstream that gave up: {:?}", desc.route),
                })
            }
            other => other,
        };
        let run = self.repairs.get_mut(&stream).expect("checked");
        match result {
            Ok(desc) => {
                let server = desc.server.clone();
                match self.trees.repaired(&to, desc) {
                    Some((downstream, old)) => {
                        let run = self.repairs.remove(&stream).expect("checked");
                        let took = now.saturating_duration_since(run.started);
                        Self::note(
                            out,
                            Level::Info,
                            &stream,
                            format!("tree repaired through {to} from {server} in {} ms", took.as_millis()),
                        );
                        out.push(Effect::Repaired { stream: stream.clone(), upstream: to.clone(), server, took });
                        let desc = self.new_upstream(&stream, downstream, old, now, out);
                        out.push(Effect::Refresh { from: to, stream, tickets: Vec::new(), desc });
                    }
                    None => {
                        // Attached below itself, or pruned meanwhile: undo.
                        run.repair.undone(&to);
                        self.send_leave(to.clone(), stream.clone(), out);
                        self.step_repair(&stream, now, out);
                    }
                }
            }
            Err(nak) => {
                Self::note(out, Level::Debug, &stream, format!("repair through {to} refused: {}", nak.detail));
                let after = run.repair.refused(&to, nak.reason);
                if after.wait {
                    run.resume_at = Some(now + self.config.retry);
                }
                if after.orphan {
                    self.orphan(&stream, out);
                }
                self.step_repair(&stream, now, out);
            }
        }
    }

    // ---- moves ----

    fn move_answered(
        &mut self,
        m: Move,
        started: Instant,
        result: Result<StreamDesc, Nak>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let desc = match result {
            Ok(desc) => desc,
            Err(nak) => {
                Self::note(out, Level::Debug, &m.stream, format!("move to {} refused: {}", m.to, nak.detail));
                return;
            }
        };
        let taken = match moves::accept(&self.trees, &self.routes, &m, &desc, now) {
            Verdict::Take => self.trees.repaired(&m.to, desc),
            Verdict::Stale => None,
            Verdict::NoGain { tree_us, offered_us } => {
                self.moves.no_gain(&m.stream, &m.to, now);
                Self::note(
                    out,
                    Level::Info,
                    &m.stream,
                    format!(
                        "move to {} not made: its tree would take {:.1} ms, against {:.1} ms now",
                        m.to,
                        offered_us as f64 / 1000.0,
                        tree_us as f64 / 1000.0
                    ),
                );
                None
            }
            Verdict::OtherRoot { root } => {
                Self::note(
                    out,
                    Level::Info,
                    &m.stream,
                    format!("move to {} not made: it feeds the stream from {} rather than {root}", m.to, desc.server),
                );
                None
            }
        };
        let Some((downstream, old)) = taken else {
            self.send_leave(m.to, m.stream, out);
            return;
        };
        Self::note(
            out,
            Level::Info,
            &m.stream,
            format!(
                "moved from {} to the better upstream {} in {} ms",
                m.from,
                m.to,
                now.saturating_duration_since(started).as_millis()
            ),
        );
        self.new_upstream(&m.stream, downstream, old, now, out);
    }

    /// The branch of `stream` has just taken a new upstream (a repair or
    /// a move): its settle time starts again, the old upstream is left and
    /// the downstreams are told the new route. Its description.
    fn new_upstream(
        &mut self,
        stream: &str,
        downstream: Vec<String>,
        old: Option<String>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> StreamDesc {
        self.moves.changed(stream, now);
        out.push(Effect::Republish);
        if let Some(old) = old {
            self.send_leave(old, stream.to_string(), out);
        }
        let desc = self.trees.branch(stream).map(|b| b.desc.clone()).expect("just took an upstream");
        for d in downstream {
            out.push(Effect::Reroot { to: d, desc: desc.clone() });
        }
        desc
    }

    // ---- time ----

    /// When [`Engine::tick`] has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        self.held.iter().for_each(|h| at(h.retry_at));
        self.joins.values().filter_map(|j| j.resume_at).for_each(&mut at);
        self.repairs.values().filter(|r| r.asking.is_none()).filter_map(|r| r.resume_at).for_each(&mut at);
        self.repairs.values().for_each(|r| at(r.told + REPAIRING_RETOLD));
        self.graces.values().copied().for_each(&mut at);
        if self.config.settle.is_some() {
            at(self.next_move);
        }
        if self.trees.active().next().is_some() {
            at(self.next_audit);
        }
        if self.silence.is_some() {
            at(self.next_silence);
        }
        if let Some(t) = self.liveness.next_deadline() {
            at(t);
        }
        if self.config.heartbeat.is_some() {
            at(self.next_beat);
        }
        next
    }

    /// Does what is due at `now`; `silent_ms` says how long each stream
    /// received has been quiet (None: nothing received yet).
    pub fn tick(&mut self, now: Instant, silent_ms: impl Fn(&str) -> Option<u64>) -> Vec<Effect> {
        let mut out = Vec::new();
        // Losses first: the repairs below must not pick a neighbour that
        // has just missed its third beat.
        self.expire_beats(now, &mut out);
        if let Some(every) = self.config.heartbeat.filter(|_| self.next_beat <= now) {
            self.next_beat = now + every;
            let limit = self.beat_limit();
            for n in self.routes.neighbours().to_vec() {
                if let Some(seq) = self.liveness.send(&n, BeatKind::Periodic, now, limit) {
                    out.push(Effect::Beat { to: n, seq });
                }
            }
        }
        // Requests waiting for routes.
        let (due, wait): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.retry_at <= now);
        self.held = wait;
        for h in due {
            self.decide(h, now, &mut out);
        }
        // Crossed joins asked again.
        let resumed: Vec<String> =
            self.joins.iter().filter(|(_, j)| j.resume_at.is_some_and(|t| t <= now)).map(|(s, _)| s.clone()).collect();
        for stream in resumed {
            let run = self.joins.get_mut(&stream).expect("listed");
            run.resume_at = None;
            let (to, timeout) = run.join.ask(now);
            let (to, path) = (to.to_string(), run.join.path().to_vec());
            self.ask(&mut out, &stream, &to, path, timeout, Purpose::Join);
        }
        // Long repairs tell their subtree again before its hold runs out.
        let retell: Vec<String> =
            self.repairs.iter().filter(|(_, r)| r.told + REPAIRING_RETOLD <= now).map(|(s, _)| s.clone()).collect();
        for stream in retell {
            self.repairs.get_mut(&stream).expect("listed").told = now;
            self.tell_repairing(&stream, &mut out);
        }
        // Repairs after their wait.
        let waiting: Vec<String> = self
            .repairs
            .iter()
            .filter(|(_, r)| r.asking.is_none() && r.resume_at.is_none_or(|t| t <= now))
            .map(|(s, _)| s.clone())
            .collect();
        for stream in waiting {
            self.step_repair(&stream, now, &mut out);
        }
        // Downstreams whose grace is over.
        let over: Vec<String> = self.graces.iter().filter(|(_, t)| **t <= now).map(|(n, _)| n.clone()).collect();
        for n in over {
            self.graces.remove(&n);
            if self.routes.is_down(&n) {
                self.prune_downstream(&n, &mut out);
            }
        }
        if self.next_audit <= now {
            self.next_audit = now + AUDIT;
            self.audit_downstreams(now, &mut out);
        }
        if self.config.settle.is_some() && self.next_move <= now {
            self.next_move = now + Self::move_period(&self.config);
            for m in self.moves.due(&self.trees, &self.routes, now) {
                let path = vec![self.routes.me().to_string()];
                let (stream, to) = (m.stream.clone(), m.to.clone());
                self.ask(&mut out, &stream, &to, path, self.config.join_timeout, Purpose::Move(m, now));
            }
        }
        if let Some(silence) = self.silence.as_mut() {
            if self.next_silence <= now {
                self.next_silence = now + silence.period();
                let watch = silence.tick(&mut self.trees, &self.routes, &silent_ms, now);
                for (stream, up) in watch.rejoin {
                    Self::note(
                        &mut out,
                        Level::Warn,
                        &stream,
                        format!("upstream {up} answers but no longer feeds the stream: joining again"),
                    );
                    self.start_repair(&stream, Vec::new(), now, &mut out);
                }
                for (to, timeout) in watch.ping {
                    out.extend(self.ask_once(&to, Check::Quiet, timeout, now).map(|(_, beat)| beat));
                }
            }
        }
        out
    }

    /// Prunes the downstreams that have said for [`STRAY_AFTER`] that they
    /// do not carry the stream this node sends them.
    fn audit_downstreams(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let mut seen = std::collections::BTreeSet::new();
        let mut stray = Vec::new();
        for b in self.trees.active() {
            for d in &b.downstream {
                if self.routes.carries(d, &b.desc.stream) != Some(false) || self.routes.is_down(d) {
                    continue;
                }
                let key = (b.desc.stream.clone(), d.clone());
                let since = *self.not_carrying.entry(key.clone()).or_insert(now);
                if now.saturating_duration_since(since) >= STRAY_AFTER.max(self.config.retry * 3) {
                    stray.push(key.clone());
                }
                seen.insert(key);
            }
        }
        self.not_carrying.retain(|k, _| seen.contains(k));
        for (stream, d) in stray {
            self.not_carrying.remove(&(stream.clone(), d.clone()));
            Self::note(
                out,
                Level::Warn,
                &stream,
                format!("downstream {d} no longer carries the stream (restarted, or its prune was lost): pruned"),
            );
            let prune = self.trees.leave(&stream, &Requester::Neighbour(d));
            self.prune(&stream, prune, out);
        }
    }

    /// Forgets the moves' settle times of branches no longer carried.
    pub fn forget_gone(&mut self) {
        self.moves.retain_carried(&self.trees);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingConfig;
    use crate::testing::probe;

    fn config() -> EngineConfig {
        EngineConfig { silence: None, settle: None, heartbeat: None, ..EngineConfig::default() }
    }

    /// o3 between o2 (toward s1, 2 hops) and o4, with a slower way to s1
    /// through o9; its routes learnt at `now`.
    fn o3(now: Instant) -> Engine {
        let mut routes = crate::testing::table("o3", &["o2", "o4", "o9"]);
        routes.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 10_000), now, 0);
        routes.on_probe(&probe("s1", 1, "o9", &["s1", "o8", "o9"], 40_000), now, 0);
        Engine::new(routes, [], config(), now)
    }

    fn desc(route: &[&str]) -> StreamDesc {
        StreamDesc {
            stream: "test".into(),
            server: "s1".into(),
            ssrcs: vec![1, 2],
            depth: (route.len() as u32).saturating_sub(1),
            route: route.iter().map(|s| s.to_string()).collect(),
            delay_us: 0,
        }
    }

    fn asks(out: &[Effect]) -> Vec<(u64, &str, &[String])> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Ask { id, to, path, .. } => Some((*id, to.as_str(), path.as_slice())),
                _ => None,
            })
            .collect()
    }

    fn has(out: &[Effect], wanted: &Effect) -> bool {
        out.contains(wanted)
    }

    /// o3 carries `test` from o2 to o4.
    fn carrying(now: Instant) -> Engine {
        let mut e = o3(now);
        let out = e.request("test", Requester::Neighbour("o4".into()), vec!["o4".into()], 7, now);
        let (id, _, _) = asks(&out)[0];
        e.answered(id, Ok(desc(&["s1", "o2"])), now);
        e
    }

    #[test]
    fn a_request_goes_upstream_and_its_answer_attaches_the_requester() {
        let now = Instant::now();
        let mut e = o3(now);
        let out = e.request("test", Requester::Neighbour("o4".into()), vec!["o4".into()], 7, now);
        assert_eq!(asks(&out), [(1, "o2", &["o4".to_string(), "o3".to_string()][..])], "the best way: {out:?}");
        assert!(e.asking("test"));
        // A viewer of this node's own asks meanwhile: it waits on the join.
        assert!(asks(&e.request("test", Requester::Local, vec![], 8, now)).is_empty());
        let out = e.answered(1, Ok(desc(&["s1", "o2"])), now);
        let mine = desc(&["s1", "o2", "o3"]);
        assert!(
            has(&out, &Effect::Answer { ticket: 7, result: Ok(mine.clone()) }),
            "neighbour answered at once: {out:?}"
        );
        assert!(
            has(&out, &Effect::Refresh { from: "o2".into(), stream: "test".into(), tickets: vec![8], desc: mine }),
            "the viewer is answered once the GOP is asked for: {out:?}"
        );
        assert!(has(&out, &Effect::Republish));
        assert!(!e.asking("test"));
        // The same answer again (a duplicate) changes nothing.
        assert!(e.answered(1, Ok(desc(&["s1", "o2"])), now).is_empty());
    }

    #[test]
    fn a_refused_join_tries_the_next_way_then_refuses_every_waiter() {
        let now = Instant::now();
        let mut e = o3(now);
        e.request("test", Requester::Neighbour("o4".into()), vec!["o4".into()], 7, now);
        let nak = |reason| Nak { reason, detail: "no".into() };
        let out = e.answered(1, Err(nak(NakReason::NoRoute)), now);
        assert_eq!(asks(&out).iter().map(|a| a.1).collect::<Vec<_>>(), ["o9"]);
        let out = e.answered(2, Err(nak(NakReason::Timeout)), now);
        assert!(has(&out, &Effect::Answer { ticket: 7, result: Err(nak(NakReason::Timeout)) }), "{out:?}");
        assert!(e.trees.branch("test").is_none() && e.trees.joining().is_empty());
    }

    #[test]
    fn a_crossed_join_is_asked_again_after_the_pause() {
        let now = Instant::now();
        let mut routes = crate::testing::table("o3", &["o2", "o4"]);
        routes.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 10_000), now, 0);
        let mut e = Engine::new(routes, [], config(), now);
        e.request("test", Requester::Local, vec![], 1, now);
        let out = e.answered(1, Err(Nak { reason: NakReason::Loop, detail: "crossed".into() }), now);
        assert!(asks(&out).is_empty(), "not at once: {out:?}");
        let at = e.poll_timeout().expect("a pause");
        assert_eq!(at, now + crate::join::CROSSING_PAUSE);
        let out = e.tick(at, |_| None);
        assert_eq!(asks(&out).iter().map(|a| a.1).collect::<Vec<_>>(), ["o2"]);
    }

    #[test]
    fn a_request_that_finds_no_way_at_start_waits_for_the_routes() {
        let now = Instant::now();
        let routes = crate::testing::table("o3", &["o2", "o4"]);
        let mut e = Engine::new(routes, [], config(), now);
        assert!(e.request("test", Requester::Local, vec![], 1, now).is_empty(), "held, not refused");
        let retry = e.poll_timeout().expect("a retry");
        assert!(e.tick(retry, |_| None).is_empty(), "still no way");
        let later = e.poll_timeout().expect("another retry");
        e.routes.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 10_000), later, 0);
        let out = e.tick(later, |_| None);
        let ask = asks(&out);
        assert_eq!(ask.iter().map(|a| a.1).collect::<Vec<_>>(), ["o2"], "{out:?}");
        e.answered(ask[0].0, Err(Nak { reason: NakReason::Timeout, detail: "late".into() }), later);
        // Long after start, a stream nobody offers is refused at once, and
        // one whose servers cannot be reached within a few intervals.
        let late = now + Duration::from_secs(60);
        let out = e.request("other", Requester::Local, vec![], 2, late);
        assert!(matches!(&out[..], [Effect::Note(_), Effect::Answer { ticket: 2, result: Err(_) }]), "{out:?}");
        e.routes.neighbour_down("o2");
        assert!(e.request("test", Requester::Neighbour("o4".into()), vec!["o4".into()], 3, late).is_empty());
        let end = late + e.config().probe_interval * 4;
        let mut refused = false;
        while let Some(t) = e.poll_timeout().filter(|t| *t <= end) {
            refused |= e.tick(t, |_| None).iter().any(|x| matches!(x, Effect::Answer { ticket: 3, result: Err(_) }));
        }
        assert!(refused, "a stream with no way is refused in the end");
    }

    #[test]
    fn a_lost_upstream_is_repaired_through_another_neighbour_and_the_downstream_told() {
        let now = Instant::now();
        let mut e = carrying(now);
        e.routes.neighbour_down("o2");
        let out = e.neighbour_lost("o2", false, now);
        assert!(has(&out, &Effect::RepairStarted { stream: "test".into() }));
        let ask = asks(&out);
        assert_eq!(ask.iter().map(|a| a.1).collect::<Vec<_>>(), ["o9"], "never o4, its downstream: {out:?}");
        let later = now + Duration::from_millis(40);
        let out = e.answered(ask[0].0, Ok(desc(&["s1", "o8", "o9"])), later);
        let Some(Effect::Repaired { upstream, took, .. }) = out.iter().find(|x| matches!(x, Effect::Repaired { .. }))
        else {
            panic!("repaired: {out:?}")
        };
        assert_eq!((upstream.as_str(), *took), ("o9", Duration::from_millis(40)));
        let mine = desc(&["s1", "o8", "o9", "o3"]);
        assert!(has(&out, &Effect::Reroot { to: "o4".into(), desc: mine }), "{out:?}");
        assert!(e.repairing().next().is_none());
        // o4 keeps its place: only a certain loss prunes at once.
        assert!(e.trees.branch("test").unwrap().downstream.contains("o4"));
    }

    #[test]
    fn a_branch_looking_for_its_own_way_refuses_a_request_at_once() {
        let now = Instant::now();
        let mut e = carrying(now);
        e.routes.neighbour_down("o2");
        e.routes.neighbour_down("o9");
        let out = e.neighbour_lost("o2", false, now);
        assert!(has(&out, &Effect::RepairStarted { stream: "test".into() }), "{out:?}");
        // A new neighbour asks: no hold (it would spend the asker's join
        // time on a branch that has no way either), a refusal now.
        let later = now + Duration::from_millis(10);
        let out = e.request("test", Requester::Neighbour("o5".into()), vec!["o5".into()], 9, later);
        let refused = out
            .iter()
            .any(|x| matches!(x, Effect::Answer { ticket: 9, result: Err(nak) } if nak.reason == NakReason::NoRoute));
        assert!(refused, "{out:?}");
    }

    #[test]
    fn a_repair_walled_in_by_its_downstreams_hands_them_the_search() {
        let now = Instant::now();
        let mut e = carrying(now);
        e.routes.neighbour_down("o2");
        e.routes.neighbour_down("o9");
        let out = e.neighbour_lost("o2", false, now);
        assert!(asks(&out).is_empty());
        assert!(has(&out, &Effect::Reroot { to: "o4".into(), desc: gave_up("test") }), "{out:?}");
        assert_eq!(e.poll_timeout(), Some(now + e.config().retry), "the next round after a heartbeat");
    }

    #[test]
    fn a_downstream_that_stays_down_past_its_grace_is_pruned_upstream() {
        let now = Instant::now();
        let mut e = carrying(now);
        e.routes.neighbour_down("o4");
        let out = e.neighbour_lost("o4", false, now);
        assert!(!out.iter().any(|x| matches!(x, Effect::Leave { .. })), "not yet: {out:?}");
        let at = now + e.config().downstream_grace;
        let before = e.tick(at - Duration::from_millis(1), |_| None);
        assert!(!before.iter().any(|x| matches!(x, Effect::Leave { .. })), "not before: {before:?}");
        let out = e.tick(at, |_| None);
        assert!(has(&out, &Effect::Leave { to: "o2".into(), stream: "test".into() }), "{out:?}");
        assert!(has(&out, &Effect::Reroot { to: "o4".into(), desc: gave_up("test") }));
        // One that came back in time keeps its branch.
        let mut e = carrying(now);
        e.neighbour_lost("o4", false, now);
        e.link_measured("o4", 2_000, ["test".to_string()]);
        assert!(e.tick(now + e.config().downstream_grace, |_| None).is_empty());
        assert!(e.trees.branch("test").is_some());
    }

    #[test]
    fn the_last_leave_prunes_upstream_and_an_upstream_that_gives_up_starts_a_repair() {
        let now = Instant::now();
        let mut e = carrying(now);
        let out = e.rerooted("test", "o2", "", &[], 0, now);
        assert_eq!(asks(&out).iter().map(|a| a.1).collect::<Vec<_>>(), ["o9"], "o2 avoided: {out:?}");
        let out = e.leave("test", Requester::Neighbour("o4".into()));
        assert!(has(&out, &Effect::Leave { to: "o2".into(), stream: "test".into() }), "{out:?}");
        // The repair's answer comes after the branch is gone: undone.
        let out = e.answered(2, Ok(desc(&["s1", "o8", "o9"])), now);
        assert_eq!(out, [Effect::Leave { to: "o9".into(), stream: "test".into() }]);
    }

    #[test]
    fn a_server_roots_the_tree_and_stops_its_source_when_the_last_leaves() {
        let now = Instant::now();
        let routes = RouteTable::new("s1", vec!["o2".into()], RoutingConfig::default());
        let mut e = Engine::new(routes, ["test".to_string()], config(), now);
        let out = e.request("test", Requester::Neighbour("o2".into()), vec!["o2".into()], 3, now);
        assert_eq!(out, [Effect::StartLocal { stream: "test".into() }]);
        let mut root = desc(&[]);
        root.depth = 0;
        let out = e.local_started("test", Ok(root));
        assert!(
            matches!(&out[..], [Effect::Note(_), Effect::Answer { ticket: 3, result: Ok(d) }, Effect::Republish] if d.route == ["s1"]),
            "{out:?}"
        );
        let out = e.leave("test", Requester::Neighbour("o2".into()));
        assert!(has(&out, &Effect::StopLocal { stream: "test".into() }));
    }

    #[test]
    fn the_delay_along_the_tree_counts_each_link_as_its_lower_end_measures_it() {
        let now = Instant::now();
        let mut routes = RouteTable::new("o3", ["o2", "o4", "o9"].map(String::from).to_vec(), RoutingConfig::default());
        routes.on_link_rtt("o2", 4_000);
        routes.on_link_rtt("o9", 0);
        routes.on_probe(&probe("s1", 1, "o2", &["s1", "o2"], 10_000), now, 0);
        routes.on_probe(&probe("s1", 1, "o9", &["s1", "o8", "o9"], 40_000), now, 0);
        let mut e = Engine::new(routes, [], config(), now);
        let out = e.request("test", Requester::Neighbour("o4".into()), vec!["o4".into()], 7, now);
        let (id, _, _) = asks(&out)[0];
        e.answered(id, Ok(StreamDesc { delay_us: 9_000, ..desc(&["s1", "o2"]) }), now);
        assert_eq!(e.trees.branch("test").unwrap().desc.delay_us, 11_000, "o2's 9 ms and half the round trip to it");
        // o2 moved: its downstreams hear its new delay, plus their link.
        let route: Vec<String> = ["s1", "o1", "o2"].iter().map(|s| s.to_string()).collect();
        let out = e.rerooted("test", "o2", "s1", &route, 30_000, now);
        let mine = StreamDesc { delay_us: 32_000, ..desc(&["s1", "o1", "o2", "o3"]) };
        assert_eq!(out, [Effect::Reroot { to: "o4".into(), desc: mine }]);
    }

    #[test]
    fn two_nodes_asking_each_other_refuse_each_other() {
        let now = Instant::now();
        let mut e = carrying(now);
        e.routes.neighbour_down("o2");
        let out = e.neighbour_lost("o2", false, now);
        assert_eq!(asks(&out)[0].1, "o9");
        // o9 asks o3 for the same stream while o3's request to it waits.
        let out = e.request("test", Requester::Neighbour("o9".into()), vec!["o9".into()], 11, now);
        assert!(
            matches!(
                &out[..],
                [Effect::Note(_), Effect::Answer { ticket: 11, result: Err(Nak { reason: NakReason::Loop, .. }) }]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn a_repair_answer_after_the_upstream_found_its_way_again_is_undone() {
        let now = Instant::now();
        let mut e = carrying(now);
        let out = e.rerooted("test", "o2", "", &[], 0, now);
        let (id, to, _) = asks(&out)[0];
        assert_eq!(to, "o9");
        // o2 is fed again and says so before o9 answers.
        let route: Vec<String> = ["s1", "o1", "o2"].iter().map(|s| s.to_string()).collect();
        e.rerooted("test", "o2", "s1", &route, 0, now);
        let out = e.answered(id, Ok(desc(&["s1", "o8", "o9"])), now);
        assert_eq!(out, [Effect::Leave { to: "o9".into(), stream: "test".into() }]);
        assert_eq!(e.trees.branch("test").unwrap().source, Source::Neighbour("o2".into()), "still fed by o2");
    }

    #[test]
    fn an_upstream_route_through_this_node_or_its_downstream_is_a_loop() {
        let now = Instant::now();
        // The upstream's new route passes through this node: repair.
        let mut e = carrying(now);
        let route: Vec<String> = ["s1", "o4", "o3", "o2"].iter().map(|s| s.to_string()).collect();
        let out = e.rerooted("test", "o2", "s1", &route, 0, now);
        assert_eq!(asks(&out).iter().map(|a| a.1).collect::<Vec<_>>(), ["o9"], "{out:?}");
        // An answer whose route runs through o4, this branch's downstream,
        // is not taken.
        let (id, _, _) = asks(&out)[0];
        let out = e.answered(id, Ok(desc(&["s1", "o4", "o9"])), now);
        assert!(has(&out, &Effect::Leave { to: "o9".into(), stream: "test".into() }), "{out:?}");
        assert!(e.trees.branch("test").unwrap().repairing);
    }

    #[test]
    fn a_prune_sent_while_the_neighbour_was_down_goes_again_when_it_is_back() {
        let now = Instant::now();
        let mut e = carrying(now);
        // o2's link dies; the repair goes through o9; the prune to o2 is
        // lost with the link.
        let out = e.neighbour_lost("o2", false, now);
        // The overlay hears the link died.
        let notices = link_notices(&out);
        assert!(!notices.is_empty() && notices.iter().all(|n| n.a == "o3" && n.b == "o2" && !n.up), "{out:?}");
        let (id, _, _) = asks(&out)[0];
        e.answered(id, Ok(desc(&["s1", "o8", "o9"])), now);
        let out = e.link_measured("o2", 2_000, []);
        assert!(has(&out, &Effect::Leave { to: "o2".into(), stream: "test".into() }), "{out:?}");
        assert!(out.iter().any(|x| matches!(x, Effect::Notice { notice, .. } if notice.up)), "it is back: {out:?}");
        assert!(e.link_measured("o2", 2_000, []).is_empty(), "once");
    }

    #[test]
    fn a_stale_repair_answer_from_the_upstream_itself_does_not_prune_it() {
        let now = Instant::now();
        let mut e = carrying(now);
        // o2 gave up, came back at once; o3 asked o2 itself (o9 refused).
        let out = e.rerooted("test", "o2", "", &[], 0, now);
        let (id, _, _) = asks(&out)[0];
        let out = e.answered(id, Err(Nak { reason: NakReason::NoRoute, detail: "no".into() }), now);
        let later = e.poll_timeout().unwrap_or(now);
        let out = if asks(&out).is_empty() { e.tick(later, |_| None) } else { out };
        let route: Vec<String> = ["s1", "o1", "o2"].iter().map(|s| s.to_string()).collect();
        // o2's reroot (it is fed again) comes before its answer.
        e.rerooted("test", "o2", "s1", &route, 0, later);
        for (id, to, _) in asks(&out) {
            let answer = e.answered(id, Ok(desc(&["s1", "o1", to])), later);
            assert!(!has(&answer, &Effect::Leave { to: "o2".into(), stream: "test".into() }), "{answer:?}");
        }
        assert_eq!(e.trees.branch("test").unwrap().source, Source::Neighbour("o2".into()));
    }

    #[test]
    fn a_downstream_that_says_it_no_longer_carries_the_stream_is_pruned() {
        let now = Instant::now();
        let mut e = carrying(now);
        // o4 answers heartbeats carrying test: kept.
        e.routes.set_carrying("o4", ["test".to_string()]);
        let t = now + Duration::from_secs(2);
        assert!(e.tick(t, |_| None).iter().all(|x| !matches!(x, Effect::Leave { .. })));
        // o4 restarted: its answers carry nothing. A moment is not enough
        // (it may be joining); a second is.
        e.routes.set_carrying("o4", []);
        let out = e.tick(t + Duration::from_millis(600), |_| None);
        assert!(out.iter().all(|x| !matches!(x, Effect::Leave { .. })), "{out:?}");
        let out = e.tick(t + Duration::from_millis(1700), |_| None);
        assert!(has(&out, &Effect::Leave { to: "o2".into(), stream: "test".into() }), "{out:?}");
        assert!(e.trees.branch("test").is_none());
    }

    #[test]
    fn a_repair_tells_the_subtree_which_feeds_no_new_neighbour_until_the_new_route() {
        let now = Instant::now();
        let mut e = carrying(now);
        let out = e.neighbour_lost("o2", false, now);
        assert!(has(&out, &Effect::Repairing { to: "o4".into(), stream: "test".into() }), "{out:?}");
        // Still repairing a second later (o9 has not answered): told again,
        // so that o4's hold does not run out first.
        assert!(e.poll_timeout().is_some_and(|t| t <= now + REPAIRING_RETOLD));
        let out = e.tick(now + REPAIRING_RETOLD, |_| None);
        assert!(has(&out, &Effect::Repairing { to: "o4".into(), stream: "test".into() }), "{out:?}");
        // o4's side: its upstream o3 says so; o4 passes it on to its own
        // downstream, once.
        let mut routes = crate::testing::table("o4", &["o3", "o5", "o6"]);
        routes.on_probe(&probe("s1", 1, "o3", &["s1", "o2", "o3"], 10_000), now, 0);
        let mut o4 = Engine::new(routes, [], config(), now);
        let out = o4.request("test", Requester::Neighbour("o5".into()), vec!["o5".into()], 1, now);
        let (id, _, _) = asks(&out)[0];
        o4.answered(id, Ok(desc(&["s1", "o2", "o3"])), now);
        let out = o4.upstream_repairing("test", "o3", now);
        assert!(has(&out, &Effect::Repairing { to: "o5".into(), stream: "test".into() }), "{out:?}");
        assert!(o4.upstream_repairing("test", "o3", now).is_empty(), "once");
        // A neighbour asking now is refused at once, as a way that may
        // loop: it tries its next way without a pause.
        let out = o4.request("test", Requester::Neighbour("o6".into()), vec!["o6".into()], 2, now);
        assert!(
            out.iter()
                .any(|x| matches!(x, Effect::Answer { ticket: 2, result: Err(Nak { reason: NakReason::Loop, .. }) })),
            "{out:?}"
        );
        // The new route comes down: o6 is fed with it.
        let route: Vec<String> = ["s1", "o1", "o3"].iter().map(|s| s.to_string()).collect();
        let later = now + Duration::from_millis(30);
        o4.rerooted("test", "o3", "s1", &route, 0, later);
        let out = o4.request("test", Requester::Neighbour("o6".into()), vec!["o6".into()], 3, later);
        let fresh = desc(&["s1", "o1", "o3", "o4"]);
        assert!(has(&out, &Effect::Answer { ticket: 3, result: Ok(fresh) }), "{out:?}");
    }

    #[test]
    fn a_give_up_that_overtakes_the_answer_to_a_repair_undoes_it() {
        let now = Instant::now();
        let mut e = carrying(now);
        let out = e.neighbour_lost("o2", false, now);
        let (id, to, _) = asks(&out)[0];
        assert_eq!(to, "o9");
        // o9 attached this node, then lost its own way and gave up; the
        // give-up comes first.
        assert!(e.rerooted("test", "o9", "", &[], 0, now).iter().all(|x| !matches!(x, Effect::Ask { .. })));
        let out = e.answered(id, Ok(desc(&["s1", "o8", "o9"])), now);
        assert!(has(&out, &Effect::Leave { to: "o9".into(), stream: "test".into() }), "{out:?}");
        assert!(e.trees.branch("test").unwrap().repairing, "still looking");
    }

    #[test]
    fn after_an_upstream_gives_up_an_answer_routed_through_it_is_refused() {
        let now = Instant::now();
        let mut e = carrying(now);
        // o2 gives up; o9's answer still runs through o2 (o9 is fed by a
        // sibling branch under o2 and has not heard yet).
        let out = e.rerooted("test", "o2", "", &[], 0, now);
        let (id, to, _) = asks(&out)[0];
        assert_eq!(to, "o9");
        let out = e.answered(id, Ok(desc(&["s1", "o2", "o7", "o9"])), now);
        assert!(has(&out, &Effect::Leave { to: "o9".into(), stream: "test".into() }), "{out:?}");
        assert_eq!(e.trees.branch("test").unwrap().source, Source::Neighbour("o2".into()), "not taken");
        assert!(e.trees.branch("test").unwrap().repairing);
    }

    fn beats(out: &[Effect]) -> Vec<(String, u64)> {
        out.iter()
            .filter_map(|x| if let Effect::Beat { to, seq } = x { Some((to.clone(), *seq)) } else { None })
            .collect()
    }

    fn link_notices(out: &[Effect]) -> Vec<&LinkNotice> {
        out.iter().filter_map(|x| if let Effect::Notice { notice, .. } = x { Some(notice) } else { None }).collect()
    }

    #[test]
    fn a_neighbour_that_misses_three_beats_in_a_row_is_lost_and_comes_back_when_it_answers() {
        let now = Instant::now();
        let routes = crate::testing::table("o3", &["o2", "o4"]);
        let cfg = EngineConfig { heartbeat: Some(Duration::from_millis(100)), ..config() };
        let mut e = Engine::new(routes, [], cfg, now).numbering_from(500);
        let mut lost_at = None;
        let mut t = now;
        // o4 answers every beat after 4 ms, o2 none.
        while t < now + Duration::from_secs(1) {
            let out = e.tick(t, |_| None);
            if link_notices(&out).iter().any(|n| n.b == "o2" && !n.up) {
                lost_at.get_or_insert(t);
            }
            for (to, seq) in beats(&out) {
                if to == "o4" {
                    let answered = e.heartbeat_answered("o4", seq, ["test".to_string()], t + Duration::from_millis(4));
                    assert!(answered.is_some_and(|x| x.is_empty()), "o4 is up: nothing to do");
                }
            }
            t = e.poll_timeout().expect("beats go on");
        }
        let lost_at = lost_at.expect("o2 declared lost, and the overlay told");
        // Beats at 0, 100 and 200 ms, each given 250 ms.
        assert_eq!(lost_at.duration_since(now), Duration::from_millis(450));
        assert!(e.routes.is_down("o2") && !e.routes.is_down("o4"));
        assert_eq!(e.routes.link_delay_us("o4"), Some(2_000), "half the round trip, as the answers measured it");
        assert_eq!(e.routes.carries("o4", "test"), Some(true));
        let totals = e.beat_totals("o2");
        assert!(totals.missed >= 7 && totals.missed < totals.sent, "{totals:?}");
        // An answer to no beat of ours is refused; one to a beat still out
        // brings o2 back.
        assert!(e.heartbeat_answered("o2", 7, [], t).is_none());
        let out = e.tick(t, |_| None);
        let (_, seq) = beats(&out).into_iter().find(|(to, _)| to == "o2").expect("o2 is still beaten");
        let back = e.heartbeat_answered("o2", seq, [], t + Duration::from_millis(10)).expect("ours");
        assert!(link_notices(&back).iter().any(|n| n.b == "o2" && n.up), "{back:?}");
        assert!(!e.routes.is_down("o2"));
    }

    #[test]
    fn a_neighbour_reported_failed_is_asked_once_more_and_believed_only_if_silent() {
        let now = Instant::now();
        let mut e = o3(now);
        // It answers: kept, its routes too.
        let out = e.node_failed("o2", now);
        let [(to, seq)] = &beats(&out)[..] else { panic!("one check: {out:?}") };
        let (to, seq) = (to.clone(), *seq);
        assert_eq!((to.as_str(), out.len()), ("o2", 1), "nothing else before the answer");
        let out = e.heartbeat_answered("o2", seq, [], now + Duration::from_millis(20)).unwrap();
        assert!(out.iter().any(|x| matches!(x, Effect::Note(n) if n.what.contains("kept"))), "{out:?}");
        assert_eq!(e.routes.best_next_hop("s1", now, &[]).map(|r| r.via), Some("o2".to_string()));
        // Silent: believed once the check's time is up.
        let out = e.node_failed("o2", now);
        assert_eq!(beats(&out).len(), 1);
        let late = e.poll_timeout().unwrap();
        assert!(late > now && late <= now + Duration::from_millis(250));
        e.tick(late, |_| None);
        assert!(e.routes.is_down("o2"));
        assert_eq!(e.routes.best_next_hop("s1", late, &[]).map(|r| r.via), Some("o9".to_string()));
        // A node that is no neighbour is believed at once.
        assert!(beats(&e.node_failed("o8", late)).is_empty());
        assert_eq!(e.routes.best_next_hop("s1", late, &[]), None, "o9's way ran through o8");
    }

    #[test]
    fn a_driver_check_ends_answered_or_not() {
        let now = Instant::now();
        let mut e = o3(now);
        let limit = Duration::from_millis(100);
        let (seq, beat) = e.check("o9", limit, now).unwrap();
        assert_eq!(beat, Effect::Beat { to: "o9".into(), seq });
        let out = e.heartbeat_answered("o9", seq, [], now + Duration::from_millis(5)).unwrap();
        assert!(has(&out, &Effect::Checked { seq, answered: true }), "{out:?}");
        let (seq, _) = e.check("o9", limit, now).unwrap();
        let out = e.tick(now + limit, |_| None);
        assert!(has(&out, &Effect::Checked { seq, answered: false }), "{out:?}");
        assert!(!e.routes.is_down("o9"), "one unanswered check loses nobody");
    }
}
