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
        let mut connect = false;
        self.drive(|st| {
            connect = st.connected.insert(neighbour.to_string());
            let back = st.engine.routes.is_down(neighbour);
            let effects = st.engine.heartbeat_answered(neighbour, rtt.as_micros() as u64, carrying);
            if back {
                self.changes.send_modify(|v| *v += 1);
            }
            effects
        });
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

    /// A neighbour (or the link to it) is gone: the engine tells the
    /// overlay and repairs the branches it fed (see
    /// [`overlay_core::engine::Engine::neighbour_lost`]).
    pub fn neighbour_lost(self: &Arc<Self>, neighbour: &str, certain: bool) {
        self.drive(|st| {
            st.connected.remove(neighbour);
            self.links.mark_lost(neighbour);
            st.engine.neighbour_lost(neighbour, certain, Instant::now())
        });
    }

    pub(super) async fn probe_loop(self: Arc<Self>) {
        let mut seq = net::unix_us();
        let files: Vec<String> = self.catalogue.keys().cloned().collect();
        let mut tick = self.ticker(self.id.probe_interval);
        while tick.next().await {
            seq += 1;
            self.drive(|st| {
                let streams = files.iter().chain(st.published.iter()).cloned().collect();
                st.engine.originate(seq, net::unix_us(), streams)
            });
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
        self.drive(|st| st.engine.on_link_notice(&notice, Instant::now()));
    }

    /// A STATUS probe from a neighbour.
    pub fn on_probe(self: &Arc<Self>, probe: pb::Probe) {
        let probe = convert::probe_from_wire(probe);
        self.drive(|st| st.engine.on_probe(&probe, Instant::now(), net::unix_us()));
    }

    /// The bootstrapper says `node` failed. It may only have lost its way
    /// to the bootstrapper (a partition): a neighbour is asked once more,
    /// and one that answers is believed over the notice.
    pub fn node_failed(self: &Arc<Self>, node: &str) {
        if self.neighbour(node).is_none() {
            self.drive(|st| st.engine.node_failed(node, Instant::now()));
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
            me.drive(|st| {
                st.connected.remove(&node);
                me.links.mark_lost(&node);
                st.engine.node_failed(&node, Instant::now())
            });
        });
    }
}
