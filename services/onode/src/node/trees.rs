//! The stream trees through this node, carried out: the engine (see
//! overlay-core's engine.rs) decides joins, leaves, repairs, moves and
//! reroots; this file hands it the inputs and carries out its effects
//! (stream requests, prunes and reroot notices over gRPC, GOP refreshes,
//! answers to the requests waiting, the forwarding table).

use super::*;

impl Node {
    /// Runs `f` on the node's state (the engine in it) under the lock,
    /// applies the effects on the state there, and carries out the others
    /// (sends, tasks) once the lock is released.
    pub(super) fn drive(self: &Arc<Self>, f: impl FnOnce(&mut State) -> Vec<Effect>) {
        let io = {
            let mut st = self.lock();
            let effects = f(&mut st);
            self.apply(&mut st, effects)
        };
        self.carry_out(io);
        // The engine's next deadline may have moved.
        self.wake.notify_one();
    }

    /// The effects on the node's own state: answers to waiting requests,
    /// the start of a repair's gap, the forwarding table (once). The
    /// others are returned.
    fn apply(&self, st: &mut State, effects: Vec<Effect>) -> Vec<Effect> {
        let mut republish = false;
        let mut io = Vec::new();
        for e in effects {
            match e {
                Effect::Republish => republish = true,
                Effect::Answer { ticket, result } => {
                    if let Some(tx) = st.waiters.remove(&ticket) {
                        let _ = tx.send(result);
                    }
                }
                Effect::Checked { seq, answered } => {
                    if let Some(tx) = st.checks.remove(&seq) {
                        let _ = tx.send(answered);
                    }
                }
                Effect::RepairStarted { stream } => {
                    let last = st.heard.get(&stream).and_then(|(_, h)| h.silent_ms());
                    st.repair_from.insert(stream, last.map(|ms| relay::clock_ms().saturating_sub(ms)));
                }
                Effect::StopLocal { stream } => {
                    let pipeline = st.pipelines.remove(&stream);
                    let what = if pipeline.is_some() { "pipeline stopped" } else { "the publisher's ingest goes on" };
                    info!(node = %self.id.name, %stream, "last branch pruned: {what}");
                    if let Some(p) = pipeline {
                        self.tasks.spawn_blocking(move || p.stop());
                    }
                }
                other => io.push(other),
            }
        }
        if republish {
            self.republish(st);
        }
        io
    }

    /// Carries out the effects that send or wait.
    fn carry_out(self: &Arc<Self>, effects: Vec<Effect>) {
        let mut notices = Vec::new();
        for e in effects {
            match e {
                Effect::Probe { to, probe } => self.links.send_probe(&to, convert::probe_to_wire(probe)),
                Effect::Notice { to, notice } => notices.push((to, notice)),
                Effect::Ask { id, to, stream, path, timeout } => {
                    let me = self.clone();
                    let span = tracing::Span::current();
                    self.tasks.spawn(
                        async move {
                            let result = me.request_upstream(&stream, &to, path, timeout).await;
                            me.drive(|st| {
                                let result = result.map(|(desc, addr)| {
                                    st.upstream_ports.insert(to.clone(), addr.port());
                                    desc
                                });
                                st.engine.answered(id, result, Instant::now())
                            });
                        }
                        .instrument(span),
                    );
                }
                Effect::Refresh { from, stream, tickets, desc } => {
                    let me = self.clone();
                    self.tasks.spawn(async move { me.refresh_then_answer(stream, from, tickets, desc).await });
                }
                Effect::Leave { to, stream } => {
                    let me = self.clone();
                    self.tasks.spawn(async move { me.send_leave(stream, to).await });
                }
                Effect::Reroot { to, desc } => {
                    let me = self.clone();
                    self.tasks.spawn(async move { me.send_reroot(to, desc, false).await });
                }
                Effect::Repairing { to, stream } => {
                    let me = self.clone();
                    self.tasks
                        .spawn(async move { me.send_reroot(to, overlay_core::engine::gave_up(&stream), true).await });
                }
                Effect::StartLocal { stream } => self.serve_local(&stream),
                Effect::Beat { to, seq } => self.links.send_beat(&to, seq),
                Effect::Repaired { stream, upstream, server, took } => {
                    info!(
                        node = %self.id.name, %stream, %upstream, %server,
                        took_ms = took.as_millis() as u64, "tree repaired"
                    );
                    let last_packet_ms = self.lock().repair_from.remove(&stream).flatten();
                    let me = self.clone();
                    self.tasks.spawn(async move { me.measure_repair(stream, last_packet_ms).await });
                }
                // A note about the node's links names no stream.
                Effect::Note(n) if n.stream.is_empty() => match n.level {
                    Level::Warn => warn!(node = %self.id.name, "{}", n.what),
                    Level::Info => info!(node = %self.id.name, "{}", n.what),
                    Level::Debug => debug!(node = %self.id.name, "{}", n.what),
                },
                Effect::Note(n) => match n.level {
                    Level::Warn => warn!(node = %self.id.name, stream = %n.stream, "{}", n.what),
                    Level::Info => info!(node = %self.id.name, stream = %n.stream, "{}", n.what),
                    Level::Debug => debug!(node = %self.id.name, stream = %n.stream, "{}", n.what),
                },
                Effect::Republish
                | Effect::Answer { .. }
                | Effect::Checked { .. }
                | Effect::RepairStarted { .. }
                | Effect::StopLocal { .. } => {
                    unreachable!("applied under the lock")
                }
            }
        }
        self.send_link_notices(notices);
    }

    /// Asks `neighbour` once whether it is there: true if it answers
    /// within `timeout` (the engine sends the beat and judges the answer).
    pub(super) async fn check(self: &Arc<Self>, neighbour: &str, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        self.drive(|st| match st.engine.check(neighbour, timeout, Instant::now()) {
            Some((seq, beat)) => {
                st.checks.insert(seq, tx.take().expect("once"));
                vec![beat]
            }
            None => Vec::new(),
        });
        if tx.is_some() {
            return false;
        }
        // The engine ends the check at its timeout; the margin covers a
        // late wake-up of its timer.
        matches!(tokio::time::timeout(timeout + Duration::from_millis(500), rx).await, Ok(Ok(true)))
    }

    /// The engine's timers: retries of requests waiting for routes, repair
    /// rounds, crossed joins, downstream graces, moves and the quiet
    /// streams' checks.
    pub(super) async fn engine_loop(self: Arc<Self>) {
        loop {
            let next = self.lock().engine.poll_timeout();
            let wait = match next {
                Some(at) => tokio::time::sleep_until(at.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.wake.notified() => continue,
                _ = wait => {}
            }
            self.drive(|st| {
                let heard = &st.heard;
                st.engine.tick(Instant::now(), |s| heard.get(s).and_then(|(_, h)| h.silent_ms()))
            });
        }
    }

    /// Asks `from` for the last GOP of `stream`; once it is here (or after
    /// a short wait), answers the viewers `tickets` with `desc`. A viewer
    /// answered before the GOP came could PLAY first and get live packets
    /// from mid-GOP; the GOP coming after them would be too old for its
    /// jitter buffer, and it would wait for the next keyframe.
    async fn refresh_then_answer(self: Arc<Self>, stream: String, from: String, tickets: Vec<u64>, desc: StreamDesc) {
        if tickets.is_empty() {
            self.request_refresh(stream, from).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + VIEWER_REFRESH_WAIT;
        let video = desc.ssrcs.first().copied();
        let mut refresh = Box::pin(self.clone().request_refresh(stream, from));
        let sent = tokio::time::timeout_at(deadline, refresh.as_mut()).await;
        let done = sent.is_ok();
        // The upstream has sent its GOP when it answers; the packets are
        // ours once our relay has taken them in.
        if let (Ok(Some(packets)), Some(video)) = (sent, video) {
            while self.relay.gop_len(video) < packets && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.drive(|_| tickets.into_iter().map(|ticket| Effect::Answer { ticket, result: Ok(desc.clone()) }).collect());
        if !done {
            refresh.await;
        }
    }

    /// The upstream's route to the root changed (with the upstream's delay
    /// along the tree), or it gave up (an empty route).
    pub fn rerooted(self: &Arc<Self>, stream: &str, from: &str, server: &str, route: &[String], delay_us: u64) {
        self.drive(|st| st.engine.rerooted(stream, from, server, route, delay_us, Instant::now()));
    }

    /// The upstream `from` of `stream` says it looks for a new way to the
    /// root.
    pub fn upstream_repairing(self: &Arc<Self>, stream: &str, from: &str) {
        self.drive(|st| st.engine.upstream_repairing(stream, from, Instant::now()));
    }

    /// Streams this node carries, for heartbeat answers.
    pub fn carrying(&self) -> Vec<String> {
        self.lock().engine.trees.carrying()
    }

    /// Joins `stream` on behalf of `requester` (a neighbour or a local
    /// viewer); resolves when the requester is attached or refused.
    pub async fn join(
        self: &Arc<Self>,
        stream: &str,
        requester: Requester,
        path: Vec<String>,
        data_port: u16,
    ) -> JoinResult {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.drive(|st| {
            if let Requester::Neighbour(n) = &requester {
                st.data_ports.insert(n.clone(), data_port);
            }
            st.waiters.insert(ticket, tx);
            st.engine.request(stream, requester, path, ticket, Instant::now())
        });
        // A request that finds no way waits up to four probe intervals for
        // routes, then its join has the join timeout.
        let timeout = self.settings.join_timeout + self.id.probe_interval * 4 + Duration::from_millis(500);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            _ => {
                self.lock().waiters.remove(&ticket);
                Err(Nak {
                    reason: NakReason::Timeout,
                    detail: format!("node {}: stream {stream:?}: join did not complete in {timeout:?}", self.id.name),
                })
            }
        }
    }

    /// `requester` leaves `stream`; prunes upstream or stops the pipeline
    /// when it was the last.
    pub fn leave(self: &Arc<Self>, stream: &str, requester: Requester) {
        self.drive(|st| st.engine.leave(stream, requester));
    }

    /// Counts a repair of `stream` and, once the first packet comes through
    /// the new upstream (within 10 s), its gap: from `last_packet_ms` (the
    /// last one before, on [`relay::clock_ms`]) to that first one.
    pub(super) async fn measure_repair(self: Arc<Self>, stream: String, last_packet_ms: Option<u64>) {
        let heard = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.repairs.len() > KEPT_STREAMS {
                st.repairs.retain(|s, _| st.engine.trees.branch(s).is_some());
            }
            let repairs = st.repairs.entry(stream.clone()).or_default();
            repairs.count += 1;
            repairs.last_gap = None;
            st.heard.get(&stream).map(|(_, h)| h.clone())
        };
        self.changes.send_modify(|v| *v += 1);
        let (Some(heard), Some(before)) = (heard, last_packet_ms) else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tick = self.ticker(Duration::from_millis(10));
        while tick.next().await && Instant::now() < deadline {
            // The marker holds the latest packet: read at the first tick
            // after the first packet, it is that packet to within a tick.
            if let Some(silent) = heard.silent_ms() {
                let first = relay::clock_ms().saturating_sub(silent);
                let gap = Duration::from_millis(first.saturating_sub(before));
                info!(node = %self.id.name, %stream, gap_ms = gap.as_millis() as u64, "media flows again after the repair");
                if let Some(r) = self.lock().repairs.get_mut(&stream) {
                    r.last_gap = Some(gap);
                }
                return;
            }
        }
    }

    /// Sends downstream `to` the branch's new route (`desc`), or the news
    /// that this branch gave up (an empty route) or is `repairing`.
    pub(super) async fn send_reroot(self: Arc<Self>, to: String, desc: StreamDesc, repairing: bool) {
        let Some(mut client) = self.clients.get(&to).cloned() else { return };
        let request = pb::RerootRequest {
            stream: desc.stream,
            sender: self.id.name.clone(),
            route: desc.route,
            server: desc.server,
            delay_us: desc.delay_us,
            repairing,
        };
        match tokio::time::timeout(Duration::from_secs(2), client.reroot(request)).await {
            Ok(Ok(_)) => {}
            // A refusal is a bug or a misconfiguration, never the network:
            // say so, or the downstream waits for a notice that never comes.
            Ok(Err(status)) if status.code() != tonic::Code::Unavailable => {
                warn!(node = %self.id.name, downstream = %to, "reroot notice refused: {}", status.message())
            }
            Ok(Err(status)) => {
                debug!(node = %self.id.name, downstream = %to, "reroot notice not delivered: {}", status.message())
            }
            Err(_) => debug!(node = %self.id.name, downstream = %to, "reroot notice timed out"),
        }
    }

    pub(super) async fn request_upstream(
        self: &Arc<Self>,
        stream: &str,
        to: &str,
        path: Vec<String>,
        timeout: Duration,
    ) -> Result<(StreamDesc, SocketAddr), Nak> {
        let nak =
            |reason, why: String| Nak { reason, detail: format!("node {}: stream {stream:?}: {why}", self.id.name) };
        let (Some(mut client), Some(neighbour)) = (self.clients.get(to).cloned(), self.neighbour(to)) else {
            return Err(nak(NakReason::NoRoute, format!("{to} is not a neighbour")));
        };
        let mut request = tonic::Request::new(pb::JoinRequest {
            stream: stream.to_string(),
            sender: self.id.name.clone(),
            path,
            data_port: u32::from(self.settings.data_port),
        });
        telemetry::inject(request.metadata_mut());
        request.set_timeout(timeout);
        let answer = client.join(request);
        tokio::pin!(answer);
        // An upstream that is wedged (stopped, or its control plane stuck)
        // would hold the request for the whole timeout, and every node
        // below with it: while no answer comes, it is pinged, and two pings
        // in a row without an answer end the wait.
        let mut unanswered = 0;
        let reply = loop {
            if unanswered == 0 {
                tokio::select! {
                    r = &mut answer => break r,
                    _ = tokio::time::sleep(JOIN_WATCH) => {}
                }
            }
            let limit = silence::ping_limit(&self.lock().engine.routes, to) * 2;
            tokio::select! {
                r = &mut answer => break r,
                alive = self.check(to, limit) => unanswered = if alive { 0 } else { unanswered + 1 },
            }
            if unanswered == 2 {
                return Err(nak(
                    NakReason::Timeout,
                    format!("{to} does not answer pings while the stream request waits"),
                ));
            }
        };
        match reply {
            Ok(reply) => match reply.into_inner().result {
                Some(pb::join_reply::Result::Joined(info)) => {
                    let addr = SocketAddr::new(neighbour.address, info.data_port as u16);
                    Ok((convert::desc_from_wire(&info), addr))
                }
                Some(pb::join_reply::Result::Nak(n)) => Err(convert::nak_from_wire(&n)),
                None => Err(nak(NakReason::NoRoute, format!("{to} sent an empty reply"))),
            },
            Err(status)
                if status.code() == tonic::Code::DeadlineExceeded || status.code() == tonic::Code::Cancelled =>
            {
                Err(nak(NakReason::Timeout, format!("{to} did not answer the stream request")))
            }
            Err(status) => {
                Err(nak(NakReason::NoRoute, format!("{to} failed the stream request: {}", status.message())))
            }
        }
    }

    /// Asks the upstream for the stream's last GOP (our table is ready now);
    /// the packets it sent.
    pub(super) async fn request_refresh(self: Arc<Self>, stream: String, up: String) -> Option<usize> {
        let mut client = self.clients.get(&up).cloned()?;
        let request = pb::RefreshRequest { stream: stream.clone(), sender: self.id.name.clone() };
        match tokio::time::timeout(Duration::from_secs(2), client.refresh(request)).await {
            Ok(Ok(r)) => {
                let packets = r.into_inner().packets;
                debug!(node = %self.id.name, %stream, upstream = %up, packets, "GOP refreshed");
                Some(packets as usize)
            }
            _ => {
                debug!(node = %self.id.name, %stream, upstream = %up, "GOP refresh failed");
                None
            }
        }
    }

    /// A downstream asks for the last GOP of `stream`.
    pub fn refresh(&self, stream: &str, sender: &str) -> usize {
        let target = {
            let mut st = self.lock();
            let branch = st.engine.trees.branch(stream);
            let ssrc = branch.filter(|b| b.downstream.contains(sender)).and_then(|b| b.desc.ssrcs.first().copied());
            let addr = self.neighbour(sender).map(|n| n.address);
            match (ssrc, addr) {
                (Some(ssrc), Some(addr)) => {
                    let port = *st.data_ports.get(sender).unwrap_or(&self.settings.data_port);
                    let tally = st.tallies.entry(stream.to_string()).or_default().to(sender);
                    Some((ssrc, SocketAddr::new(addr, port), tally))
                }
                _ => None,
            }
        };
        target.map(|(ssrc, dest, tally)| self.relay.send_gop(ssrc, dest, &tally)).unwrap_or(0)
    }

    pub(super) async fn send_leave(self: &Arc<Self>, stream: String, up: String) {
        let Some(mut client) = self.clients.get(&up).cloned() else {
            return;
        };
        let request = pb::LeaveRequest { stream: stream.clone(), sender: self.id.name.clone() };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), client.leave(request)).await {
            warn!(node = %self.id.name, %stream, upstream = %up, "prune not acknowledged: {e}");
        }
    }
}
