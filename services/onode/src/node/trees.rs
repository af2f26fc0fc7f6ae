//! The stream trees through this node: joins and their forwarding, leaves
//! and prunes, repairs, moves and reroots, GOP refreshes.

use super::*;

impl Node {
    /// Keeps established trees on good routes: a branch whose routes now
    /// offer a clearly better way to its server than its upstream (a link
    /// got slower, a node came back) moves there, make-before-break: the
    /// new upstream is joined first, then the old one left.
    pub(super) async fn improve_loop(self: Arc<Self>) {
        let mut tick = self.ticker((self.id.probe_interval * 2).max(Duration::from_millis(500)));
        while tick.next().await {
            let now = Instant::now();
            let due = {
                let mut st = self.lock();
                let st = &mut *st;
                st.moves.due(&st.trees, &st.routes, now)
            };
            for m in due {
                let me = self.clone();
                self.tasks.spawn(async move { me.move_upstream(m).await });
            }
        }
    }

    pub(super) async fn move_upstream(self: Arc<Self>, m: Move) {
        let started = Instant::now();
        let (desc, data_addr) = match self
            .request_upstream(&m.stream, &m.to, vec![self.id.name.clone()], self.settings.join_timeout)
            .await
        {
            Ok(joined) => joined,
            Err(nak) => {
                debug!(node = %self.id.name, stream = %m.stream, via = %m.to, "move to a better upstream refused: {}", nak.detail);
                return;
            }
        };
        let outcome = {
            let mut st = self.lock();
            // Meanwhile the branch may have been repaired, moved or pruned.
            let out = match moves::accept(&st.trees, &m, &desc.server) {
                moves::Verdict::Take => st.trees.repaired(&m.to, desc),
                moves::Verdict::Stale => None,
                moves::Verdict::OtherRoot { root } => {
                    info!(
                        node = %self.id.name, stream = %m.stream, via = %m.to, root = %root, offered = %desc.server,
                        "move not made: the better upstream feeds the stream from another server"
                    );
                    None
                }
            };
            if out.is_some() {
                st.upstream_data.insert(m.stream.clone(), data_addr);
                st.moves.changed(&m.stream, Instant::now());
                self.republish(&mut st);
            }
            out.and_then(|(down, old)| Some((down, old, st.trees.branch(&m.stream)?.desc.clone())))
        };
        let Move { stream, from, to } = m;
        let Some((downstream, old, desc)) = outcome else {
            let me = self.clone();
            self.tasks.spawn(async move { me.send_leave(stream, to).await });
            return;
        };
        info!(
            node = %self.id.name, %stream, from = %from, upstream = %to,
            took_ms = started.elapsed().as_millis() as u64, "moved to a better upstream"
        );
        if let Some(old) = old {
            let me = self.clone();
            let s2 = stream.clone();
            self.tasks.spawn(async move { me.send_leave(s2, old).await });
        }
        for d in downstream {
            let me = self.clone();
            let desc = desc.clone();
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    /// Finds a new upstream for a repairing branch, through any neighbour
    /// but its own downstreams, retrying until it succeeds or the branch
    /// is gone.
    pub(super) async fn repair(self: Arc<Self>, stream: String, avoid: Vec<String>) {
        let started = Instant::now();
        // When the stream's last packet came, on the clock the data plane
        // marks packets with: the repair's gap is measured from there.
        let last_packet_ms = {
            let st = self.lock();
            st.heard.get(&stream).and_then(|(_, h)| h.silent_ms()).map(|ms| relay::clock_ms().saturating_sub(ms))
        };
        let mut repair = Repair::new(stream.clone(), avoid);
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let step = {
                let st = self.lock();
                repair.next(&st.trees, &st.routes, Instant::now())
            };
            let (to, path) = match step {
                Step::Done => return,
                Step::Wait { orphan } => {
                    debug!(node = %self.id.name, %stream, "no repair target left this round");
                    if orphan {
                        self.orphan(&stream);
                    }
                    tokio::time::sleep(self.settings.heartbeat).await;
                    continue;
                }
                Step::Ask { to, path } => (to, path),
            };
            match self.request_upstream(&stream, &to, path, self.settings.join_timeout).await {
                Ok((desc, data_addr)) => {
                    let outcome = {
                        let mut st = self.lock();
                        let out = st.trees.repaired(&to, desc);
                        if out.is_some() {
                            st.upstream_data.insert(stream.clone(), data_addr);
                            st.moves.changed(&stream, Instant::now());
                            self.republish(&mut st);
                        }
                        out.map(|(down, old)| (down, old, st.trees.branch(&stream).map(|b| b.desc.clone())))
                    };
                    match outcome {
                        Some((downstream, old, Some(desc))) => {
                            if let Some(old) = old {
                                let me = self.clone();
                                let s2 = stream.clone();
                                self.tasks.spawn(async move { me.send_leave(s2, old).await });
                            }
                            info!(
                                node = %self.id.name, %stream, upstream = %to, server = %desc.server,
                                took_ms = started.elapsed().as_millis() as u64, "tree repaired"
                            );
                            let me = self.clone();
                            let s2 = stream.clone();
                            self.tasks.spawn(async move { me.measure_repair(s2, last_packet_ms).await });
                            let me = self.clone();
                            let (s2, t2) = (stream.clone(), to.clone());
                            self.tasks.spawn(async move {
                                me.request_refresh(s2, t2).await;
                            });
                            for d in downstream {
                                let me = self.clone();
                                let desc = desc.clone();
                                self.tasks.spawn(async move { me.send_reroot(d, desc).await });
                            }
                            return;
                        }
                        _ => {
                            // Attached below ourselves, or pruned meanwhile: undo.
                            let me = self.clone();
                            let (s2, t2) = (stream.clone(), to.clone());
                            self.tasks.spawn(async move { me.send_leave(s2, t2).await });
                            repair.undone(&to);
                        }
                    }
                }
                Err(nak) => {
                    debug!(node = %self.id.name, %stream, via = %to, "repair attempt refused: {}", nak.detail);
                    let after = repair.refused(&to, nak.reason);
                    if after.orphan {
                        self.orphan(&stream);
                    }
                    if after.wait {
                        tokio::time::sleep(self.settings.heartbeat).await;
                    }
                }
            }
        }
    }

    /// Counts a repair of `stream` and, once the first packet comes through
    /// the new upstream (within 10 s), its gap: from `last_packet_ms` (the
    /// last one before, on [`relay::clock_ms`]) to that first one.
    pub(super) async fn measure_repair(self: Arc<Self>, stream: String, last_packet_ms: Option<u64>) {
        let heard = {
            let mut guard = self.lock();
            let st = &mut *guard;
            if st.repairs.len() > KEPT_STREAMS {
                st.repairs.retain(|s, _| st.trees.branch(s).is_some());
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

    /// Tells the downstreams of a branch that finds no way to the root to
    /// look for one on their own; those that do leave this node, which may
    /// then repair through them.
    pub(super) fn orphan(self: &Arc<Self>, stream: &str) {
        let downstream = self.lock().trees.orphan(stream);
        if downstream.is_empty() {
            return;
        }
        warn!(node = %self.id.name, stream, ?downstream, "no way to the root: downstreams asked to look on their own");
        for d in downstream {
            let me = self.clone();
            let desc = gave_up(stream);
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    pub(super) async fn send_reroot(self: Arc<Self>, to: String, desc: StreamDesc) {
        let Some(mut client) = self.clients.get(&to).cloned() else { return };
        let request = pb::RerootRequest {
            stream: desc.stream,
            sender: self.id.name.clone(),
            route: desc.route,
            server: desc.server,
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

    /// The upstream's route to the root changed: update ours, pass it on.
    pub fn rerooted(self: &Arc<Self>, stream: &str, from: &str, server: &str, route: &[String]) {
        if route.is_empty() {
            if self.lock().trees.upstream_abandoned(stream, from) {
                warn!(node = %self.id.name, stream, upstream = %from, "upstream gave up: repairing the tree");
                let me = self.clone();
                let (s, f) = (stream.to_string(), from.to_string());
                self.tasks.spawn(async move { me.repair(s, vec![f]).await });
            }
            return;
        }
        let (downstream, desc) = {
            let mut st = self.lock();
            let down = st.trees.rerooted(stream, from, server, route);
            (down, st.trees.branch(stream).map(|b| b.desc.clone()))
        };
        let Some(desc) = desc else { return };
        for d in downstream {
            let me = self.clone();
            let desc = desc.clone();
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }

    /// Streams this node carries, for heartbeat answers.
    pub fn carrying(&self) -> Vec<String> {
        self.lock().trees.carrying()
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
        let mut tx = Some(tx);
        // Right after start, routes are still being learnt, and a neighbour
        // that missed heartbeats comes back with the next probe: a request
        // that finds no way yet waits a few probe periods before its NAK.
        let starting_until = self.started + self.id.probe_interval * 4;
        let route_wait_until = Instant::now() + self.id.probe_interval * 3;
        let decision = loop {
            let d = {
                let mut st = self.lock();
                if let Requester::Neighbour(n) = &requester {
                    st.data_ports.insert(n.clone(), data_port);
                }
                let st = &mut *st;
                let d = st.trees.request(stream, requester.clone(), &path, ticket, &st.routes, Instant::now());
                match &d {
                    JoinDecision::Attached(_) => self.republish(st),
                    JoinDecision::Nak(_) => {}
                    _ => {
                        st.waiters.insert(ticket, tx.take().expect("one waiter per request"));
                    }
                }
                d
            };
            let wait_until = match &d {
                JoinDecision::Nak(n) if n.reason == NakReason::NoRoute => route_wait_until.max(starting_until),
                JoinDecision::Nak(n) if n.reason == NakReason::UnknownStream => starting_until,
                _ => Instant::now(),
            };
            if Instant::now() < wait_until {
                tokio::time::sleep(self.id.probe_interval / 2).await;
                continue;
            }
            break d;
        };
        match decision {
            JoinDecision::Attached(desc) => {
                info!(node = %self.id.name, stream, ?requester, "attached to the existing tree");
                return Ok(desc);
            }
            JoinDecision::Nak(nak) => {
                info!(node = %self.id.name, stream, ?requester, reason = ?nak.reason, "stream request refused: {}", nak.detail);
                return Err(nak);
            }
            JoinDecision::Wait => {
                debug!(node = %self.id.name, stream, "waiting for the join under way")
            }
            JoinDecision::Forward { to, path } => {
                info!(node = %self.id.name, stream, upstream = %to, ?path, "stream request sent upstream");
                let me = self.clone();
                let stream = stream.to_string();
                let span = tracing::Span::current();
                self.tasks.spawn(async move { me.forward_join(stream, to, path).await }.instrument(span));
            }
            JoinDecision::ServeLocal => {
                self.serve_local(stream);
            }
        }
        let timeout = self.settings.join_timeout + Duration::from_millis(500);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(Nak {
                reason: NakReason::Timeout,
                detail: format!("node {}: stream {stream:?}: join did not complete in {timeout:?}", self.id.name),
            }),
        }
    }

    pub(super) async fn forward_join(self: Arc<Self>, stream: String, to: String, path: Vec<String>) {
        // The requester waits for one join timeout: ways that fail inside
        // it are tried one after another (see overlay-core's join.rs).
        let mut join = Join::new(&stream, path, to, Instant::now(), self.settings.join_timeout);
        let result = loop {
            let (to, left) = join.ask(Instant::now());
            let to = to.to_string();
            let result = self.request_upstream(&stream, &to, join.path().to_vec(), left).await;
            let Err(nak) = &result else { break (to, result) };
            let step = {
                let mut st = self.lock();
                let st = &mut *st;
                join.refused(nak.reason, &mut st.trees, &st.routes, Instant::now())
            };
            match step {
                JoinStep::Ask { to: next, .. } => {
                    info!(node = %self.id.name, %stream, failed = %to, upstream = %next, "stream request failed ({}): trying another way", nak.detail);
                }
                JoinStep::AskAfter { pause, .. } => {
                    info!(node = %self.id.name, %stream, upstream = %to, "stream request crossed another ({}): asking again", nak.detail);
                    tokio::time::sleep(pause).await;
                }
                JoinStep::GiveUp => break (to, result),
            }
        };
        let (to, result) = result;
        let mut st = self.lock();
        let st = &mut *st;
        let (waiters, answer) = match result {
            Ok((desc, data_addr)) => {
                st.upstream_data.insert(stream.clone(), data_addr);
                st.moves.changed(&stream, Instant::now());
                let mut waiters = st.trees.joined(Source::Neighbour(to.clone()), desc);
                let answer = Ok(st.trees.branch(&stream).map(|b| b.desc.clone()).expect("just joined"));
                info!(node = %self.id.name, %stream, upstream = %to, "joined the tree");
                // The upstream's last GOP is on its way before a viewer of
                // this POP is answered: otherwise PLAY could come first, the
                // viewer would get live packets from mid-GOP, and the GOP
                // arriving after them would be too old for its jitter buffer
                // (it would wait for the next keyframe). Neighbours are
                // answered at once; they ask for their own refresh.
                let viewers: Vec<_> = waiters
                    .extract_if(.., |w| w.requester == Requester::Local)
                    .filter_map(|w| st.waiters.remove(&w.ticket))
                    .collect();
                let me = self.clone();
                let (stream2, to2, answer2) = (stream.clone(), to.clone(), answer.clone());
                self.tasks.spawn(async move {
                    let deadline = tokio::time::Instant::now() + VIEWER_REFRESH_WAIT;
                    let video = answer2.as_ref().ok().and_then(|d| d.ssrcs.first().copied());
                    let mut refresh = Box::pin(me.clone().request_refresh(stream2, to2));
                    let sent = tokio::time::timeout_at(deadline, refresh.as_mut()).await;
                    let done = sent.is_ok();
                    // The upstream has sent its GOP when it answers; the
                    // packets are ours once our relay has taken them in.
                    if let (Ok(Some(packets)), Some(video)) = (sent, video) {
                        while me.relay.gop_len(video) < packets && tokio::time::Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    for tx in viewers {
                        let _ = tx.send(answer2.clone());
                    }
                    if !done {
                        refresh.await;
                    }
                });
                (waiters, answer)
            }
            Err(nak) => {
                warn!(node = %self.id.name, %stream, upstream = %to, "join failed: {}", nak.detail);
                (st.trees.failed(&stream), Err(nak))
            }
        };
        for w in waiters {
            if let Some(tx) = st.waiters.remove(&w.ticket) {
                let _ = tx.send(answer.clone());
            }
        }
        self.republish(st);
    }

    pub(super) async fn request_upstream(
        &self,
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
            let limit = silence::ping_limit(&self.lock().routes, to) * 2;
            tokio::select! {
                r = &mut answer => break r,
                alive = self.links.check(to, limit) => unanswered = if alive { 0 } else { unanswered + 1 },
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

    /// `requester` leaves `stream`; prunes upstream or stops the pipeline
    /// when it was the last.
    pub fn leave(self: &Arc<Self>, stream: &str, requester: Requester) {
        let prune = {
            let mut st = self.lock();
            if let Requester::Neighbour(n) = &requester {
                st.routes.stopped_carrying(n, stream);
            }
            st.trees.leave(stream, &requester)
        };
        self.carry_out_prune(stream, prune, Some(requester));
    }

    /// Carries out what leaving a stream requires: a prune upstream or
    /// stopping the pipeline, and a new forwarding table.
    pub(super) fn carry_out_prune(self: &Arc<Self>, stream: &str, prune: Prune, requester: Option<Requester>) {
        let pipeline = {
            let mut st = self.lock();
            let pipeline = if prune == Prune::StopLocal { st.pipelines.remove(stream) } else { None };
            if !matches!(prune, Prune::Nothing) {
                st.upstream_data.remove(stream);
            }
            self.republish(&mut st);
            pipeline
        };
        match prune {
            Prune::Nothing => {
                debug!(node = %self.id.name, stream, ?requester, "left; others still watch")
            }
            Prune::Upstream(up) => {
                info!(node = %self.id.name, stream, upstream = %up, "last viewer left: pruning upstream");
                let me = self.clone();
                let stream = stream.to_string();
                self.tasks.spawn(async move { me.send_leave(stream, up).await });
            }
            Prune::StopLocal => {
                let what = if pipeline.is_some() { "pipeline stopped" } else { "the publisher's ingest goes on" };
                info!(node = %self.id.name, stream, "last branch pruned: {what}");
                if let Some(p) = pipeline {
                    self.tasks.spawn_blocking(move || p.stop());
                }
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
            let branch = st.trees.branch(stream);
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
