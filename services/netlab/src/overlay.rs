//! Just enough of the original overlay topology file for the lab: which
//! node owns which address, which nodes are neighbours, which are POPs.
//!
//! The bootstrapper reads and fully validates this file itself; the lab
//! only needs the overlay edges (for the per-link media counters) and the
//! nodes' addresses (to check that the lab gives every node the addresses
//! the file says it has).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::Deserialize;

/// One node of the overlay file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayNode {
    pub name: String,
    /// Neighbour addresses as written, without the trailing `s`.
    pub neighbours: Vec<Ipv4Addr>,
    /// Every address the node is known by.
    pub names: Vec<Ipv4Addr>,
    /// Addresses where clients may connect; empty when not a POP.
    pub pop: Vec<Ipv4Addr>,
}

/// The overlay topology: nodes sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub nodes: Vec<OverlayNode>,
}

/// Why the overlay file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("line {line} column {column}: {message}")]
    Json { line: usize, column: usize, message: String },
    #[error("node {node}: field {field}: {value:?} is not an IPv4 address")]
    BadAddress { node: String, field: &'static str, value: String },
    #[error("node {node}: neighbour {addr} is not among any node's names")]
    UnknownNeighbour { node: String, addr: Ipv4Addr },
    #[error("address {addr} is a name of both {first} and {second}")]
    SharedName { addr: Ipv4Addr, first: String, second: String },
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(default)]
    neighbours: Vec<String>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    pop: Vec<String>,
}

fn parse_addrs(
    node: &str,
    field: &'static str,
    values: &[String],
    strip_server_mark: bool,
) -> Result<Vec<Ipv4Addr>, OverlayError> {
    values
        .iter()
        .map(|v| {
            let text = if strip_server_mark { v.strip_suffix('s').unwrap_or(v) } else { v };
            text.trim().parse().map_err(|_| OverlayError::BadAddress {
                node: node.to_string(),
                field,
                value: v.clone(),
            })
        })
        .collect()
}

impl Overlay {
    /// Parses the original JSON format.
    pub fn parse(text: &str) -> Result<Overlay, OverlayError> {
        let raw: BTreeMap<String, RawNode> = serde_json::from_str(text).map_err(|e| OverlayError::Json {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let mut nodes = Vec::new();
        for (name, r) in raw {
            nodes.push(OverlayNode {
                neighbours: parse_addrs(&name, "neighbours", &r.neighbours, true)?,
                names: parse_addrs(&name, "names", &r.names, false)?,
                pop: parse_addrs(&name, "pop", &r.pop, false)?,
                name,
            });
        }
        let overlay = Overlay { nodes };
        let mut owner: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for n in &overlay.nodes {
            for a in &n.names {
                if let Some(first) = owner.insert(*a, &n.name) {
                    if first != n.name {
                        return Err(OverlayError::SharedName {
                            addr: *a,
                            first: first.to_string(),
                            second: n.name.clone(),
                        });
                    }
                }
            }
        }
        for n in &overlay.nodes {
            for a in &n.neighbours {
                if !owner.contains_key(a) {
                    return Err(OverlayError::UnknownNeighbour { node: n.name.clone(), addr: *a });
                }
            }
        }
        Ok(overlay)
    }

    /// The node whose names include `addr`.
    pub fn owner(&self, addr: Ipv4Addr) -> Option<&OverlayNode> {
        self.nodes.iter().find(|n| n.names.contains(&addr))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&OverlayNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Overlay edges as (smaller name, larger name), sorted, each once.
    pub fn edges(&self) -> Vec<(String, String)> {
        let mut set = BTreeSet::new();
        for n in &self.nodes {
            for a in &n.neighbours {
                if let Some(m) = self.owner(*a) {
                    if m.name != n.name {
                        let (x, y) = if n.name < m.name { (&n.name, &m.name) } else { (&m.name, &n.name) };
                        set.insert((x.clone(), y.clone()));
                    }
                }
            }
        }
        set.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../netns/labs/seed-overlay.json");

    #[test]
    fn seed_file_has_the_twelve_edges() {
        let o = Overlay::parse(SEED).unwrap();
        assert_eq!(o.nodes.len(), 10);
        let edges: Vec<String> = o.edges().iter().map(|(a, b)| format!("{a}-{b}")).collect();
        let mut want = vec![
            "o2-s1", "o9-s1", "o8-s2", "o2-o3", "o2-o9", "o3-o4", "o3-o7", "o3-o9", "o4-o5", "o4-o6", "o4-o8", "o8-o9",
        ];
        want.sort();
        assert_eq!(edges, want);
        assert_eq!(o.node("o6").unwrap().pop.len(), 2);
        assert_eq!(o.owner("10.0.14.1".parse().unwrap()).unwrap().name, "o7".to_string());
    }

    #[test]
    fn unknown_neighbour_is_named() {
        let err = Overlay::parse(r#"{"s1": {"neighbours": ["10.0.0.9"], "names": ["10.0.0.1"]}}"#).unwrap_err();
        assert_eq!(err.to_string(), "node s1: neighbour 10.0.0.9 is not among any node's names");
    }

    #[test]
    fn bad_json_gives_position() {
        let err = Overlay::parse("{\n  \"s1\": [}").unwrap_err();
        assert!(matches!(err, OverlayError::Json { line: 2, .. }), "{err}");
    }
}
