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
        self.drive(|st| {
            let result = match started {
                Ok(source) => {
                    if let Some(source) = source {
                        st.pipelines.insert(stream.to_string(), source);
                    }
                    info!(node = %self.id.name, stream, live, "source started");
                    Ok(StreamDesc {
                        stream: stream.to_string(),
                        server: self.id.name.clone(),
                        ssrcs: media::stream_ssrcs(stream).to_vec(),
                        depth: 0,
                        route: Vec::new(),
                        delay_us: 0,
                    })
                }
                Err(e) => Err(Nak {
                    reason: NakReason::NoRoute,
                    detail: format!("server {}: stream {stream:?}: pipeline failed: {e}", self.id.name),
                }),
            };
            st.engine.local_started(stream, result)
        });
    }

    /// Registers the server's publishers (for inspect).
    pub fn set_publishing(&self, p: Arc<crate::publish::Publishing>) {
        let _ = self.publishing.set(p);
    }

    /// Whether another server offers `stream` (by this node's routes).
    pub fn offered_elsewhere(&self, stream: &str) -> bool {
        self.lock().engine.routes.offered(stream)
    }

    /// A publisher began sending `stream` here: the server offers it (in
    /// its probes, and to joins). False if the name is one of the server's
    /// files or the test stream, which a publisher cannot take.
    pub fn offer_published(self: &Arc<Self>, stream: &str) -> bool {
        if self.catalogue.contains_key(stream) {
            return false;
        }
        self.drive(|st| {
            st.published.insert(stream.to_string());
            st.engine.offer(stream)
        });
        true
    }

    /// `stream`'s publisher is gone for good: the server stops offering it,
    /// drops the tree it rooted and tells each downstream that this root
    /// gave up (they look for another server that offers it, or end).
    pub fn withdraw_published(self: &Arc<Self>, stream: &str) {
        let nak = Nak {
            reason: NakReason::UnknownStream,
            detail: format!("server {}: stream {stream:?}: its publisher went away", self.id.name),
        };
        self.drive(|st| {
            st.published.remove(stream);
            st.engine.withdraw(stream, nak)
        });
    }
}
