//! The node's neighbours: heartbeats and the datagrams they carry (probes,
//! link notices), losses and failures, and quiet streams' upstreams checked
//! at once.

use super::*;

impl Node {
    /// Sends the periodic heartbeat to every neighbour and, on the same
    /// tick, ends the beats whose time is up: a neighbour that missed three
    /// in a row is lost. (One tick for both keeps a node at rest to a few
    /// wake-ups a second.)
    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        let limit = (self.settings.heartbeat * 2).max(Duration::from_millis(250));
        let mut tick = self.ticker(self.settings.heartbeat);
        while tick.next().await {
            let now = Instant::now();
            for neighbour in self.links.expire(now) {
                if self.lock().routes.is_down(&neighbour) {
                    continue;
                }
                warn!(node = %self.id.name, %neighbour, "neighbour missed 3 heartbeats: declared lost");
                self.neighbour_lost(&neighbour, false);
            }
            self.links.beat_all(now, limit);
        }
    }

    /// Takes in the neighbours' datagrams: answers heartbeats, learns link
    /// delays and carried streams from the answers, floods probes on.
    pub(super) async fn datagram_loop(self: Arc<Self>) {
        let mut buf = Vec::new();
        loop {
            let incoming = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.links.recv(&mut buf) => r,
            };
            match incoming {
                Ok(Incoming::Heartbeat { seq, reply_to }) => self.links.answer(reply_to, seq, self.carrying()),
                Ok(Incoming::Answer { from, answer, carrying }) => self.on_answer(&from, answer.rtt, carrying),
                Ok(Incoming::Probe(probe)) => self.on_probe(probe),
                Ok(Incoming::LinkNotice { from, notice }) => self.on_link_notice(from, notice),
                Err(e) => {
                    warn!(node = %self.id.name, "heartbeat socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A neighbour answered a heartbeat after `rtt`.
    pub(super) fn on_answer(self: &Arc<Self>, neighbour: &str, rtt: Duration, carrying: Vec<String>) {
        let (connect, notices) = {
            let mut st = self.lock();
            st.routes.on_link_rtt(neighbour, rtt.as_micros() as u64);
            st.routes.set_carrying(neighbour, carrying);
            let notices = if st.routes.is_down(neighbour) {
                st.routes.neighbour_up(neighbour);
                info!(node = %self.id.name, %neighbour, "neighbour answers again");
                self.changes.send_modify(|v| *v += 1);
                st.routes.announce_link(neighbour, true, net::unix_us())
            } else {
                Vec::new()
            };
            (st.connected.insert(neighbour.to_string()), notices)
        };
        self.send_link_notices(notices);
        if connect {
            let me = self.clone();
            let neighbour = neighbour.to_string();
            self.tasks.spawn(async move { me.open_control(neighbour).await });
        }
    }

    /// Opens the control connection to a neighbour that answers
    /// heartbeats, so that a stream request does not wait for handshakes.
    pub(super) async fn open_control(self: Arc<Self>, neighbour: String) {
        let Some(mut client) = self.clients.get(&neighbour).cloned() else { return };
        let request = pb::PingRequest { sender: self.id.name.clone() };
        if let Err(e) = client.ping(request).await {
            debug!(node = %self.id.name, %neighbour, "control connection not open yet: {}", e.message());
            self.lock().connected.remove(&neighbour);
        }
    }

    /// Watches the streams this node receives: one gone silent gets its
    /// upstream pinged at once, with a timeout of a few link round trips;
    /// no answer means the upstream (or the link) is lost, long before
    /// three heartbeats would say so. An upstream that answers is left
    /// alone (it may be repairing its own way up) and asked again later.
    pub(super) async fn silence_loop(self: Arc<Self>, silence: Duration) {
        let mut watcher = Silence::new(silence);
        let mut tick = self.ticker(watcher.period());
        while tick.next().await {
            let watch = {
                let mut st = self.lock();
                let st = &mut *st;
                let heard = &st.heard;
                let silent_ms = |stream: &str| heard.get(stream).and_then(|(_, h)| h.silent_ms());
                watcher.tick(&mut st.trees, &st.routes, silent_ms, Instant::now())
            };
            for (stream, up) in watch.rejoin {
                warn!(
                    node = %self.id.name, %stream, upstream = %up, silent_ms = silence::REJOIN_AFTER.as_millis() as u64,
                    "upstream answers but no longer feeds the stream: joining again"
                );
                let me = self.clone();
                self.tasks.spawn(async move { me.repair(stream, Vec::new()).await });
            }
            for (up, limit) in watch.ping {
                let me = self.clone();
                self.tasks.spawn(async move { me.check_silent_upstream(up, limit).await });
            }
        }
    }

    pub(super) async fn check_silent_upstream(self: Arc<Self>, up: String, limit: Duration) {
        if self.links.check(&up, limit).await {
            debug!(node = %self.id.name, upstream = %up, "a stream went quiet but its upstream answers");
            return;
        }
        if self.lock().routes.is_down(&up) {
            return;
        }
        warn!(
            node = %self.id.name, upstream = %up, timeout_ms = limit.as_millis() as u64,
            "a stream went silent and its upstream does not answer: declared lost"
        );
        self.neighbour_lost(&up, false);
    }

    /// A neighbour (or the link to it) is gone: forget routes through it
    /// and repair the branches it fed, at once. The branches it was fed by
    /// us are pruned at once only when the loss is certain (the
    /// bootstrapper's notice); after missed heartbeats, which a lossy link
    /// also causes, only if it is still silent a few seconds later.
    pub fn neighbour_lost(self: &Arc<Self>, neighbour: &str, certain: bool) {
        let (repairs, notices, probes) = {
            let mut st = self.lock();
            let news = !st.routes.is_down(neighbour);
            st.routes.neighbour_down(neighbour);
            // Every route through the link dies at once, everywhere.
            let notices = if news { st.routes.announce_link(neighbour, false, net::unix_us()) } else { Vec::new() };
            let probes = st.routes.tell_changes(Instant::now());
            st.connected.remove(neighbour);
            self.links.mark_lost(neighbour);
            (st.trees.upstream_lost(neighbour), notices, probes)
        };
        self.send_link_notices(notices);
        self.send_probes(probes);
        for stream in repairs {
            warn!(node = %self.id.name, %stream, upstream = %neighbour, "upstream lost: repairing the tree");
            let me = self.clone();
            self.tasks.spawn(async move { me.repair(stream, Vec::new()).await });
        }
        if certain {
            self.prune_downstream(neighbour);
        } else {
            let me = self.clone();
            let neighbour = neighbour.to_string();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = me.cancel.cancelled() => {}
                    _ = tokio::time::sleep(DOWNSTREAM_GRACE) => {
                        if me.lock().routes.is_down(&neighbour) {
                            me.prune_downstream(&neighbour);
                        }
                    }
                }
            });
        }
        let mut st = self.lock();
        self.republish(&mut st);
    }

    pub(super) fn prune_downstream(self: &Arc<Self>, neighbour: &str) {
        let prunes = self.lock().trees.downstream_lost(neighbour);
        for (stream, prune) in prunes {
            info!(node = %self.id.name, %stream, downstream = %neighbour, "downstream lost: pruned");
            // Should it be alive after all, it learns it lost its upstream.
            let me = self.clone();
            let desc = gave_up(&stream);
            let to = neighbour.to_string();
            self.tasks.spawn(async move { me.send_reroot(to, desc).await });
            self.carry_out_prune(&stream, prune, None);
        }
    }

    pub(super) async fn probe_loop(self: Arc<Self>) {
        let mut seq = net::unix_us();
        let files: Vec<String> = self.catalogue.keys().cloned().collect();
        let mut tick = self.ticker(self.id.probe_interval);
        while tick.next().await {
            seq += 1;
            let out = {
                let st = &mut *self.lock();
                let streams = files.iter().chain(st.published.iter()).cloned().collect();
                st.routes.originate(seq, net::unix_us(), streams)
            };
            self.send_probes(out);
        }
    }

    pub(super) fn send_probes(&self, out: Vec<(String, overlay_core::routing::Probe)>) {
        for (to, probe) in out {
            self.links.send_probe(&to, convert::probe_to_wire(probe));
        }
    }

    pub(super) fn send_link_notices(&self, out: Vec<(String, overlay_core::routing::LinkNotice)>) {
        for (to, notice) in out {
            self.links.send_link_notice(&to, convert::link_notice_to_wire(notice));
        }
    }

    /// A link notice from a neighbour: passed on once; routes through a
    /// dead link are withdrawn.
    pub fn on_link_notice(self: &Arc<Self>, from: String, notice: pb::LinkNotice) {
        let notice = convert::link_notice_from_wire(notice, from);
        let (notices, probes) = {
            let mut st = self.lock();
            let notices = st.routes.on_link_notice(&notice, Instant::now());
            let probes = if notices.is_empty() { Vec::new() } else { st.routes.tell_changes(Instant::now()) };
            (notices, probes)
        };
        if !notices.is_empty() {
            let (a, b) = (&notice.a, &notice.b);
            if notice.up {
                info!(node = %self.id.name, %a, %b, "link notice: the link is back");
            } else {
                info!(node = %self.id.name, %a, %b, "link notice: the link is dead, routes through it withdrawn");
            }
        }
        self.send_link_notices(notices);
        self.send_probes(probes);
    }

    /// A STATUS probe from a neighbour.
    pub fn on_probe(self: &Arc<Self>, probe: pb::Probe) {
        let probe = convert::probe_from_wire(probe);
        let out = self.lock().routes.on_probe(&probe, Instant::now(), net::unix_us());
        self.send_probes(out);
    }

    /// The bootstrapper says `node` failed. It may only have lost its way
    /// to the bootstrapper (a partition): a neighbour is asked once more,
    /// and one that answers is believed over the notice.
    pub fn node_failed(self: &Arc<Self>, node: &str) {
        if self.neighbour(node).is_none() {
            self.forget_failed(node);
            return;
        }
        let me = self.clone();
        let node = node.to_string();
        self.tasks.spawn(async move {
            let limit = (me.settings.heartbeat * 2).max(Duration::from_millis(250));
            if me.links.check(&node, limit).await {
                warn!(node = %me.id.name, failed = %node, "bootstrapper reports it failed but it answers: kept");
                return;
            }
            me.forget_failed(&node);
            me.neighbour_lost(&node, true);
        });
    }

    /// Routes through a failed node die here, and the neighbours hear what
    /// that changes.
    pub(super) fn forget_failed(&self, node: &str) {
        let probes = {
            let mut st = self.lock();
            st.routes.node_failed(node, Instant::now());
            st.routes.tell_changes(Instant::now())
        };
        self.send_probes(probes);
    }
}
