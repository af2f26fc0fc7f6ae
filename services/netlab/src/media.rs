//! Per overlay link, per stream byte counters, kept by nftables inside the
//! receiving node's namespace.
//!
//! For each overlay edge A-B and each direction A -> B, B's namespace gets
//! named counters fed by rules on its input hook that match RTP from any of
//! A's addresses to B's data port: one for all RTP and one per stream and
//! medium, matched on the SSRC. The SSRC sits 8 bytes into the UDP payload,
//! so at bit 128 of the transport header (`@th,128,32`); the RTP version
//! (`@th,64,2 == 2`) and a dynamic payload type (`@th,73,7 >= 96`) keep
//! RTCP, whose report blocks carry the media SSRC at the same offset, out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::Lab;
use crate::plan::{ns_name, MEDIA_TABLE};
use crate::state::StreamIds;
use crate::sys;

/// Asks `onode stream-ssrcs` for a stream's two SSRCs.
pub fn stream_ids(onode: &Path, stream: &str) -> Result<StreamIds> {
    let bin = onode.display().to_string();
    let out = sys::output(&[&bin, "stream-ssrcs", stream], None)?;
    parse_ssrcs(stream, &out)
}

/// Parses "VIDEO AUDIO" (decimal) as printed by `onode stream-ssrcs`.
pub fn parse_ssrcs(stream: &str, text: &str) -> Result<StreamIds> {
    let nums: Vec<u32> = text
        .split_whitespace()
        .map(|w| w.parse::<u32>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("stream {stream}: SSRCs {text:?} are not two numbers"))?;
    match nums.as_slice() {
        [video, audio] => Ok(StreamIds { stream: stream.to_string(), video: *video, audio: *audio }),
        _ => bail!("stream {stream}: expected two SSRCs (video audio), got {text:?}"),
    }
}

/// One direction of an overlay edge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Direction {
    pub from: String,
    pub to: String,
}

/// Both directions of every overlay edge: index 2e is the edge's smaller
/// name to its larger, 2e+1 the way back.
pub fn directions(lab: &Lab) -> Vec<Direction> {
    lab.overlay
        .as_ref()
        .map(|o| {
            o.edges()
                .into_iter()
                .flat_map(|(a, b)| [Direction { from: a.clone(), to: b.clone() }, Direction { from: b, to: a }])
                .collect()
        })
        .unwrap_or_default()
}

/// The nft script that (re)creates the counters in `node`'s namespace.
pub fn counter_script(lab: &Lab, node: &str, streams: &[StreamIds]) -> Option<String> {
    let overlay = lab.overlay.as_ref()?;
    let port = lab.spec.data_port;
    let mut counters = String::new();
    let mut rules = String::new();
    for (d, dir) in directions(lab).iter().enumerate() {
        if dir.to != node {
            continue;
        }
        let from = overlay.node(&dir.from)?;
        let saddrs: Vec<String> = from.names.iter().map(|a| a.to_string()).collect();
        let rtp = format!("ip saddr {{ {} }} udp dport {port} @th,64,2 2 @th,73,7 >= 96", saddrs.join(", "));
        let _ = writeln!(counters, "  counter d{d}_all {{ }}");
        let _ = writeln!(rules, "    {rtp} counter name \"d{d}_all\"");
        for (k, s) in streams.iter().enumerate() {
            for (medium, ssrc) in [("v", s.video), ("a", s.audio)] {
                let name = format!("d{d}_s{k}{medium}");
                let _ = writeln!(counters, "  counter {name} {{ }}");
                let _ = writeln!(rules, "    {rtp} @th,128,32 {ssrc} counter name \"{name}\"");
            }
        }
    }
    if rules.is_empty() {
        return None;
    }
    Some(format!(
        "table inet {MEDIA_TABLE} {{}}\ndelete table inet {MEDIA_TABLE}\ntable inet {MEDIA_TABLE} {{\n{counters}  chain input {{\n    type filter hook input priority 0; policy accept;\n{rules}  }}\n}}\n"
    ))
}

/// Installs (or resets) the counters in every overlay node's namespace.
pub fn install(lab: &Lab, prefix: &str, streams: &[StreamIds]) -> Result<()> {
    for role in lab.roles.iter().filter(|r| r.kind.is_overlay_node()) {
        if let Some(script) = counter_script(lab, &role.name, streams) {
            let ns = ns_name(prefix, &lab.hosts[role.host].name);
            sys::output(&["ip", "netns", "exec", &ns, "nft", "-f", "-"], Some(&script))
                .with_context(|| format!("media counters of {}", role.name))?;
        }
    }
    Ok(())
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, o: Count) -> Count {
        Count { packets: self.packets + o.packets, bytes: self.bytes + o.bytes }
    }
}

impl std::ops::Sub for Count {
    type Output = Count;
    fn sub(self, o: Count) -> Count {
        Count { packets: self.packets.saturating_sub(o.packets), bytes: self.bytes.saturating_sub(o.bytes) }
    }
}

/// What crossed one direction of an overlay edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkCount {
    pub dir: Direction,
    /// All RTP.
    pub all: Count,
    /// Per stream (in the order counted): video + audio.
    pub streams: Vec<Count>,
}

/// Parses `nft -j list counters table inet netlab_media` into name -> count.
pub fn parse_counters(json: &str) -> Result<BTreeMap<String, Count>> {
    let v: serde_json::Value = serde_json::from_str(json).context("nft printed no JSON")?;
    let mut out = BTreeMap::new();
    for item in v.get("nftables").and_then(|n| n.as_array()).ok_or_else(|| anyhow!("no nftables array"))? {
        if let Some(c) = item.get("counter") {
            let name = c.get("name").and_then(|n| n.as_str()).unwrap_or_default();
            out.insert(
                name.to_string(),
                Count {
                    packets: c.get("packets").and_then(|p| p.as_u64()).unwrap_or(0),
                    bytes: c.get("bytes").and_then(|p| p.as_u64()).unwrap_or(0),
                },
            );
        }
    }
    Ok(out)
}

/// Reads every counter of the lab.
pub fn read(lab: &Lab, prefix: &str, streams: &[StreamIds]) -> Result<Vec<LinkCount>> {
    let mut by_node: BTreeMap<String, BTreeMap<String, Count>> = BTreeMap::new();
    for role in lab.roles.iter().filter(|r| r.kind.is_overlay_node()) {
        let ns = ns_name(prefix, &lab.hosts[role.host].name);
        let out = sys::output(
            &["ip", "netns", "exec", &ns, "nft", "-j", "list", "counters", "table", "inet", MEDIA_TABLE],
            None,
        )
        .with_context(|| format!("reading the media counters of {}", role.name))?;
        by_node.insert(role.name.clone(), parse_counters(&out)?);
    }
    Ok(assemble(lab, streams, &by_node))
}

/// Puts named counters (per receiving node) together per direction.
pub fn assemble(
    lab: &Lab,
    streams: &[StreamIds],
    by_node: &BTreeMap<String, BTreeMap<String, Count>>,
) -> Vec<LinkCount> {
    directions(lab)
        .into_iter()
        .enumerate()
        .map(|(d, dir)| {
            let empty = BTreeMap::new();
            let c = by_node.get(&dir.to).unwrap_or(&empty);
            let get = |n: String| c.get(&n).copied().unwrap_or_default();
            LinkCount {
                all: get(format!("d{d}_all")),
                streams: (0..streams.len()).map(|k| get(format!("d{d}_s{k}v")) + get(format!("d{d}_s{k}a"))).collect(),
                dir,
            }
        })
        .collect()
}

/// `after - before`, direction by direction.
pub fn difference(after: &[LinkCount], before: &[LinkCount]) -> Vec<LinkCount> {
    after
        .iter()
        .map(|a| match before.iter().find(|b| b.dir == a.dir) {
            None => a.clone(),
            Some(b) => LinkCount {
                dir: a.dir.clone(),
                all: a.all - b.all,
                streams: a
                    .streams
                    .iter()
                    .zip(b.streams.iter().chain(std::iter::repeat(&Count::default())))
                    .map(|(x, y)| *x - *y)
                    .collect(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Lab {
        crate::lab::shipped("seed.json")
    }

    #[test]
    fn ssrcs_parse() {
        let s = parse_ssrcs("test", "305419896 4660\n").unwrap();
        assert_eq!((s.video, s.audio), (305419896, 4660));
        assert!(parse_ssrcs("test", "1").is_err());
        assert!(parse_ssrcs("test", "x y").is_err());
    }

    #[test]
    fn o7_counts_what_o3_sends_it_through_the_router() {
        let lab = seed();
        let ids = [StreamIds { stream: "test".into(), video: 11, audio: 22 }];
        let script = counter_script(&lab, "o7", &ids).unwrap();
        let dirs = directions(&lab);
        let d = dirs.iter().position(|x| x.from == "o3" && x.to == "o7").unwrap();
        assert!(script.contains(&format!(
            "ip saddr {{ 10.0.26.2, 10.0.18.2, 10.0.19.1, 10.0.17.2, 10.0.21.2 }} udp dport 7071 @th,64,2 2 @th,73,7 >= 96 @th,128,32 11 counter name \"d{d}_s0v\""
        )), "{script}");
        assert!(script.contains(&format!("counter d{d}_s0a {{ }}")));
        // o7 has one overlay neighbour: one all-RTP counter.
        assert_eq!(script.matches("_all {").count(), 1);
        assert_eq!(dirs.len(), 24);
    }

    #[test]
    fn counters_parse_and_assemble() {
        let lab = seed();
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "inet", "name": "d0_all", "table": "netlab_media", "handle": 3, "packets": 10, "bytes": 1400}},
            {"counter": {"family": "inet", "name": "d0_s0v", "table": "netlab_media", "handle": 4, "packets": 6, "bytes": 1000}},
            {"counter": {"family": "inet", "name": "d0_s0a", "table": "netlab_media", "handle": 5, "packets": 4, "bytes": 400}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(c["d0_all"].bytes, 1400);
        let dirs = directions(&lab);
        let mut by_node = BTreeMap::new();
        by_node.insert(dirs[0].to.clone(), c);
        let ids = [StreamIds { stream: "test".into(), video: 1, audio: 2 }];
        let counts = assemble(&lab, &ids, &by_node);
        assert_eq!(counts[0].streams[0], Count { packets: 10, bytes: 1400 });
        assert_eq!(counts[1].all, Count::default());
        let d = difference(&counts, &counts);
        assert_eq!(d[0].all, Count::default());
    }
}
