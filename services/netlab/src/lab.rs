//! The lab description: hosts and routers, point-to-point links, LANs,
//! per-link impairment and the roles that run on the hosts; parsed from
//! JSON and validated into a [`Lab`] that the planner and the runner use.
//!
//! Every check names the host, link, LAN, role or field at fault, so a
//! mistake in a lab file is found from the message alone. The format is
//! documented in netns/README.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::addr::{IfAddr, Net};
pub use crate::routes::Attachment;
use crate::routes::{self, Route, Subnet};
use overlay_core::topology::{Topology, TopologyError};

/// Longest host or LAN name: interface names are `v-<peer>` / `l-<lan>` /
/// `p-<host>` and the kernel allows 15 characters.
pub const MAX_NAME: usize = 12;

/// The lab file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    /// Free text shown by `status`.
    #[serde(default)]
    pub description: String,
    /// The overlay topology file (original JSON format), relative to the lab
    /// file; handed to the bootstrapper.
    #[serde(default)]
    pub overlay: Option<String>,
    /// The bootstrapper address that every other role and every client is
    /// given; default: the bootstrapper host's first address.
    #[serde(default)]
    pub bootstrap: Option<Ipv4Addr>,
    #[serde(default = "default_control_port")]
    pub control_port: u16,
    #[serde(default = "default_data_port")]
    pub data_port: u16,
    pub hosts: Vec<HostSpec>,
    #[serde(default)]
    pub links: Vec<LinkSpec>,
    #[serde(default)]
    pub lans: Vec<LanSpec>,
    #[serde(default)]
    pub roles: Vec<RoleSpec>,
}

fn default_control_port() -> u16 {
    7070
}

fn default_data_port() -> u16 {
    7071
}

fn default_cost() -> u32 {
    1
}

/// A network namespace of the lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    #[serde(default)]
    pub kind: HostKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// Runs roles (servers, relays, POPs, clients); also forwards.
    #[default]
    Host,
    /// Only forwards IP packets.
    Router,
}

/// A point-to-point link: one subnet, two endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub a: EndpointSpec,
    pub b: EndpointSpec,
    /// Impairment of both directions (an endpoint's `impair_out` overrides
    /// it field by field for the packets that endpoint sends).
    #[serde(default)]
    pub impair: Impairment,
    /// Routing cost of the link (shortest paths add these up).
    #[serde(default = "default_cost")]
    pub cost: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub host: String,
    /// Address with prefix length, like `10.0.18.2/24`.
    pub addr: String,
    /// Impairment of the packets this endpoint sends on the link.
    #[serde(default)]
    pub impair_out: Impairment,
}

/// Link impairment of one direction (or both); every field optional. A
/// link with any of them set runs through a link emulator (linkem) in a
/// namespace of its own, which applies them all; a field set to 0 still
/// puts the emulator there, so `netlab link-set` can change it later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impairment {
    /// Random loss, percent (0-100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// Rate limit in kbit/s (Ethernet frames), with tail drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_kbit: Option<u64>,
    /// One-way delay in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// Delay variation in ms: each packet's delay is uniform in delay ±
    /// jitter; packets keep their order unless `reorder` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// The rate limit's queue, in ms of sending at the rate (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// Let jitter reorder packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorder: Option<bool>,
}

impl Impairment {
    /// Fields of `self`, falling back to `base` where unset.
    pub fn over(&self, base: &Impairment) -> Impairment {
        Impairment {
            loss_pct: self.loss_pct.or(base.loss_pct),
            rate_kbit: self.rate_kbit.or(base.rate_kbit),
            delay_ms: self.delay_ms.or(base.delay_ms),
            jitter_ms: self.jitter_ms.or(base.jitter_ms),
            queue_ms: self.queue_ms.or(base.queue_ms),
            reorder: self.reorder.or(base.reorder),
        }
    }

    /// Whether any field is set.
    pub fn is_set(&self) -> bool {
        *self != Impairment::default()
    }

    /// The emulator's settings change with the same fields.
    pub fn to_update(&self) -> linkem::Update {
        linkem::Update {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            loss_pct: self.loss_pct,
            rate_kbit: self.rate_kbit,
            queue_ms: self.queue_ms,
            reorder: self.reorder,
        }
    }
}

impl From<linkem::Update> for Impairment {
    fn from(u: linkem::Update) -> Self {
        let linkem::Update { delay_ms, jitter_ms, loss_pct, rate_kbit, queue_ms, reorder } = u;
        Impairment { delay_ms, jitter_ms, loss_pct, rate_kbit, queue_ms, reorder }
    }
}

/// A LAN: a bridge joining several hosts on one subnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanSpec {
    pub name: String,
    pub members: Vec<MemberSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    pub host: String,
    pub addr: String,
}

/// What runs on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub host: String,
    pub role: RoleKind,
    /// Overlay node name (`--name`); default: the host's name. Not for
    /// clients.
    #[serde(default)]
    pub name: Option<String>,
    /// Extra arguments appended to the command line.
    #[serde(default)]
    pub args: Vec<String>,
    /// Clients: the stream to watch.
    #[serde(default)]
    pub stream: Option<String>,
    /// Clients: seconds after the overlay is ready that the demo starts it.
    #[serde(default)]
    pub start_s: Option<f64>,
    /// Clients: how long the demo lets it watch, seconds (default 12).
    #[serde(default)]
    pub duration_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleKind {
    /// `onode server --topology FILE`: holds the overlay file.
    Bootstrapper,
    /// `onode server --bootstrap ADDR`.
    Server,
    /// `onode node --bootstrap ADDR`: a relay.
    Node,
    /// `onode pop --bootstrap ADDR`.
    Pop,
    /// `oclient --bootstrap ADDR STREAM`.
    Client,
}

impl RoleKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RoleKind::Bootstrapper => "bootstrapper",
            RoleKind::Server => "server",
            RoleKind::Node => "node",
            RoleKind::Pop => "pop",
            RoleKind::Client => "client",
        }
    }

    /// Whether this role is an overlay node (named in the overlay file).
    pub fn is_overlay_node(&self) -> bool {
        !matches!(self, RoleKind::Client)
    }

    /// Whether this role serves streams (the bootstrapper is a server too).
    pub fn is_server(&self) -> bool {
        matches!(self, RoleKind::Bootstrapper | RoleKind::Server)
    }
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with a lab file; each names the place at fault.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line} column {column}: {message}")]
    Json { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{place}: {message}")]
    Invalid { place: String, message: String },
    #[error("overlay file {path}: {source}")]
    Overlay { path: PathBuf, source: TopologyError },
}

fn invalid(place: impl Into<String>, message: impl Into<String>) -> LabError {
    LabError::Invalid { place: place.into(), message: message.into() }
}

/// A validated lab.
#[derive(Debug, Clone)]
pub struct Lab {
    pub spec: LabSpec,
    /// Where the lab file was (the overlay path is relative to it).
    pub file: Option<PathBuf>,
    pub hosts: Vec<Host>,
    /// Links first (in file order), then LANs.
    pub segments: Vec<Segment>,
    pub roles: Vec<Role>,
    pub overlay: Option<Topology>,
    pub overlay_path: Option<PathBuf>,
    /// The overlay file's text, kept so the lab state needs no files.
    pub overlay_text: Option<String>,
    pub bootstrap: Option<Ipv4Addr>,
    /// Per host, its routes to every subnet it is not on.
    pub routes: Vec<Vec<Route>>,
    /// Things the lab asks for that this machine cannot do.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    pub kind: HostKind,
    pub ifaces: Vec<Iface>,
}

/// An interface of a host: its name inside the host's namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Iface {
    pub name: String,
    pub addr: IfAddr,
    pub segment: usize,
}

/// A subnet of the lab: a link or a LAN.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// `link o3-r1` or `lan lan7`, for messages.
    pub label: String,
    pub net: Net,
    pub cost: u32,
    pub members: Vec<Attachment>,
    pub kind: SegmentKind,
}

impl Segment {
    /// A link's impairment of what members[0] and members[1] send, when
    /// the link runs through an emulator (any impairment field set).
    pub fn emulated(&self) -> Option<&[Impairment; 2]> {
        match &self.kind {
            SegmentKind::Link { out } if out.iter().any(Impairment::is_set) => Some(out),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SegmentKind {
    /// Impairment of the packets members[0] sends, and of those members[1]
    /// sends.
    Link { out: [Impairment; 2] },
    /// A bridge in its own namespace; `ports[i]` is members[i]'s port on it.
    Lan { name: String, ports: Vec<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    pub host: usize,
    pub kind: RoleKind,
    /// Overlay node name (clients: the host name).
    pub name: String,
    pub args: Vec<String>,
    pub stream: Option<String>,
    pub start_s: f64,
    pub duration_s: f64,
}

fn check_name(place: &str, name: &str) -> Result<(), LabError> {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if name.is_empty() || name.len() > MAX_NAME || !ok_chars || !starts {
        return Err(invalid(
            format!("{place} {name:?}"),
            format!("a name is 1 to {MAX_NAME} characters of a-z, 0-9 and '-', starting with a letter"),
        ));
    }
    Ok(())
}

fn check_impairment(place: &str, imp: &Impairment) -> Result<(), LabError> {
    if let Some(l) = imp.loss_pct {
        if !(0.0..=100.0).contains(&l) {
            return Err(invalid(place, format!("field loss_pct: {l} is not a percentage from 0 to 100")));
        }
    }
    if imp.rate_kbit == Some(0) {
        return Err(invalid(place, "field rate_kbit: must be more than 0"));
    }
    for (field, v) in [("delay_ms", imp.delay_ms), ("jitter_ms", imp.jitter_ms)] {
        if let Some(v) = v {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(place, format!("field {field}: {v} must be 0 or more")));
            }
        }
    }
    if let Some(q) = imp.queue_ms {
        if !(q > 0.0 && q.is_finite()) {
            return Err(invalid(place, format!("field queue_ms: {q} must be more than 0")));
        }
    }
    Ok(())
}

impl Lab {
    /// The names of the roles that serve streams, the bootstrapper included:
    /// any of them may root a stream's tree.
    pub fn server_names(&self) -> Vec<String> {
        self.roles.iter().filter(|r| r.kind.is_server()).map(|r| r.name.clone()).collect()
    }

    /// Reads, parses and validates a lab file (and its overlay file).
    pub fn load(path: &Path) -> Result<Lab, LabError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| LabError::Read { path: path.to_path_buf(), source })?;
        let spec: LabSpec = serde_json::from_str(&text).map_err(|e| LabError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        Lab::from_spec(spec, Some(path))
    }

    /// Validates a parsed lab; `file` locates the overlay file.
    pub fn from_spec(spec: LabSpec, file: Option<&Path>) -> Result<Lab, LabError> {
        let overlay = match &spec.overlay {
            None => None,
            Some(rel) => {
                let base = file.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
                let path = base.join(rel);
                let text =
                    std::fs::read_to_string(&path).map_err(|source| LabError::Read { path: path.clone(), source })?;
                Some((path, text))
            }
        };
        Lab::from_parts(spec, file, overlay)
    }

    /// Validates a parsed lab whose overlay file (path, text) is already read.
    pub fn from_parts(
        spec: LabSpec,
        file: Option<&Path>,
        overlay_file: Option<(PathBuf, String)>,
    ) -> Result<Lab, LabError> {
        let warnings = Vec::new();

        // Hosts.
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut hosts = Vec::new();
        for h in &spec.hosts {
            check_name("host", &h.name)?;
            if index.insert(h.name.clone(), hosts.len()).is_some() {
                return Err(invalid(format!("host {}", h.name), "declared twice"));
            }
            hosts.push(Host { name: h.name.clone(), kind: h.kind, ifaces: Vec::new() });
        }
        let host_of = |place: &str, name: &str| -> Result<usize, LabError> {
            index.get(name).copied().ok_or_else(|| invalid(place, format!("unknown host {name:?}")))
        };
        let parse_addr = |place: &str, value: &str| -> Result<IfAddr, LabError> {
            value.parse::<IfAddr>().map_err(|e| invalid(place, format!("field addr: {e}")))
        };

        let mut segments: Vec<Segment> = Vec::new();
        let mut addr_owner: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
        let mut claim_addr = |place: &str, a: Ipv4Addr| -> Result<(), LabError> {
            if let Some(other) = addr_owner.get(&a) {
                return Err(invalid(place, format!("address {a} is already used by {other}")));
            }
            addr_owner.insert(a, place.to_string());
            Ok(())
        };

        // Links.
        let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
        for (i, l) in spec.links.iter().enumerate() {
            let label = format!("link {} ({}-{})", i + 1, l.a.host, l.b.host);
            let a = host_of(&format!("{label}: endpoint a"), &l.a.host)?;
            let b = host_of(&format!("{label}: endpoint b"), &l.b.host)?;
            if a == b {
                return Err(invalid(&label, "both ends are on the same host"));
            }
            if !pairs.insert((a.min(b), a.max(b))) {
                return Err(invalid(
                    &label,
                    format!("a second link between {} and {} (one link per pair of hosts)", l.a.host, l.b.host),
                ));
            }
            let aa = parse_addr(&format!("{label}: endpoint a ({})", l.a.host), &l.a.addr)?;
            let ba = parse_addr(&format!("{label}: endpoint b ({})", l.b.host), &l.b.addr)?;
            if aa.net() != ba.net() {
                return Err(invalid(&label, format!("{aa} and {ba} are not on one subnet")));
            }
            if l.cost == 0 {
                return Err(invalid(&label, "field cost: must be 1 or more"));
            }
            check_impairment(&format!("{label}: impair"), &l.impair)?;
            check_impairment(&format!("{label}: endpoint a ({}): impair_out", l.a.host), &l.a.impair_out)?;
            check_impairment(&format!("{label}: endpoint b ({}): impair_out", l.b.host), &l.b.impair_out)?;
            claim_addr(&format!("{label} at {}", l.a.host), aa.addr)?;
            claim_addr(&format!("{label} at {}", l.b.host), ba.addr)?;
            let out = [l.a.impair_out.over(&l.impair), l.b.impair_out.over(&l.impair)];
            let ia = format!("v-{}", l.b.host);
            let ib = format!("v-{}", l.a.host);
            let seg = segments.len();
            hosts[a].ifaces.push(Iface { name: ia.clone(), addr: aa, segment: seg });
            hosts[b].ifaces.push(Iface { name: ib.clone(), addr: ba, segment: seg });
            segments.push(Segment {
                label: format!("link {}-{}", l.a.host, l.b.host),
                net: aa.net(),
                cost: l.cost,
                members: vec![
                    Attachment { host: a, iface: ia, addr: aa.addr },
                    Attachment { host: b, iface: ib, addr: ba.addr },
                ],
                kind: SegmentKind::Link { out },
            });
        }

        // LANs.
        let mut lan_names = BTreeSet::new();
        for lan in &spec.lans {
            check_name("lan", &lan.name)?;
            let label = format!("lan {}", lan.name);
            if index.contains_key(&lan.name) {
                return Err(invalid(&label, "has the name of a host (LANs get a namespace of their own)"));
            }
            if !lan_names.insert(lan.name.clone()) {
                return Err(invalid(&label, "declared twice"));
            }
            if lan.members.len() < 2 {
                return Err(invalid(&label, "needs at least two members"));
            }
            let seg = segments.len();
            let mut net: Option<Net> = None;
            let mut members = Vec::new();
            let mut ports = Vec::new();
            let mut seen = BTreeSet::new();
            for m in &lan.members {
                let place = format!("{label}: member {}", m.host);
                let h = host_of(&place, &m.host)?;
                if !seen.insert(h) {
                    return Err(invalid(&place, "is a member twice"));
                }
                let a = parse_addr(&place, &m.addr)?;
                match net {
                    None => net = Some(a.net()),
                    Some(n) if n != a.net() => {
                        return Err(invalid(&place, format!("{a} is not on the LAN's subnet {n}")))
                    }
                    Some(_) => {}
                }
                claim_addr(&format!("{label} at {}", m.host), a.addr)?;
                let iface = format!("l-{}", lan.name);
                hosts[h].ifaces.push(Iface { name: iface.clone(), addr: a, segment: seg });
                members.push(Attachment { host: h, iface, addr: a.addr });
                ports.push(format!("p-{}", m.host));
            }
            segments.push(Segment {
                label: label.clone(),
                net: net.expect("a LAN has members"),
                cost: 1,
                members,
                kind: SegmentKind::Lan { name: lan.name.clone(), ports },
            });
        }

        // One subnet per segment, no overlaps.
        for (i, s) in segments.iter().enumerate() {
            for t in &segments[..i] {
                if s.net.overlaps(&t.net) {
                    return Err(invalid(
                        &s.label,
                        format!("subnet {} overlaps subnet {} of {}", s.net, t.net, t.label),
                    ));
                }
            }
        }
        for h in &hosts {
            if h.ifaces.is_empty() {
                return Err(invalid(format!("host {}", h.name), "has no link and is on no LAN"));
            }
            let mut names = BTreeSet::new();
            for i in &h.ifaces {
                if !names.insert(&i.name) {
                    return Err(invalid(
                        format!("host {}", h.name),
                        format!("two interfaces would both be called {}", i.name),
                    ));
                }
            }
        }

        let host_names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        let subnets: Vec<Subnet> =
            segments.iter().map(|s| Subnet { net: s.net, cost: s.cost, members: &s.members }).collect();
        let routes = routes::compute(&host_names, &subnets).map_err(|u| {
            invalid(
                format!("host {}", hosts[u.host].name),
                format!(
                    "cannot reach subnet {} ({}): the lab's hosts are not all connected",
                    segments[u.segment].net, segments[u.segment].label
                ),
            )
        })?;

        // Roles.
        let mut roles = Vec::new();
        let mut overlay_names = BTreeMap::new();
        for (i, r) in spec.roles.iter().enumerate() {
            let place = format!("role {} ({} on {})", i + 1, r.role, r.host);
            let h = host_of(&place, &r.host)?;
            if hosts[h].kind == HostKind::Router {
                return Err(invalid(&place, "a router runs no role"));
            }
            let is_client = r.role == RoleKind::Client;
            if is_client {
                if r.stream.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(&place, "field stream: a client needs a stream"));
                }
                if r.name.is_some() {
                    return Err(invalid(&place, "field name: only overlay nodes have one"));
                }
            } else {
                for (field, set) in [
                    ("stream", r.stream.is_some()),
                    ("start_s", r.start_s.is_some()),
                    ("duration_s", r.duration_s.is_some()),
                ] {
                    if set {
                        return Err(invalid(&place, format!("field {field}: only for clients")));
                    }
                }
            }
            for (field, v) in [("start_s", r.start_s), ("duration_s", r.duration_s)] {
                if let Some(v) = v {
                    if !(v >= 0.0 && v.is_finite()) {
                        return Err(invalid(&place, format!("field {field}: {v} must be 0 or more")));
                    }
                }
            }
            let name = r.name.clone().unwrap_or_else(|| r.host.clone());
            if !is_client {
                if let Some(prev) = overlay_names.insert(name.clone(), i) {
                    return Err(invalid(&place, format!("overlay node {name} already runs as role {}", prev + 1)));
                }
            }
            roles.push(Role {
                host: h,
                kind: r.role,
                name,
                args: r.args.clone(),
                stream: r.stream.clone(),
                start_s: r.start_s.unwrap_or(0.0),
                duration_s: r.duration_s.unwrap_or(12.0),
            });
        }
        let boots: Vec<&Role> = roles.iter().filter(|r| r.kind == RoleKind::Bootstrapper).collect();
        if !roles.is_empty() && boots.len() != 1 {
            return Err(invalid("roles", format!("need exactly one bootstrapper, found {}", boots.len())));
        }
        let bootstrap = match boots.first() {
            None => None,
            Some(b) => {
                let host = &hosts[b.host];
                match spec.bootstrap {
                    Some(a) if host.ifaces.iter().any(|i| i.addr.addr == a) => Some(a),
                    Some(a) => {
                        return Err(invalid(
                            "field bootstrap",
                            format!("{a} is not an address of the bootstrapper's host {}", host.name),
                        ))
                    }
                    None => Some(host.ifaces[0].addr.addr),
                }
            }
        };

        // Overlay file and its agreement with the lab.
        if overlay_file.is_none() && !boots.is_empty() {
            return Err(invalid("field overlay", "the bootstrapper needs an overlay topology file"));
        }
        let (overlay, overlay_path, overlay_text) = match overlay_file {
            None => (None, None, None),
            Some((path, text)) => {
                let o = Topology::parse(&text).map_err(|source| LabError::Overlay { path: path.clone(), source })?;
                (Some(o), Some(path), Some(text))
            }
        };
        if let Some(o) = &overlay {
            for n in o.nodes() {
                let place = format!("overlay node {}", n.name);
                let Some(role) = roles.iter().find(|r| r.kind.is_overlay_node() && r.name == n.name) else {
                    return Err(invalid(place, "has no role in the lab"));
                };
                let host = &hosts[role.host];
                for a in &n.names {
                    if !host.ifaces.iter().any(|i| IpAddr::V4(i.addr.addr) == *a) {
                        return Err(invalid(
                            place,
                            format!("name {a} is not an address of host {} in the lab", host.name),
                        ));
                    }
                }
                let is_pop = !n.pop.is_empty();
                if is_pop != (role.kind == RoleKind::Pop) {
                    return Err(invalid(
                        place,
                        format!(
                            "its pop list is {}, but its role is {}",
                            if is_pop { "not empty" } else { "empty" },
                            role.kind
                        ),
                    ));
                }
            }
            for r in roles.iter().filter(|r| r.kind.is_overlay_node()) {
                if o.node(&r.name).is_none() {
                    return Err(invalid(
                        format!("role {} on {}", r.kind, hosts[r.host].name),
                        format!("overlay node {} is not in the overlay file", r.name),
                    ));
                }
            }
        }

        Ok(Lab {
            spec,
            file: file.map(Path::to_path_buf),
            hosts,
            segments,
            roles,
            overlay,
            overlay_path,
            overlay_text,
            bootstrap,
            routes,
            warnings,
        })
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// The host that runs overlay node `name`.
    pub fn host_of_node(&self, name: &str) -> Option<usize> {
        self.roles.iter().find(|r| r.kind.is_overlay_node() && r.name == name).map(|r| r.host)
    }

    /// Every address of every host.
    pub fn all_addresses(&self) -> Vec<(usize, Ipv4Addr)> {
        self.hosts.iter().enumerate().flat_map(|(i, h)| h.ifaces.iter().map(move |f| (i, f.addr.addr))).collect()
    }

    /// The POP address a client's host is expected to choose: the address of
    /// a POP role's host on one of the client host's subnets.
    pub fn local_pop(&self, client_host: usize) -> Option<Ipv4Addr> {
        let segs: Vec<usize> = self.hosts[client_host].ifaces.iter().map(|i| i.segment).collect();
        self.roles
            .iter()
            .filter(|r| r.kind == RoleKind::Pop)
            .flat_map(|r| self.hosts[r.host].ifaces.iter())
            .find(|i| segs.contains(&i.segment))
            .map(|i| i.addr.addr)
    }
}

/// A lab shipped in `netns/labs`, for tests.
impl Lab {
    /// The hosts a packet from host `from` to `dst` visits, following the
    /// lab's routes (for tests and `netlab status`); `None` when it would
    /// loop or dead-end.
    pub fn trace(&self, from: usize, dst: Ipv4Addr) -> Option<Vec<usize>> {
        let mut path = vec![from];
        let mut at = from;
        loop {
            let host = &self.hosts[at];
            if host.ifaces.iter().any(|i| i.addr.addr == dst) {
                return Some(path);
            }
            let on_link = host.ifaces.iter().any(|i| self.segments[i.segment].net.contains(dst));
            let next_addr = if on_link { dst } else { self.routes[at].iter().find(|r| r.dest.contains(dst))?.via };
            let next = self.hosts.iter().position(|h| h.ifaces.iter().any(|i| i.addr.addr == next_addr))?;
            if path.contains(&next) {
                return None;
            }
            path.push(next);
            at = next;
        }
    }
}

#[cfg(test)]
pub(crate) fn shipped(name: &str) -> Lab {
    Lab::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netns/labs").join(name))
        .unwrap_or_else(|e| panic!("netns/labs/{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(json: &str) -> Result<Lab, LabError> {
        let spec: LabSpec = serde_json::from_str(json).expect("test JSON parses");
        Lab::from_spec(spec, None)
    }

    fn err(json: &str) -> String {
        lab(json).expect_err("lab should be refused").to_string()
    }

    const TWO: &str = r#"{
        "hosts": [{"name": "a"}, {"name": "r", "kind": "router"}, {"name": "b"}],
        "links": [
            {"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "r", "addr": "10.0.1.2/24"}},
            {"a": {"host": "r", "addr": "10.0.2.1/24"}, "b": {"host": "b", "addr": "10.0.2.2/24"},
             "impair": {"loss_pct": 5, "delay_ms": 10}, "cost": 2}
        ]
    }"#;

    #[test]
    fn valid_lab_has_interfaces_and_routes() {
        let l = lab(TWO).unwrap();
        assert_eq!(l.hosts[1].ifaces.len(), 2);
        assert_eq!(l.hosts[0].ifaces[0].name, "v-r");
        assert_eq!(l.routes[0].len(), 1);
        assert_eq!(l.routes[0][0].dest.to_string(), "10.0.2.0/24");
        assert_eq!(l.routes[0][0].via.to_string(), "10.0.1.2");
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert!(l.segments[0].emulated().is_none());
        let out = l.segments[1].emulated().expect("the impaired link is emulated");
        assert_eq!(out[0].delay_ms, Some(10.0));
        assert_eq!(out[1].to_update().to_string(), "delay_ms=10,loss_pct=5");
    }

    #[test]
    fn unknown_field_is_refused_with_position() {
        let e = serde_json::from_str::<LabSpec>(r#"{"hosts": [], "linkz": []}"#).unwrap_err();
        assert!(e.to_string().contains("linkz"), "{e}");
    }

    #[test]
    fn impairment_per_direction_overrides_link() {
        let l = lab(r#"{
            "hosts": [{"name": "a"}, {"name": "b"}],
            "links": [{"a": {"host": "a", "addr": "10.0.1.1/24", "impair_out": {"loss_pct": 1}},
                       "b": {"host": "b", "addr": "10.0.1.2/24"},
                       "impair": {"loss_pct": 5, "rate_kbit": 1000}}]
        }"#)
        .unwrap();
        let SegmentKind::Link { out } = &l.segments[0].kind else { panic!("a link") };
        assert_eq!(out[0].loss_pct, Some(1.0));
        assert_eq!(out[0].rate_kbit, Some(1000));
        assert_eq!(out[1].loss_pct, Some(5.0));
    }

    #[test]
    fn errors_name_the_place() {
        assert_eq!(err(r#"{"hosts": [{"name": "a"}, {"name": "a"}]}"#), "host a: declared twice");
        assert!(err(r#"{"hosts": [{"name": "A_1"}]}"#).starts_with("host \"A_1\": a name is"));
        assert!(err(r#"{"hosts": [{"name": "averyveryverylongname"}]}"#).contains("1 to 12"));
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "zz", "addr": "10.0.1.2/24"}}]}"#),
            "link 1 (a-zz): endpoint b: unknown host \"zz\""
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1"}, "b": {"host": "b", "addr": "10.0.1.2/24"}}]}"#),
            "link 1 (a-b): endpoint a (a): field addr: \"10.0.1.1\" is not an IPv4 address with a prefix length (like 10.0.1.2/24)"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.2.2/24"}}]}"#),
            "link 1 (a-b): 10.0.1.1/24 and 10.0.2.2/24 are not on one subnet"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"},
                           "impair": {"loss_pct": 150}}]}"#),
            "link 1 (a-b): impair: field loss_pct: 150 is not a percentage from 0 to 100"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}}]}"#),
            "host c: has no link and is on no LAN"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}},
                          {"a": {"host": "c", "addr": "10.0.1.3/24"}, "b": {"host": "b", "addr": "10.0.3.2/24"}}]}"#),
            "link 2 (c-b): 10.0.1.3/24 and 10.0.3.2/24 are not on one subnet"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}},
                          {"a": {"host": "c", "addr": "10.0.1.3/24"}, "b": {"host": "b", "addr": "10.0.1.4/24"}}]}"#),
            "link c-b: subnet 10.0.1.0/24 overlaps subnet 10.0.1.0/24 of link a-b"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}},
                          {"a": {"host": "c", "addr": "10.0.2.1/24"}, "b": {"host": "d", "addr": "10.0.2.2/24"}}]}"#),
            "host c: cannot reach subnet 10.0.1.0/24 (link a-b): the lab's hosts are not all connected"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "links": [{"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.1/24"}}]}"#),
            "link 1 (a-b) at b: address 10.0.1.1 is already used by link 1 (a-b) at a"
        );
    }

    #[test]
    fn lan_errors() {
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "lans": [{"name": "x", "members": [{"host": "a", "addr": "10.0.1.1/24"}, {"host": "b", "addr": "10.0.2.1/24"}]}]}"#),
            "lan x: member b: 10.0.2.1/24 is not on the LAN's subnet 10.0.1.0/24"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}],
                "lans": [{"name": "x", "members": [{"host": "a", "addr": "10.0.1.1/24"}]}]}"#),
            "lan x: needs at least two members"
        );
        assert_eq!(
            err(r#"{"hosts": [{"name": "a"}, {"name": "b"}],
                "lans": [{"name": "a", "members": [{"host": "a", "addr": "10.0.1.1/24"}, {"host": "b", "addr": "10.0.1.2/24"}]}]}"#),
            "lan a: has the name of a host (LANs get a namespace of their own)"
        );
    }

    #[test]
    fn role_errors() {
        let base = |roles: &str| {
            format!(
                r#"{{"hosts": [{{"name": "a"}}, {{"name": "r", "kind": "router"}}],
                "links": [{{"a": {{"host": "a", "addr": "10.0.1.1/24"}}, "b": {{"host": "r", "addr": "10.0.1.2/24"}}}}],
                "roles": {roles}}}"#
            )
        };
        assert_eq!(err(&base(r#"[{"host": "r", "role": "node"}]"#)), "role 1 (node on r): a router runs no role");
        assert_eq!(
            err(&base(r#"[{"host": "a", "role": "client"}]"#)),
            "role 1 (client on a): field stream: a client needs a stream"
        );
        assert_eq!(
            err(&base(r#"[{"host": "a", "role": "node", "stream": "x"}]"#)),
            "role 1 (node on a): field stream: only for clients"
        );
        assert_eq!(err(&base(r#"[{"host": "a", "role": "node"}]"#)), "roles: need exactly one bootstrapper, found 0");
        assert_eq!(
            err(&base(r#"[{"host": "a", "role": "bootstrapper"}]"#)),
            "field overlay: the bootstrapper needs an overlay topology file"
        );
    }

    #[test]
    fn seed_lab_is_valid_and_matches_the_overlay_file() {
        let l = shipped("seed.json");
        assert_eq!(l.bootstrap, Some("10.0.25.10".parse().unwrap()));
        let clients: Vec<&Role> = l.roles.iter().filter(|r| r.kind == RoleKind::Client).collect();
        assert_eq!(clients.len(), 5);
        let c3 = l.host("c3").unwrap();
        assert_eq!(l.local_pop(c3), Some("10.0.7.2".parse().unwrap()));
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        // Every overlay edge but o3-o7 is a direct link.
        let o = l.overlay.as_ref().unwrap();
        for (x, y) in o.edges() {
            let hx = l.host_of_node(&x).unwrap();
            let hy = l.host_of_node(&y).unwrap();
            let direct = l
                .segments
                .iter()
                .any(|s| s.members.iter().any(|m| m.host == hx) && s.members.iter().any(|m| m.host == hy));
            assert_eq!(direct, (x.as_str(), y.as_str()) != ("o3", "o7"), "{x}-{y}");
        }
    }

    #[test]
    fn ring_lab_is_valid() {
        let l = shipped("ring.json");
        assert_eq!(l.overlay.as_ref().unwrap().edges().len(), 12);
        assert_eq!(l.roles.iter().filter(|r| r.kind == RoleKind::Client).count(), 3);
    }

    #[test]
    fn overlay_mismatch_is_named() {
        let dir = std::env::temp_dir().join(format!("netlab-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("o.json"),
            r#"{"s1": {"neighbours": ["10.0.1.2"], "names": ["10.0.1.1", "10.0.9.9"]},
                "o1": {"neighbours": ["10.0.1.1s"], "names": ["10.0.1.2"], "pop": []}}"#,
        )
        .unwrap();
        let lab_file = dir.join("lab.json");
        std::fs::write(
            &lab_file,
            r#"{"overlay": "o.json", "hosts": [{"name": "s1"}, {"name": "o1"}],
                "links": [{"a": {"host": "s1", "addr": "10.0.1.1/24"}, "b": {"host": "o1", "addr": "10.0.1.2/24"}}],
                "roles": [{"host": "s1", "role": "bootstrapper"}, {"host": "o1", "role": "node"}]}"#,
        )
        .unwrap();
        let e = Lab::load(&lab_file).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e, "overlay node s1: name 10.0.9.9 is not an address of host s1 in the lab");
    }

    // Routes, as the lab computes them.

    fn host_names(lab: &Lab, path: &[usize]) -> Vec<String> {
        path.iter().map(|h| lab.hosts[*h].name.clone()).collect()
    }

    fn seed_lab() -> Lab {
        shipped("seed.json")
    }

    #[test]
    fn every_host_reaches_every_address_in_the_seed_lab() {
        let lab = seed_lab();
        for (from, _) in lab.hosts.iter().enumerate() {
            for (_, addr) in lab.all_addresses() {
                let path = lab.trace(from, addr);
                assert!(path.is_some(), "{} cannot reach {addr}", lab.hosts[from].name);
            }
        }
    }

    #[test]
    fn o3_reaches_o7_through_the_router() {
        let lab = seed_lab();
        let o3 = lab.host("o3").unwrap();
        let o7 = lab.host("o7").unwrap();
        let p = lab.trace(o3, "10.0.14.1".parse().unwrap()).unwrap();
        assert_eq!(host_names(&lab, &p), ["o3", "r1", "o7"]);
        let back = lab.trace(o7, "10.0.18.2".parse().unwrap()).unwrap();
        assert_eq!(host_names(&lab, &back), ["o7", "r1", "o3"]);
        let r = lab.routes[o3].iter().find(|r| r.dest.to_string() == "10.0.14.0/24").unwrap();
        assert_eq!(r.via.to_string(), "10.0.18.1");
        assert_eq!(r.dev, "v-r1");
    }

    #[test]
    fn clients_reach_the_bootstrapper_along_a_shortest_path() {
        let lab = seed_lab();
        let c5 = lab.host("c5").unwrap();
        let p = lab.trace(c5, "10.0.25.10".parse().unwrap()).unwrap();
        // c5 - o7 - r1 - o3 - o2 - s1 (5 hops) is shorter than through o9.
        assert_eq!(host_names(&lab, &p), ["c5", "o7", "r1", "o3", "o2", "s1"]);
        // Every host has one route per subnet it is not on.
        for (h, host) in lab.hosts.iter().enumerate() {
            assert_eq!(lab.routes[h].len() + host.ifaces.len(), lab.segments.len(), "{}", host.name);
        }
    }

    #[test]
    fn cost_steers_the_path() {
        // a - b - d and a - c - d; b's links cost 5, so a goes through c.
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "d"}],
            "links": [
                {"a": {"host": "a", "addr": "10.0.1.1/24"}, "b": {"host": "b", "addr": "10.0.1.2/24"}, "cost": 5},
                {"a": {"host": "b", "addr": "10.0.2.1/24"}, "b": {"host": "d", "addr": "10.0.2.2/24"}},
                {"a": {"host": "a", "addr": "10.0.3.1/24"}, "b": {"host": "c", "addr": "10.0.3.2/24"}},
                {"a": {"host": "c", "addr": "10.0.4.1/24"}, "b": {"host": "d", "addr": "10.0.4.2/24"}}
            ]
        }"#;
        let spec: LabSpec = serde_json::from_str(json).unwrap();
        let lab = Lab::from_spec(spec, None).unwrap();
        let p = lab.trace(0, "10.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(host_names(&lab, &p), ["a", "c", "d"]);
        let r = &lab.routes[0];
        let to_b_d = r.iter().find(|r| r.dest.to_string() == "10.0.2.0/24").unwrap();
        assert_eq!((to_b_d.via.to_string(), to_b_d.cost), ("10.0.3.2".to_string(), 2));
    }

    #[test]
    fn ties_break_by_neighbour_name_and_lans_count_as_one_hop() {
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "y"}, {"name": "x"}, {"name": "d"}],
            "lans": [
                {"name": "l1", "members": [{"host": "a", "addr": "10.0.1.1/24"}, {"host": "x", "addr": "10.0.1.2/24"}, {"host": "y", "addr": "10.0.1.3/24"}]},
                {"name": "l2", "members": [{"host": "x", "addr": "10.0.2.1/24"}, {"host": "y", "addr": "10.0.2.2/24"}, {"host": "d", "addr": "10.0.2.3/24"}]}
            ]
        }"#;
        let spec: LabSpec = serde_json::from_str(json).unwrap();
        let lab = Lab::from_spec(spec, None).unwrap();
        let r = &lab.routes[0][0];
        assert_eq!(r.via.to_string(), "10.0.1.2", "x sorts before y");
        assert_eq!(r.dev, "l-l1");
        assert_eq!(r.cost, 1);
    }
}
