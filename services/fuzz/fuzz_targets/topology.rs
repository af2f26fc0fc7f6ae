//! The overlay topology file: `Topology::parse` on arbitrary text (other
//! bytes are rejected). A topology it accepts must hold together (owners,
//! neighbours both ways, summary partitions the nodes) and must parse
//! again to the same value when written back out. (The lab reads the file
//! with the same parser.)

#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::{fuzz_target, Corpus};
use overlay_core::topology::Topology;
use serde_json::{json, Map, Value};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(text) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    match Topology::parse(text) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(t) => {
            overlay_fuzz::check_topology(&t);
            check_rewritten(&t);
        }
    }
    Corpus::Keep
});

/// Writes the topology back in the file format (servers marked) and parses
/// it again: nothing may be lost or changed.
fn check_rewritten(t: &Topology) {
    let addrs = |list: &[IpAddr]| -> Vec<Value> { list.iter().map(|a| json!(a.to_string())).collect() };
    let mut file = Map::new();
    for n in t.nodes() {
        let neighbours: Vec<Value> = n
            .neighbours
            .iter()
            .map(|nb| json!(format!("{}{}", nb.address, if nb.server { "s" } else { "" })))
            .collect();
        file.insert(n.name.clone(), json!({"neighbours": neighbours, "names": addrs(&n.names), "pop": addrs(&n.pop)}));
    }
    let text = Value::Object(file).to_string();
    assert_eq!(Topology::parse(&text).as_ref(), Ok(t), "rewritten as {text}");
}
