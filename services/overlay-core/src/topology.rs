//! The overlay topology file, in the original prototype's JSON format.
//!
//! Keys are node names (`s*` servers, `o*` overlay nodes). `neighbours` are
//! addresses of overlay neighbours, with a trailing `s` marking a server;
//! `names` are every address the node is known by; `pop` lists the addresses
//! where clients may connect. [`Topology::parse`] validates the whole file
//! and refuses it with an error naming the node and the field at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use thiserror::Error;

/// Why a topology file was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopologyError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("node {node}: field `{field}`: {value:?} is not an IP address")]
    BadAddress { node: String, field: &'static str, value: String },
    #[error("node {node}: field `names` is empty")]
    NoNames { node: String },
    #[error("address {address} is in the `names` of both {first} and {second}")]
    DuplicateAddress { address: IpAddr, first: String, second: String },
    #[error("node {node}: field `neighbours`: {address} is not owned by any node")]
    UnknownNeighbour { node: String, address: IpAddr },
    #[error("node {node}: field `neighbours`: {address} is one of its own names")]
    SelfNeighbour { node: String, address: IpAddr },
    #[error("node {node}: field `neighbours`: {address} is marked as a server (trailing `s`) but belongs to {owner}, which is not a server")]
    ServerMark { node: String, address: IpAddr, owner: String },
    #[error("node {node}: field `neighbours`: lists {neighbour} ({address}), but {neighbour}'s `neighbours` has no address of {node}")]
    OneSided { node: String, neighbour: String, address: IpAddr },
    #[error("node {node}: field `pop`: {address} is not among the node's `names`")]
    PopNotOwned { node: String, address: IpAddr },
    #[error("node {node}: field `pop`: a server cannot be a POP")]
    ServerPop { node: String },
    #[error("no server: no node name starts with `s`")]
    NoServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    neighbours: Vec<String>,
    names: Vec<String>,
    #[serde(default)]
    pop: Vec<String>,
}

/// One overlay neighbour as seen from a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourSpec {
    /// Name of the neighbouring node.
    pub name: String,
    /// Address this node reaches it at.
    pub address: IpAddr,
    /// Whether the neighbour is a server.
    pub server: bool,
}

/// One node of the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub server: bool,
    pub names: Vec<IpAddr>,
    pub pop: Vec<IpAddr>,
    pub neighbours: Vec<NeighbourSpec>,
}

impl NodeSpec {
    pub fn is_pop(&self) -> bool {
        !self.pop.is_empty()
    }
}

/// A validated overlay topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    nodes: BTreeMap<String, NodeSpec>,
    owners: BTreeMap<IpAddr, String>,
}

fn parse_addr(node: &str, field: &'static str, value: &str) -> Result<IpAddr, TopologyError> {
    value.parse().map_err(|_| TopologyError::BadAddress { node: node.to_string(), field, value: value.to_string() })
}

impl Topology {
    /// Parses and validates a topology file's text.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let raw: BTreeMap<String, RawNode> =
            serde_json::from_str(text).map_err(|e| TopologyError::InvalidJson(e.to_string()))?;
        let is_server = |name: &str| name.starts_with('s');

        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut names: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
        for (node, spec) in &raw {
            if spec.names.is_empty() {
                return Err(TopologyError::NoNames { node: node.clone() });
            }
            let mut list = Vec::new();
            for value in &spec.names {
                let addr = parse_addr(node, "names", value)?;
                if let Some(first) = owners.get(&addr) {
                    if first != node {
                        return Err(TopologyError::DuplicateAddress {
                            address: addr,
                            first: first.clone(),
                            second: node.clone(),
                        });
                    }
                }
                owners.insert(addr, node.clone());
                list.push(addr);
            }
            names.insert(node, list);
        }

        let mut nodes = BTreeMap::new();
        for (node, spec) in &raw {
            let mut neighbours = Vec::new();
            for value in &spec.neighbours {
                let (text, marked) = match value.strip_suffix('s') {
                    Some(stripped) => (stripped, true),
                    None => (value.as_str(), false),
                };
                let address = parse_addr(node, "neighbours", text)?;
                let owner = owners
                    .get(&address)
                    .ok_or_else(|| TopologyError::UnknownNeighbour { node: node.clone(), address })?;
                if owner == node {
                    return Err(TopologyError::SelfNeighbour { node: node.clone(), address });
                }
                if marked && !is_server(owner) {
                    return Err(TopologyError::ServerMark { node: node.clone(), address, owner: owner.clone() });
                }
                neighbours.push(NeighbourSpec { name: owner.clone(), address, server: is_server(owner) });
            }
            let mut pop = Vec::new();
            for value in &spec.pop {
                let address = parse_addr(node, "pop", value)?;
                if !names[node.as_str()].contains(&address) {
                    return Err(TopologyError::PopNotOwned { node: node.clone(), address });
                }
                pop.push(address);
            }
            if is_server(node) && !pop.is_empty() {
                return Err(TopologyError::ServerPop { node: node.clone() });
            }
            nodes.insert(
                node.clone(),
                NodeSpec {
                    name: node.clone(),
                    server: is_server(node),
                    names: names[node.as_str()].clone(),
                    pop,
                    neighbours,
                },
            );
        }

        for spec in nodes.values() {
            for n in &spec.neighbours {
                let back = nodes[&n.name].neighbours.iter().any(|b| b.name == spec.name);
                if !back {
                    return Err(TopologyError::OneSided {
                        node: spec.name.clone(),
                        neighbour: n.name.clone(),
                        address: n.address,
                    });
                }
            }
        }
        if !nodes.values().any(|n| n.server) {
            return Err(TopologyError::NoServer);
        }
        Ok(Topology { nodes, owners })
    }

    /// The node owning `addr` among its `names`.
    pub fn owner_of(&self, addr: IpAddr) -> Option<&NodeSpec> {
        self.owners.get(&addr).map(|name| &self.nodes[name])
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeSpec> {
        self.nodes.values()
    }

    /// Overlay edges as sorted name pairs, each once.
    pub fn edges(&self) -> BTreeSet<(String, String)> {
        let mut edges = BTreeSet::new();
        for spec in self.nodes.values() {
            for n in &spec.neighbours {
                let (a, b) = if spec.name < n.name { (&spec.name, &n.name) } else { (&n.name, &spec.name) };
                edges.insert((a.clone(), b.clone()));
            }
        }
        edges
    }

    pub fn summary(&self) -> Summary {
        Summary {
            nodes: self.nodes.len(),
            servers: self.nodes.values().filter(|n| n.server).map(|n| n.name.clone()).collect(),
            pops: self.nodes.values().filter(|n| n.is_pop()).map(|n| n.name.clone()).collect(),
            relays: self.nodes.values().filter(|n| !n.server && !n.is_pop()).map(|n| n.name.clone()).collect(),
            edges: self.edges().into_iter().collect(),
        }
    }
}

/// What `onode topology check` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub nodes: usize,
    pub servers: Vec<String>,
    pub pops: Vec<String>,
    pub relays: Vec<String>,
    pub edges: Vec<(String, String)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nodes: {}", self.nodes)?;
        writeln!(f, "servers ({}): {}", self.servers.len(), self.servers.join(" "))?;
        writeln!(f, "relays ({}): {}", self.relays.len(), self.relays.join(" "))?;
        writeln!(f, "pops ({}): {}", self.pops.len(), self.pops.join(" "))?;
        let edges: Vec<String> = self.edges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        write!(f, "overlay edges ({}): {}", edges.len(), edges.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../netns/labs/seed-overlay.json");

    #[test]
    fn loads_the_original_file() {
        let t = Topology::parse(SEED).unwrap();
        let s = t.summary();
        assert_eq!(s.nodes, 10);
        assert_eq!(s.servers, ["s1", "s2"]);
        assert_eq!(s.pops, ["o5", "o6", "o7"]);
        let edges: Vec<String> = s.edges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        assert_eq!(
            edges,
            [
                "o2-o3", "o2-o9", "o2-s1", "o3-o4", "o3-o7", "o3-o9", "o4-o5", "o4-o6", "o4-o8", "o8-o9", "o8-s2",
                "o9-s1"
            ]
        );
        let o3 = t.owner_of("10.0.18.2".parse().unwrap()).unwrap();
        assert_eq!(o3.name, "o3");
        let o7 = t.node("o7").unwrap();
        assert_eq!(o7.neighbours[0].name, "o3");
        assert_eq!(o7.pop, ["10.0.9.2".parse::<IpAddr>().unwrap()]);
        assert!(t.node("s1").unwrap().server);
    }

    fn err(text: &str) -> String {
        Topology::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn refuses_each_kind_of_error() {
        assert!(err("{").starts_with("invalid JSON"));
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.9"],"names":["10.0.0.1"]}}"#),
            "node s1: field `neighbours`: 10.0.0.9 is not owned by any node"
        );
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"]},
                    "o1":{"neighbours":[],"names":["10.0.0.2"],"pop":[]}}"#),
            "node s1: field `neighbours`: lists o1 (10.0.0.2), but o1's `neighbours` has no address of s1"
        );
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"]},
                    "o1":{"neighbours":["10.0.0.1s"],"names":["10.0.0.2"],"pop":["10.0.5.1"]}}"#),
            "node o1: field `pop`: 10.0.5.1 is not among the node's `names`"
        );
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"]},
                    "o1":{"neighbours":["10.0.0.1s"],"names":["10.0.0.2","10.0.0.1"],"pop":[]}}"#),
            "address 10.0.0.1 is in the `names` of both o1 and s1"
        );
        assert_eq!(
            err(r#"{"o1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"],"pop":[]},
                    "o2":{"neighbours":["10.0.0.1"],"names":["10.0.0.2"],"pop":[]}}"#),
            "no server: no node name starts with `s`"
        );
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.x"],"names":["10.0.0.1"]}}"#),
            "node s1: field `neighbours`: \"10.0.0.x\" is not an IP address"
        );
        assert_eq!(
            err(r#"{"s1":{"neighbours":["10.0.0.2"],"names":["10.0.0.1"]},
                    "o1":{"neighbours":["10.0.0.1s","10.0.0.1s"],"names":["10.0.0.2"],"pop":[]},
                    "o2":{"neighbours":["10.0.0.2s"],"names":["10.0.0.3"],"pop":[]}}"#),
            "node o2: field `neighbours`: 10.0.0.2 is marked as a server (trailing `s`) but belongs to o1, which is not a server"
        );
    }
}
