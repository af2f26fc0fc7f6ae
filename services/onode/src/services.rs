//! gRPC service implementations of a node: the overlay service offered to
//! neighbours and the session service a POP offers to clients. They
//! translate between wire messages and the node driver; no protocol logic.

use std::net::SocketAddr;
use std::sync::Arc;

use overlay_core::tree::Requester;
use overlay_proto as pb;
use rand::RngCore;
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::convert;
use crate::node::Node;
use crate::tls::Peer;
use crate::token::{Action, TokenError};
use overlay_core::session::short_id;

/// Largest message each service takes: a few hundred bytes are real use;
/// the margin is for long paths and stream lists.
pub const OVERLAY_MAX_MESSAGE: usize = 64 * 1024;
pub const SESSION_MAX_MESSAGE: usize = 8 * 1024;
pub const BOOTSTRAP_MAX_MESSAGE: usize = 64 * 1024;

pub use overlay_core::names::shown;
/// Longest free-form client name kept.
pub const MAX_CLIENT_NAME: usize = 64;
/// Most nodes a join path or reroot route may list.
pub const MAX_PATH: usize = 64;

/// Checks a node or stream name ([`overlay_core::names::check_name`]).
pub fn check_name(what: &str, name: &str) -> Result<(), Status> {
    overlay_core::names::check_name(what, name).map_err(Status::invalid_argument)
}

/// Checks a free-form client name (kept for logs): short, no control
/// characters.
pub fn check_client_name(client: &str) -> Result<(), Status> {
    if client.len() > MAX_CLIENT_NAME || client.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "client name {} is longer than {MAX_CLIENT_NAME} bytes or holds control characters",
            shown(client)
        )));
    }
    Ok(())
}

fn check_path(what: &str, path: &[String]) -> Result<(), Status> {
    if path.len() > MAX_PATH {
        return Err(Status::invalid_argument(format!("{what} lists {} nodes, at most {MAX_PATH}", path.len())));
    }
    path.iter().try_for_each(|n| check_name(what, n))
}

/// Checks a reroot notice's fields. An empty route says "I found no way to
/// the root" (or, with `repairing`, "I am looking for one") and names no
/// server.
fn check_reroot(req: &pb::RerootRequest) -> Result<(), Status> {
    check_name("stream", &req.stream)?;
    if req.repairing && !(req.route.is_empty() && req.server.is_empty()) {
        return Err(Status::invalid_argument("a repairing notice carries no route and no server"));
    }
    if !req.route.is_empty() || !req.server.is_empty() {
        check_name("server", &req.server)?;
    }
    check_path("route", &req.route)
}

/// Which neighbour is calling: with TLS the certificate says, and the
/// name the request claims must be the same; without TLS the request must
/// come from the address this node knows that neighbour by.
fn neighbour<T>(node: &Node, request: &Request<T>, claimed: &str) -> Result<String, Status> {
    let me = &node.id.name;
    let name = if node.settings.tls.is_some() {
        match Peer::of(request) {
            Peer::Node(name) => {
                if !claimed.is_empty() && claimed != name {
                    return Err(Status::permission_denied(format!(
                        "node {me}: the caller is node {name} but claims to be {}",
                        shown(claimed)
                    )));
                }
                name
            }
            other => {
                return Err(Status::unauthenticated(format!(
                    "node {me}: the overlay service answers overlay nodes only, and the caller is {other}"
                )))
            }
        }
    } else {
        let peer = request.remote_addr().map(|a| a.ip());
        let known = node.id.neighbours.iter().find(|n| n.name == claimed).map(|n| n.address);
        if known.is_some() && known != peer {
            return Err(Status::permission_denied(format!(
                "node {me}: {} is reached at {}, but the request came from {}",
                shown(claimed),
                known.map(|a| a.to_string()).unwrap_or_default(),
                peer.map(|a| a.to_string()).unwrap_or_else(|| "an unknown address".into())
            )));
        }
        claimed.to_string()
    };
    if node.id.neighbours.iter().all(|n| n.name != name) {
        return Err(Status::permission_denied(format!("node {me}: {} is not a neighbour", shown(&name))));
    }
    Ok(name)
}

/// Operator-only calls: with TLS, a certificate of the overlay's CA held
/// by an operator.
pub fn operator<T>(tls: bool, me: &str, request: &Request<T>) -> Result<(), Status> {
    if !tls {
        return Ok(());
    }
    match Peer::of(request) {
        Peer::Operator(_) => Ok(()),
        other => Err(Status::permission_denied(format!(
            "{me}: this call is for the overlay's operators (the operator certificate), and the caller is {other}"
        ))),
    }
}

pub struct OverlayService(pub Arc<Node>);

#[tonic::async_trait]
impl pb::overlay_server::Overlay for OverlayService {
    async fn ping(&self, request: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        neighbour(&self.0, &request, &request.get_ref().sender)?;
        Ok(Response::new(pb::PingReply { name: self.0.id.name.clone() }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let span = telemetry::server_span("Join", request.metadata());
        let sender = neighbour(&self.0, &request, &request.get_ref().sender)?;
        let mut req = request.into_inner();
        req.sender = sender;
        check_name("stream", &req.stream)?;
        check_path("path", &req.path)?;
        let node = self.0.clone();
        async move {
            let port = u16::try_from(req.data_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Status::invalid_argument(format!("data_port {} is not a UDP port", req.data_port)))?;
            let result = node.join(&req.stream, Requester::Neighbour(req.sender.clone()), req.path, port).await;
            let result = match result {
                Ok(desc) => pb::join_reply::Result::Joined(convert::desc_to_wire(&desc, node.settings.data_port)),
                Err(nak) => pb::join_reply::Result::Nak(convert::nak_to_wire(&nak)),
            };
            Ok(Response::new(pb::JoinReply { result: Some(result) }))
        }
        .instrument(span)
        .await
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveReply>, Status> {
        let sender = neighbour(&self.0, &request, &request.get_ref().sender)?;
        let req = request.into_inner();
        check_name("stream", &req.stream)?;
        self.0.leave(&req.stream, Requester::Neighbour(sender));
        Ok(Response::new(pb::LeaveReply {}))
    }

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<pb::RefreshReply>, Status> {
        let sender = neighbour(&self.0, &request, &request.get_ref().sender)?;
        let req = request.into_inner();
        check_name("stream", &req.stream)?;
        let packets = self.0.refresh(&req.stream, &sender) as u32;
        Ok(Response::new(pb::RefreshReply { packets }))
    }

    async fn reroot(&self, request: Request<pb::RerootRequest>) -> Result<Response<pb::RerootReply>, Status> {
        let sender = neighbour(&self.0, &request, &request.get_ref().sender)?;
        let req = request.into_inner();
        check_reroot(&req)?;
        if req.repairing {
            self.0.upstream_repairing(&req.stream, &sender);
        } else {
            self.0.rerooted(&req.stream, &sender, &req.server, &req.route, req.delay_us);
        }
        Ok(Response::new(pb::RerootReply {}))
    }

    async fn inspect(&self, request: Request<pb::InspectRequest>) -> Result<Response<pb::InspectReply>, Status> {
        operator(self.0.settings.tls.is_some(), &format!("node {}", self.0.id.name), &request)?;
        Ok(Response::new(pb::InspectReply { json: self.0.inspect().to_string() }))
    }

    type ObserveStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::NodeView, Status>> + Send>>;

    async fn observe(&self, request: Request<pb::ObserveRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let node = self.0.clone();
        if node.settings.tls.is_some() && !matches!(Peer::of(&request), Peer::Node(_) | Peer::Operator(_)) {
            return Err(Status::permission_denied(format!(
                "node {}: the map's view is for overlay nodes and operators, and the caller is {}",
                node.id.name,
                Peer::of(&request)
            )));
        }
        let Some(slot) = ObserverSlot::take() else {
            return Err(Status::resource_exhausted(format!(
                "node {}: {MAX_OBSERVERS} observers already watch this node",
                node.id.name
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let mut changes = node.changes.subscribe();
        let tasks = node.tasks.clone();
        tasks.spawn(async move {
            let _slot = slot;
            loop {
                if tx.send(Ok(node.view())).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = node.cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Changes that come together go in one view.
                        tokio::time::sleep(OBSERVE_COALESCE).await;
                        changes.borrow_and_update();
                    }
                    _ = tokio::time::sleep(OBSERVE_REFRESH) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Most observers of one node at once (the bootstrapper's map is one).
pub const MAX_OBSERVERS: usize = 8;
/// How long an observer's view waits for further changes.
const OBSERVE_COALESCE: std::time::Duration = std::time::Duration::from_millis(100);
/// An observer gets a view at least this often (link delays move).
const OBSERVE_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

static OBSERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_OBSERVERS`] places, given back on drop.
struct ObserverSlot;

impl ObserverSlot {
    fn take() -> Option<ObserverSlot> {
        use std::sync::atomic::Ordering;
        OBSERVERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_OBSERVERS).then_some(n + 1))
            .ok()
            .map(|_| ObserverSlot)
    }
}

impl Drop for ObserverSlot {
    fn drop(&mut self) {
        OBSERVERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pub struct SessionService(pub Arc<Node>);

fn session_status(e: overlay_core::session::SessionError) -> Status {
    match e {
        overlay_core::session::SessionError::Unknown(_) => Status::not_found(e.to_string()),
        overlay_core::session::SessionError::BadPhase { .. } => Status::failed_precondition(e.to_string()),
        overlay_core::session::SessionError::ForeignDestination { .. } => Status::permission_denied(e.to_string()),
        overlay_core::session::SessionError::TooMany { .. }
        | overlay_core::session::SessionError::TooManyFromAddress { .. } => Status::resource_exhausted(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::session_server::Session for SessionService {
    async fn connect_pop(&self, request: Request<pb::ConnectRequest>) -> Result<Response<pb::ConnectReply>, Status> {
        let peer =
            request.remote_addr().map(|a| a.ip()).ok_or_else(|| Status::internal("the client's address is unknown"))?;
        let client = request.into_inner().client;
        check_client_name(&client)?;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.0.with_sessions(|s| s.connect(id.clone(), client.clone(), peer, std::time::Instant::now())).map_err(
            |e| {
                warn!(pop = %self.0.id.name, %peer, "session refused: {e}");
                session_status(e)
            },
        )?;
        info!(pop = %self.0.id.name, %client, session = &id[..8], "client connected");
        Ok(Response::new(pb::ConnectReply { session_id: id, pop: self.0.id.name.clone() }))
    }

    async fn setup(&self, request: Request<pb::SetupRequest>) -> Result<Response<pb::SetupReply>, Status> {
        let span = telemetry::server_span("Setup", request.metadata());
        let peer = request.remote_addr();
        let token = crate::token::bearer(request.metadata()).map(str::to_string);
        let req = request.into_inner();
        let node = self.0.clone();
        async move {
            let peer = peer.map(|p| p.ip()).ok_or_else(|| Status::internal("the client's address is unknown"))?;
            check_name("stream", &req.stream)?;
            if let Some(verifier) = &node.settings.tokens {
                let now = crate::net::unix_us() / 1_000_000;
                match verifier.check(token.as_deref(), Action::Read, &req.stream, now) {
                    Ok(claims) => {
                        info!(pop = %node.id.name, stream = %req.stream, viewer = %shown(&claims.sub), "token accepted")
                    }
                    Err(e) => {
                        warn!(pop = %node.id.name, %peer, stream = %req.stream, "SETUP refused: {e}");
                        let message = format!("POP {}: stream {}: {e}", node.id.name, req.stream);
                        return Err(match e {
                            TokenError::NotGranted { .. } => Status::permission_denied(message),
                            _ => Status::unauthenticated(message),
                        });
                    }
                }
            }
            let host = if req.rtp_host.is_empty() {
                peer
            } else {
                req.rtp_host
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("rtp_host {} is not an IP address", shown(&req.rtp_host))))?
            };
            let port = u16::try_from(req.rtp_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Status::invalid_argument(format!("rtp_port {} is not a UDP port", req.rtp_port)))?;
            node.with_sessions(|s| s.check_setup_to(&req.session_id, host)).map_err(|e| {
                if matches!(e, overlay_core::session::SessionError::ForeignDestination { .. }) {
                    warn!(pop = %node.id.name, %peer, "SETUP refused: {e}");
                }
                session_status(e)
            })?;
            let desc = node
                .join(&req.stream, Requester::Local, Vec::new(), node.settings.data_port)
                .await
                .map_err(|nak| convert::nak_status(&nak))?;
            let dest = SocketAddr::new(host, port);
            if let Err(e) = node.with_sessions(|s| s.set_up(&req.session_id, req.stream.clone(), dest)) {
                node.leave(&req.stream, Requester::Local);
                return Err(session_status(e));
            }
            info!(pop = %node.id.name, stream = %req.stream, %dest, session = short_id(&req.session_id), "session set up");
            let source_ip = node.id.pop_addresses.first().copied().unwrap_or(node.settings.bind);
            Ok(Response::new(pb::SetupReply {
                stream: Some(convert::desc_to_wire(&desc, node.settings.data_port)),
                source: SocketAddr::new(source_ip, node.settings.data_port).to_string(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn play(&self, request: Request<pb::SessionRequest>) -> Result<Response<pb::SessionReply>, Status> {
        let id = request.into_inner().session_id;
        let phase = self.0.play(&id).map_err(session_status)?;
        info!(pop = %self.0.id.name, session = short_id(&id), "PLAY");
        Ok(Response::new(pb::SessionReply { state: phase.to_string() }))
    }

    async fn pause(&self, request: Request<pb::SessionRequest>) -> Result<Response<pb::SessionReply>, Status> {
        let id = request.into_inner().session_id;
        let phase = self.0.with_sessions(|s| s.pause(&id)).map_err(session_status)?;
        info!(pop = %self.0.id.name, session = short_id(&id), "PAUSE");
        Ok(Response::new(pb::SessionReply { state: phase.to_string() }))
    }

    async fn keepalive(&self, request: Request<pb::SessionRequest>) -> Result<Response<pb::SessionReply>, Status> {
        let id = request.into_inner().session_id;
        let phase = self.0.with_sessions(|s| s.touch(&id, std::time::Instant::now())).map_err(session_status)?;
        Ok(Response::new(pb::SessionReply { state: phase.to_string() }))
    }

    async fn teardown(&self, request: Request<pb::SessionRequest>) -> Result<Response<pb::SessionReply>, Status> {
        let id = request.into_inner().session_id;
        let session = self.0.with_sessions(|s| s.teardown(&id)).map_err(session_status)?;
        info!(pop = %self.0.id.name, session = short_id(&id), "TEARDOWN");
        if let Some(stream) = session.stream {
            self.0.leave(&stream, Requester::Local);
        }
        Ok(Response::new(pb::SessionReply { state: "closed".into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reroot(server: &str, route: &[&str]) -> pb::RerootRequest {
        pb::RerootRequest {
            stream: "test".into(),
            sender: "o8".into(),
            server: server.into(),
            route: route.iter().map(|n| n.to_string()).collect(),
            delay_us: 0,
            repairing: false,
        }
    }

    #[test]
    fn a_give_up_notice_names_no_server_and_is_taken() {
        assert!(check_reroot(&reroot("", &[])).is_ok());
        assert!(check_reroot(&reroot("s1", &["o2", "s1"])).is_ok());
    }

    #[test]
    fn a_repairing_notice_carries_no_route() {
        assert!(check_reroot(&pb::RerootRequest { repairing: true, ..reroot("", &[]) }).is_ok());
        let err = check_reroot(&pb::RerootRequest { repairing: true, ..reroot("s1", &["s1", "o2"]) }).unwrap_err();
        assert!(err.message().contains("repairing"), "{}", err.message());
    }

    #[test]
    fn a_route_without_its_server_or_a_bad_name_is_refused() {
        let err = check_reroot(&reroot("", &["o2", "s1"])).unwrap_err();
        assert!(err.message().contains("server is empty"), "{}", err.message());
        let err = check_reroot(&reroot("s1", &["o2", "bad name"])).unwrap_err();
        assert!(err.message().contains("route"), "{}", err.message());
    }
}
