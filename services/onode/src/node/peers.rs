//! The node's neighbours: heartbeats and the datagrams they carry (probes,
//! link notices), losses and failures, and quiet streams' upstreams checked
//! at once.

use super::*;
use overlay_core::routing::NOTICE_REPEAT;

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
                if self.lock().engine.routes.is_down(&neighbour) {
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
        let mut notices = Vec::new();
        let mut connect = false;
        self.drive(|st| {
            st.engine.routes.on_link_rtt(neighbour, rtt.as_micros() as u64);
            st.engine.routes.set_carrying(neighbour, carrying);
            connect = st.connected.insert(neighbour.to_string());
            if !st.engine.routes.is_down(neighbour) {
                return Vec::new();
            }
            st.engine.routes.neighbour_up(neighbour);
            info!(node = %self.id.name, %neighbour, "neighbour answers again");
            self.changes.send_modify(|v| *v += 1);
            notices = st.engine.routes.announce_link(neighbour, true, net::unix_us());
            // Prunes it missed while down go again.
            st.engine.neighbour_up(neighbour)
        });
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

    pub(super) async fn check_silent_upstream(self: Arc<Self>, up: String, limit: Duration) {
        if self.links.check(&up, limit).await {
            debug!(node = %self.id.name, upstream = %up, "a stream went quiet but its upstream answers");
            return;
        }
        if self.lock().engine.routes.is_down(&up) {
            return;
        }
        warn!(
            node = %self.id.name, upstream = %up, timeout_ms = limit.as_millis() as u64,
            "a stream went silent and its upstream does not answer: declared lost"
        );
        self.neighbour_lost(&up, false);
    }

    /// A neighbour (or the link to it) is gone: routes through it die at
    /// once, everywhere (a link notice), and the engine repairs the
    /// branches it fed. The branches it was fed by us are pruned at once
    /// only when the loss is certain (the bootstrapper's notice); after
    /// missed heartbeats, which a lossy link also causes, only if it is
    /// still silent a few seconds later.
    pub fn neighbour_lost(self: &Arc<Self>, neighbour: &str, certain: bool) {
        let mut notices = Vec::new();
        let mut probes = Vec::new();
        self.drive(|st| {
            let news = !st.engine.routes.is_down(neighbour);
            st.engine.routes.neighbour_down(neighbour);
            if news {
                notices = st.engine.routes.announce_link(neighbour, false, net::unix_us());
            }
            probes = st.engine.routes.tell_changes(Instant::now());
            st.connected.remove(neighbour);
            self.links.mark_lost(neighbour);
            st.engine.neighbour_lost(neighbour, certain, Instant::now())
        });
        self.send_link_notices(notices);
        self.send_probes(probes);
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
                st.engine.routes.originate(seq, net::unix_us(), streams)
            };
            self.send_probes(out);
        }
    }

    pub(super) fn send_probes(&self, out: Vec<(String, overlay_core::routing::Probe)>) {
        for (to, probe) in out {
            self.links.send_probe(&to, convert::probe_to_wire(probe));
        }
    }

    /// Sends link notices, and each copy again [`NOTICE_REPEAT`] later:
    /// they ride on UDP, and one lost copy could leave a node with routes
    /// through a dead link until they go stale.
    pub(super) fn send_link_notices(self: &Arc<Self>, out: Vec<(String, overlay_core::routing::LinkNotice)>) {
        if out.is_empty() {
            return;
        }
        let wire: Vec<(String, pb::LinkNotice)> =
            out.into_iter().map(|(to, notice)| (to, convert::link_notice_to_wire(notice))).collect();
        for (to, notice) in &wire {
            self.links.send_link_notice(to, notice.clone());
        }
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = me.cancel.cancelled() => {}
                _ = tokio::time::sleep(NOTICE_REPEAT) => {
                    for (to, notice) in wire {
                        me.links.send_link_notice(&to, notice);
                    }
                }
            }
        });
    }

    /// A link notice from a neighbour: passed on once; routes through a
    /// dead link are withdrawn.
    pub fn on_link_notice(self: &Arc<Self>, from: String, notice: pb::LinkNotice) {
        let notice = convert::link_notice_from_wire(notice, from);
        let (notices, probes) = {
            let mut st = self.lock();
            let notices = st.engine.routes.on_link_notice(&notice, Instant::now());
            let probes = if notices.is_empty() { Vec::new() } else { st.engine.routes.tell_changes(Instant::now()) };
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
        let out = self.lock().engine.routes.on_probe(&probe, Instant::now(), net::unix_us());
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
            st.engine.routes.node_failed(node, Instant::now());
            st.engine.routes.tell_changes(Instant::now())
        };
        self.send_probes(probes);
    }
}
