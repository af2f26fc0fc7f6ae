//! The POP's viewers and the data plane's table: sessions, PLAY with the
//! cached GOP, RTP lines, and the forwarding table rebuilt from trees and
//! sessions.

use super::*;

impl Node {
    /// Tears down the sessions of clients that went silent (crashed, or
    /// lost their network) so their branches are pruned.
    pub(super) async fn expire_loop(self: Arc<Self>) {
        let mut tick = self.ticker(Duration::from_secs(1));
        while tick.next().await {
            // A stream that brought nothing here for a while (a publisher
            // between connections, a repair under way) gives its viewers
            // nothing to report on: they are not judged silent meanwhile.
            let starved: std::collections::HashSet<String> = {
                let st = self.lock();
                st.heard
                    .iter()
                    .filter(|(_, (_, heard))| heard.silent_ms().is_none_or(|ms| ms > STARVED_MS))
                    .map(|(stream, _)| stream.clone())
                    .collect()
            };
            let gone = self.with_sessions(|s| {
                s.expire(Instant::now(), self.settings.session_timeout, |stream| starved.contains(stream))
            });
            for (id, session) in gone {
                warn!(pop = %self.id.name, client = %session.client, session = &id[..8.min(id.len())], "client silent: session expired");
                if let Some(stream) = session.stream {
                    self.leave(&stream, Requester::Local);
                }
            }
        }
    }

    /// Rebuilds the forwarding table from the trees and sessions and
    /// publishes it to the relay.
    pub(super) fn republish(&self, st: &mut State) {
        let mut table = ForwardTable::default();
        st.heard.retain(|stream, (source, _)| st.engine.trees.branch(stream).is_some_and(|b| b.source == *source));
        st.engine.forget_gone();
        // The figures of streams no longer carried stay (counters do), up
        // to a bound.
        if st.tallies.len() > KEPT_STREAMS {
            st.tallies.retain(|stream, _| st.engine.trees.branch(stream).is_some());
        }
        // A line outlives a repair (the branch may be gone meanwhile): it
        // ends when no session watches its stream any more.
        let watched: std::collections::HashSet<&str> =
            st.sessions.iter().filter_map(|(_, s)| s.stream.as_deref()).collect();
        st.lines.retain(|(stream, _), _| watched.contains(stream.as_str()));
        for branch in st.engine.trees.active() {
            let stream = &branch.desc.stream;
            // A new upstream starts unheard: silence is judged from its
            // first packet on.
            let heard =
                st.heard.entry(stream.clone()).or_insert_with(|| (branch.source.clone(), Heard::default())).1.clone();
            let accept = match &branch.source {
                Source::Local => Accept::Local,
                Source::Neighbour(up) => match (self.neighbour(up), st.upstream_ports.get(up)) {
                    (Some(n), Some(port)) => Accept::From(SocketAddr::new(n.address, *port)),
                    _ => continue,
                },
            };
            let tallies = st.tallies.entry(stream.clone()).or_default();
            let (mut downstream, mut sent): (Vec<SocketAddr>, Vec<Tally>) = branch
                .downstream
                .iter()
                .filter_map(|n| {
                    let addr = self.neighbour(n)?.address;
                    let port = *st.data_ports.get(n).unwrap_or(&self.settings.data_port);
                    Some((SocketAddr::new(addr, port), tallies.to(n)))
                })
                .unzip();
            let received = tallies.received.clone();
            let players: Vec<SocketAddr> = st.sessions.playing(stream).collect();
            let tracks: Vec<_> = st.sessions.playing_tracks(stream).collect();
            // A tally for viewers only where there are some.
            let viewers = if players.is_empty() && tracks.is_empty() { Tally::default() } else { tallies.to(VIEWERS) };
            for addr in players {
                downstream.push(addr);
                sent.push(viewers.clone());
            }
            for (i, ssrc) in branch.desc.ssrcs.iter().enumerate() {
                // Every node keeps the video's last GOP for downstreams and
                // viewers who start now.
                let cache_gop = i == 0;
                let split: Vec<SplitDest> =
                    tracks.iter().filter(|t| t.track == i).map(|t| SplitDest { rtp: t.rtp, rtcp: t.rtcp }).collect();
                let continuity = (!split.is_empty()).then(|| line(&mut st.lines, stream, i));
                let route = Route {
                    accept,
                    downstream: downstream.clone(),
                    split,
                    continuity,
                    cache_gop,
                    heard: heard.clone(),
                    received: received.clone(),
                    sent: sent.clone(),
                    split_sent: viewers.clone(),
                };
                table.insert(*ssrc, route);
            }
        }
        // A published stream nobody watches still fills the relay's GOP
        // cache, so that its first viewer starts at once.
        for stream in &st.published {
            let [video, _] = media::stream_ssrcs(stream);
            if table.get(video).is_none() {
                let route = Route { cache_gop: true, ..Route::plain(Accept::Local, Vec::new()) };
                table.insert(video, route);
            }
        }
        self.relay.publish(table);
        self.changes.send_modify(|v| *v += 1);
    }

    /// PLAY: the session's client first gets the cached GOP of the video
    /// (so it decodes at once), then the live packets.
    pub fn play(&self, id: &str) -> Result<overlay_core::session::Phase, overlay_core::session::SessionError> {
        let (phase, burst) = {
            let mut st = self.lock();
            st.sessions.touch(id, Instant::now())?;
            let phase = st.sessions.play(id)?;
            let session = st.sessions.iter().find(|(sid, _)| *sid == id).map(|(_, s)| s.clone());
            let burst = session.and_then(|s| {
                let stream = s.stream.as_deref()?;
                let ssrc = *st.engine.trees.branch(stream)?.desc.ssrcs.first()?;
                let video = s.tracks.iter().find(|t| t.track == 0);
                let tally = st.tallies.entry(stream.to_string()).or_default().to(VIEWERS);
                match (s.rtp_dest, video) {
                    (Some(d), _) => Some((ssrc, SplitDest { rtp: d, rtcp: d }, None, tally)),
                    (None, Some(t)) => Some((
                        ssrc,
                        SplitDest { rtp: t.rtp, rtcp: t.rtcp },
                        Some(line(&mut st.lines, stream, 0)),
                        tally,
                    )),
                    (None, None) => None,
                }
            });
            (phase, burst)
        };
        if let Some((ssrc, dest, line, tally)) = burst {
            let n = self.relay.send_gop_on(ssrc, dest, line.as_ref(), &tally);
            info!(node = %self.id.name, dest = %dest.rtp, "PLAY starts with the cached GOP: {n} packets");
        }
        let mut st = self.lock();
        self.republish(&mut st);
        Ok(phase)
    }

    /// What RTSP players of `stream` see: per track, the SSRC of its line
    /// (None before its first packet went out).
    pub fn line_ssrcs(&self, stream: &str, tracks: usize) -> Vec<Option<u32>> {
        let st = self.lock();
        (0..tracks).map(|t| st.lines.get(&(stream.to_string(), t)).and_then(|l| l.lock().ssrc())).collect()
    }

    /// Where a player starting now picks up the video line of `stream`:
    /// the sequence number and timestamp of the cached GOP's first packet
    /// on it (for RTP-Info).
    pub fn line_start(&self, stream: &str) -> Option<(u16, u32)> {
        let (ssrc, line) = {
            let mut st = self.lock();
            let ssrc = *st.engine.trees.branch(stream)?.desc.ssrcs.first()?;
            (ssrc, line(&mut st.lines, stream, 0))
        };
        let mut first =
            self.relay.gop(ssrc).into_iter().find(|p| {
                overlay_core::rtp::Packet::parse(p).is_ok_and(|p| p.kind() == overlay_core::rtp::Kind::Rtp)
            })?;
        let rewritten = line.lock().rewrite(&mut first);
        let p = overlay_core::rtp::Packet::parse(&first).ok().filter(|_| rewritten)?;
        Some((p.sequence(), p.timestamp()))
    }

    /// The H.264 parameter sets (SPS, PPS) and payload type of the video
    /// SSRC `video`, from the cached GOP; waits up to `wait` for a keyframe
    /// (a stream just joined has none yet).
    pub async fn parameter_sets(&self, video: u32, wait: Duration) -> Option<(Vec<u8>, Vec<u8>, u8)> {
        let until = Instant::now() + wait;
        loop {
            let gop = self.relay.gop(video);
            if let Some((sps, pps)) = relay::gop::parameter_sets(gop.iter().map(Vec::as_slice)) {
                let pt = gop.iter().find_map(|p| {
                    overlay_core::rtp::Packet::parse(p)
                        .ok()
                        .filter(|p| p.kind() == overlay_core::rtp::Kind::Rtp)
                        .map(|p| p.payload_type())
                });
                return Some((sps, pps, pt.unwrap_or(media::VIDEO_PT)));
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The stream as this node carries it now, if it does.
    pub fn desc(&self, stream: &str) -> Option<overlay_core::tree::StreamDesc> {
        self.lock().engine.trees.branch(stream).map(|b| b.desc.clone())
    }

    /// [`Node::with_sessions`] for changes that leave every destination
    /// as it was (keepalives, reports): the forwarding table stays.
    pub fn note_sessions<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        f(&mut self.lock().sessions)
    }

    /// Runs `f` on the session table and republishes the forwarding table.
    pub fn with_sessions<T>(&self, f: impl FnOnce(&mut Sessions) -> T) -> T {
        let mut st = self.lock();
        let out = f(&mut st.sessions);
        self.republish(&mut st);
        out
    }
}
