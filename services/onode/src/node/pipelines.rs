//! The server's own streams: the pipelines of its catalogue and its
//! publishers' names.

use super::*;

impl Node {
    pub(super) fn serve_local(self: &Arc<Self>, stream: &str) {
        // A published stream's ingest runs already: its packets go into
        // the relay whether or not anyone watches.
        let live = self.lock().published.contains(stream);
        let started = if live {
            Ok(None)
        } else {
            let spec = self.catalogue.get(stream).cloned();
            let relay = self.relay.clone();
            spec.ok_or_else(|| format!("stream {stream:?} vanished from the catalogue")).and_then(|spec| {
                StreamSource::start(stream, &spec, move |pkt| relay.inject(pkt)).map(Some).map_err(|e| e.to_string())
            })
        };
        let mut st = self.lock();
        let st = &mut *st;
        let (waiters, answer) = match started {
            Ok(source) => {
                if let Some(source) = source {
                    st.pipelines.insert(stream.to_string(), source);
                }
                let desc = StreamDesc {
                    stream: stream.to_string(),
                    server: self.id.name.clone(),
                    ssrcs: media::stream_ssrcs(stream).to_vec(),
                    depth: 0,
                    route: Vec::new(),
                };
                info!(node = %self.id.name, stream, live, "this server roots the tree");
                let waiters = st.trees.joined(Source::Local, desc);
                (waiters, Ok(st.trees.branch(stream).map(|b| b.desc.clone()).expect("just joined")))
            }
            Err(e) => {
                warn!(node = %self.id.name, stream, "pipeline failed to start: {e}");
                let nak = Nak {
                    reason: NakReason::NoRoute,
                    detail: format!("server {}: stream {stream:?}: pipeline failed: {e}", self.id.name),
                };
                (st.trees.failed(stream), Err(nak))
            }
        };
        for w in waiters {
            if let Some(tx) = st.waiters.remove(&w.ticket) {
                let _ = tx.send(answer.clone());
            }
        }
        self.republish(st);
    }

    /// Registers the server's publishers (for inspect).
    pub fn set_publishing(&self, p: Arc<crate::publish::Publishing>) {
        let _ = self.publishing.set(p);
    }

    /// Whether another server offers `stream` (by this node's routes).
    pub fn offered_elsewhere(&self, stream: &str) -> bool {
        self.lock().routes.offered(stream)
    }

    /// A publisher began sending `stream` here: the server offers it (in
    /// its probes, and to joins). False if the name is one of the server's
    /// files or the test stream, which a publisher cannot take.
    pub fn offer_published(&self, stream: &str) -> bool {
        if self.catalogue.contains_key(stream) {
            return false;
        }
        let mut st = self.lock();
        st.published.insert(stream.to_string());
        st.trees.offer(stream);
        self.republish(&mut st);
        true
    }

    /// `stream`'s publisher is gone for good: the server stops offering it,
    /// drops the tree it rooted and tells each downstream that this root
    /// gave up (they look for another server that offers it, or end).
    pub fn withdraw_published(self: &Arc<Self>, stream: &str) {
        let downstream = {
            let mut st = self.lock();
            st.published.remove(stream);
            let (downstream, waiting) = st.trees.withdraw(stream);
            let nak = Nak {
                reason: NakReason::UnknownStream,
                detail: format!("server {}: stream {stream:?}: its publisher went away", self.id.name),
            };
            for w in waiting {
                if let Some(tx) = st.waiters.remove(&w.ticket) {
                    let _ = tx.send(Err(nak.clone()));
                }
            }
            st.upstream_data.remove(stream);
            self.republish(&mut st);
            downstream
        };
        info!(node = %self.id.name, stream, ?downstream, "published stream withdrawn");
        for d in downstream {
            let me = self.clone();
            let desc = gave_up(stream);
            self.tasks.spawn(async move { me.send_reroot(d, desc).await });
        }
    }
}
