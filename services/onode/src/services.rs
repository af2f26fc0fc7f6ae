//! gRPC service implementations of a node: the overlay service offered to
//! neighbours and the session service a POP offers to clients. They
//! translate between wire messages and the node driver; no protocol logic.

use std::net::SocketAddr;
use std::sync::Arc;

use overlay_core::tree::Requester;
use overlay_proto as pb;
use rand::RngCore;
use tonic::{Request, Response, Status};
use tracing::{info, Instrument};

use crate::convert;
use crate::node::Node;

pub struct OverlayService(pub Arc<Node>);

#[tonic::async_trait]
impl pb::overlay_server::Overlay for OverlayService {
    async fn ping(&self, _request: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        Ok(Response::new(pb::PingReply { name: self.0.id.name.clone() }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let span = telemetry::server_span("Join", request.metadata());
        let req = request.into_inner();
        let node = self.0.clone();
        async move {
            if node.id.neighbours.iter().all(|n| n.name != req.sender) {
                return Err(Status::permission_denied(format!(
                    "node {}: {:?} is not a neighbour",
                    node.id.name, req.sender
                )));
            }
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
        let req = request.into_inner();
        self.0.leave(&req.stream, Requester::Neighbour(req.sender));
        Ok(Response::new(pb::LeaveReply {}))
    }

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<pb::RefreshReply>, Status> {
        let req = request.into_inner();
        let packets = self.0.refresh(&req.stream, &req.sender) as u32;
        Ok(Response::new(pb::RefreshReply { packets }))
    }

    async fn reroot(&self, request: Request<pb::RerootRequest>) -> Result<Response<pb::RerootReply>, Status> {
        let req = request.into_inner();
        self.0.rerooted(&req.stream, &req.sender, &req.server, &req.route);
        Ok(Response::new(pb::RerootReply {}))
    }

    async fn inspect(&self, _request: Request<pb::InspectRequest>) -> Result<Response<pb::InspectReply>, Status> {
        Ok(Response::new(pb::InspectReply { json: self.0.inspect().to_string() }))
    }
}

pub struct SessionService(pub Arc<Node>);

fn session_status(e: overlay_core::session::SessionError) -> Status {
    match e {
        overlay_core::session::SessionError::Unknown(_) => Status::not_found(e.to_string()),
        overlay_core::session::SessionError::BadPhase { .. } => Status::failed_precondition(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::session_server::Session for SessionService {
    async fn connect_pop(&self, request: Request<pb::ConnectRequest>) -> Result<Response<pb::ConnectReply>, Status> {
        let client = request.into_inner().client;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.0.with_sessions(|s| s.connect(id.clone(), client.clone(), std::time::Instant::now()));
        info!(pop = %self.0.id.name, %client, session = &id[..8], "client connected");
        Ok(Response::new(pb::ConnectReply { session_id: id, pop: self.0.id.name.clone() }))
    }

    async fn setup(&self, request: Request<pb::SetupRequest>) -> Result<Response<pb::SetupReply>, Status> {
        let span = telemetry::server_span("Setup", request.metadata());
        let peer = request.remote_addr();
        let req = request.into_inner();
        let node = self.0.clone();
        async move {
            let host = if req.rtp_host.is_empty() {
                peer.map(|p| p.ip()).ok_or_else(|| Status::invalid_argument("rtp_host is empty and the peer address is unknown"))?
            } else {
                req.rtp_host.parse().map_err(|_| Status::invalid_argument(format!("rtp_host {:?} is not an IP address", req.rtp_host)))?
            };
            let port = u16::try_from(req.rtp_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Status::invalid_argument(format!("rtp_port {} is not a UDP port", req.rtp_port)))?;
            if req.stream.is_empty() {
                return Err(Status::invalid_argument("stream is empty"));
            }
            node.with_sessions(|s| s.check_setup(&req.session_id)).map_err(session_status)?;
            let desc = node
                .join(&req.stream, Requester::Local, Vec::new(), node.settings.data_port)
                .await
                .map_err(|nak| convert::nak_status(&nak))?;
            let dest = SocketAddr::new(host, port);
            if let Err(e) = node.with_sessions(|s| s.set_up(&req.session_id, req.stream.clone(), dest)) {
                node.leave(&req.stream, Requester::Local);
                return Err(session_status(e));
            }
            info!(pop = %node.id.name, stream = %req.stream, %dest, session = &req.session_id[..8.min(req.session_id.len())], "session set up");
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
        info!(pop = %self.0.id.name, session = &id[..8.min(id.len())], "PLAY");
        Ok(Response::new(pb::SessionReply { state: phase.to_string() }))
    }

    async fn pause(&self, request: Request<pb::SessionRequest>) -> Result<Response<pb::SessionReply>, Status> {
        let id = request.into_inner().session_id;
        let phase = self.0.with_sessions(|s| s.pause(&id)).map_err(session_status)?;
        info!(pop = %self.0.id.name, session = &id[..8.min(id.len())], "PAUSE");
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
        info!(pop = %self.0.id.name, session = &id[..8.min(id.len())], "TEARDOWN");
        if let Some(stream) = session.stream {
            self.0.leave(&stream, Requester::Local);
        }
        Ok(Response::new(pb::SessionReply { state: "closed".into() }))
    }
}
