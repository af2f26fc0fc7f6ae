//! The node's neighbours: the datagrams they send (heartbeats, answers,
//! probes, link notices) handed to the engine, which judges the answers
//! and declares losses, and the bootstrapper's failure reports.

use super::*;
use overlay_core::routing::NOTICE_REPEAT;

impl Node {
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
                Ok(Incoming::Answer { from, seq, carrying }) => self.on_answer(&from, seq, carrying),
                Ok(Incoming::Probe(probe)) => self.on_probe(probe),
                Ok(Incoming::LinkNotice { from, notice }) => self.on_link_notice(from, notice),
                Err(e) => {
                    warn!(node = %self.id.name, "heartbeat socket: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// A neighbour answered heartbeat `seq`.
    pub(super) fn on_answer(self: &Arc<Self>, neighbour: &str, seq: u64, carrying: Vec<String>) {
        let mut connect = false;
        self.drive(|st| {
            let back = st.engine.routes.is_down(neighbour);
            let Some(effects) = st.engine.heartbeat_answered(neighbour, seq, carrying, Instant::now()) else {
                self.links.counters.stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Vec::new();
            };
            // First answer, or back after a loss: open the control
            // connection now, so that a stream request does not wait.
            connect = st.connected.insert(neighbour.to_string()) || back;
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

    /// The bootstrapper says `node` failed; the engine asks a neighbour
    /// once more before it believes it (see
    /// [`overlay_core::engine::Engine::node_failed`]).
    pub fn node_failed(self: &Arc<Self>, node: &str) {
        self.drive(|st| st.engine.node_failed(node, Instant::now()));
    }
}
