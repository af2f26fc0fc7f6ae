//! The bootstrapper: holds the topology, answers registrations with each
//! node's neighbours, tracks who is alive through their watch streams,
//! announces failures, and answers client logins with the live POPs.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use overlay_core::membership::{Change, Membership};
use overlay_core::topology::{NodeSpec, Topology};
use overlay_proto as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::link::LinkMaster;
use crate::node::{Identity, Neighbour};
use crate::services::{check_client_name, check_name, operator, shown};
use crate::tls::Peer;

pub struct Bootstrapper {
    topology: Topology,
    members: Mutex<Membership>,
    events: broadcast::Sender<pb::OverlayEvent>,
    probe_interval: Duration,
    control_port: u16,
    /// Whether callers are authenticated by TLS certificates.
    tls: bool,
    /// Where the links' datagram keys come from (with TLS only: a key sent
    /// in the clear would protect nothing).
    links: Option<LinkMaster>,
}

fn event(change: &Change) -> pb::OverlayEvent {
    use pb::overlay_event::Event;
    let event = match change {
        Change::Joined(n) => Event::NodeJoined(pb::NodeJoined { name: n.clone() }),
        Change::Ready => Event::Ready(pb::OverlayReady {}),
        Change::Failed(n) => Event::NodeFailed(pb::NodeFailed { name: n.clone() }),
    };
    pb::OverlayEvent { event: Some(event) }
}

/// Builds a node's identity from its topology entry, with the keys of its
/// links if there is a `master`.
pub fn identity(spec: &NodeSpec, probe_interval: Duration, master: Option<&LinkMaster>) -> Identity {
    Identity {
        name: spec.name.clone(),
        names: spec.names.clone(),
        pop_addresses: spec.pop.clone(),
        server: spec.server,
        neighbours: spec
            .neighbours
            .iter()
            .map(|n| Neighbour {
                name: n.name.clone(),
                address: n.address,
                server: n.server,
                link_key: master.map(|m| m.key(&spec.name, &n.name)),
            })
            .collect(),
        probe_interval,
    }
}

/// Checks that the role a node was started as fits its topology entry.
pub fn check_role(spec: &NodeSpec, role: &str) -> Result<(), String> {
    let expected = if spec.server {
        "server"
    } else if spec.is_pop() {
        "pop"
    } else {
        "node"
    };
    if role == expected {
        Ok(())
    } else {
        Err(format!("node {} is declared a {expected} in the topology but was started as {role:?}", spec.name))
    }
}

impl Bootstrapper {
    /// A bootstrapper; `links` is given with TLS, to hand out link keys.
    pub fn new(
        topology: Topology,
        probe_interval: Duration,
        control_port: u16,
        links: Option<LinkMaster>,
    ) -> Arc<Self> {
        let declared = topology.nodes().map(|n| n.name.clone());
        let (events, _) = broadcast::channel(256);
        Arc::new(Bootstrapper {
            members: Mutex::new(Membership::new(declared)),
            topology,
            events,
            probe_interval,
            control_port,
            tls: links.is_some(),
            links,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::OverlayEvent> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a node; returns its registration number.
    pub fn register(&self, name: &str) -> u64 {
        let (generation, changes) = self.lock().register(name);
        for c in &changes {
            match c {
                Change::Ready => info!("every declared node has registered: overlay ready"),
                Change::Joined(n) => info!(node = %n, "node registered"),
                Change::Failed(_) => {}
            }
            let _ = self.events.send(event(c));
        }
        generation
    }

    fn watch_ended(&self, name: &str, generation: u64) {
        let change = self.lock().watch_ended(name, generation);
        if let Some(c) = change {
            warn!(node = %name, "node went away: telling the overlay");
            let _ = self.events.send(event(&c));
        }
    }

    /// The node a Register or Watch comes from. With TLS it is the node its
    /// certificate names, and a name in the request must be the same one.
    /// Without TLS, an explicit name is taken as given (NAT, containers),
    /// else the node owning the request's source address.
    fn caller<T>(&self, request: &Request<T>, name: &str) -> Result<&NodeSpec, Status> {
        if self.tls {
            return match Peer::of(request) {
                Peer::Node(cert) if name.is_empty() || name == cert => self
                    .topology
                    .node(&cert)
                    .ok_or_else(|| Status::permission_denied(format!("node {cert} is not in the topology"))),
                Peer::Node(cert) => {
                    Err(Status::permission_denied(format!("the caller is node {cert} but asks as {}", shown(name))))
                }
                other => Err(Status::unauthenticated(format!(
                    "only overlay nodes may register or watch, and the caller is {other}"
                ))),
            };
        }
        if !name.is_empty() {
            check_name("node name", name)?;
        }
        self.identify(name, request.remote_addr().map(|a| a.ip()))
    }

    /// Finds the registering node by explicit name or by the address the
    /// request came from.
    fn identify(&self, name: &str, peer: Option<IpAddr>) -> Result<&NodeSpec, Status> {
        if !name.is_empty() {
            return self
                .topology
                .node(name)
                .ok_or_else(|| Status::not_found(format!("node {name:?} is not in the topology")));
        }
        let peer = peer.ok_or_else(|| Status::invalid_argument("no name given and the peer address is unknown"))?;
        self.topology.owner_of(peer).ok_or_else(|| {
            Status::not_found(format!("address {peer} is not among any node's names; start the node with --name"))
        })
    }
}

pub struct BootstrapService(pub Arc<Bootstrapper>);

#[tonic::async_trait]
impl pb::bootstrap_server::Bootstrap for BootstrapService {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterReply>, Status> {
        let b = &self.0;
        let spec = b.caller(&request, &request.get_ref().name)?;
        let req = request.get_ref();
        if req.role.len() > 16 {
            return Err(Status::invalid_argument(format!("role {} is not server, node or pop", shown(&req.role))));
        }
        check_role(spec, &req.role).map_err(Status::failed_precondition)?;
        let id = identity(spec, b.probe_interval, b.links.as_ref());
        b.register(&spec.name);
        let ready = b.lock().is_ready();
        Ok(Response::new(pb::RegisterReply {
            name: id.name,
            names: id.names.iter().map(|a| a.to_string()).collect(),
            pop_addresses: id.pop_addresses.iter().map(|a| a.to_string()).collect(),
            server: id.server,
            neighbours: id
                .neighbours
                .iter()
                .map(|n| pb::Neighbour {
                    name: n.name.clone(),
                    address: n.address.to_string(),
                    server: n.server,
                    link_key: n.link_key.as_ref().map(|k| k.0.to_vec()).unwrap_or_default(),
                })
                .collect(),
            probe_interval_ms: b.probe_interval.as_millis() as u32,
            ready,
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::OverlayEvent, Status>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let name = self.0.caller(&request, &request.get_ref().name)?.name.clone();
        let generation = self
            .0
            .lock()
            .generation(&name)
            .ok_or_else(|| Status::failed_precondition(format!("node {name:?} has not registered")))?;
        let (tx, rx) = mpsc::channel(64);
        let mut events = self.0.subscribe();
        let b = self.0.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    ev = events.recv() => match ev {
                        Ok(ev) => if tx.send(Ok(ev)).await.is_err() { break },
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
            b.watch_ended(&name, generation);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginReply>, Status> {
        let req = request.into_inner();
        check_client_name(&req.client)?;
        if !req.stream.is_empty() {
            check_name("stream", &req.stream)?;
        }
        let m = self.0.lock();
        let pops: Vec<pb::Pop> = self
            .0
            .topology
            .nodes()
            .filter(|n| n.is_pop() && m.is_alive(&n.name))
            .map(|n| pb::Pop { name: n.name.clone(), addresses: n.pop.iter().map(|a| a.to_string()).collect() })
            .collect();
        info!(client = %req.client, stream = %req.stream, pops = pops.len(), "client login");
        Ok(Response::new(pb::LoginReply { pops, control_port: u32::from(self.0.control_port) }))
    }

    async fn overview(&self, request: Request<pb::OverviewRequest>) -> Result<Response<pb::OverviewReply>, Status> {
        operator(self.0.tls, "the bootstrapper", &request)?;
        let m = self.0.lock();
        Ok(Response::new(pb::OverviewReply {
            ready: m.is_ready(),
            registered: m.alive().cloned().collect(),
            failed: m.failed().cloned().collect(),
            missing: m.missing().cloned().collect(),
        }))
    }
}
