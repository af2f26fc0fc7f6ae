//! Turns a validated lab into the ip, tc and nft commands that build it,
//! as data: the runner executes them, the tests read them.
//!
//! Every namespace is `<prefix>-<host>` (a LAN's bridge gets
//! `<prefix>-<lan>`). Veth pairs are created directly inside their two
//! namespaces, so the root namespace never holds anything of the lab and
//! deleting the namespaces removes every interface, qdisc and nft table.

use std::fmt::Write as _;

use crate::lab::{Lab, SegmentKind};

/// Longest lab prefix: namespaces are `<prefix>-<host>`, and a prefix has
/// no `-` so that `<prefix>-` never matches another lab's namespaces.
pub const MAX_PREFIX: usize = 10;

/// The nft table (family inet) that holds a namespace's link loss rules.
pub const IMPAIR_TABLE: &str = "netlab";
/// The nft table (family inet) that holds the per-link media counters.
pub const MEDIA_TABLE: &str = "netlab_media";
/// The bridge inside a LAN's namespace.
pub const BRIDGE: &str = "br0";

/// Checks a lab prefix: 1 to 10 of a-z and 0-9, starting with a letter.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!("prefix {prefix:?}: use 1 to {MAX_PREFIX} of a-z and 0-9, starting with a letter"))
    }
}

/// The namespace of a host or LAN.
pub fn ns_name(prefix: &str, host_or_lan: &str) -> String {
    format!("{prefix}-{host_or_lan}")
}

/// One step of building the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A command run in the root namespace.
    Run { argv: Vec<String>, what: String },
    /// `ip -n NS -batch -` fed these lines.
    IpBatch { ns: String, lines: Vec<String>, what: String },
    /// `ip netns exec NS nft -f -` fed this script.
    Nft { ns: String, script: String, what: String },
}

impl Step {
    pub fn what(&self) -> &str {
        match self {
            Step::Run { what, .. } | Step::IpBatch { what, .. } | Step::Nft { what, .. } => what,
        }
    }
}

fn run(what: impl Into<String>, argv: &[&str]) -> Step {
    Step::Run { argv: argv.iter().map(|s| s.to_string()).collect(), what: what.into() }
}

/// Every namespace the lab uses: hosts first, then LAN bridges.
pub fn namespaces(lab: &Lab, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = lab.hosts.iter().map(|h| ns_name(prefix, &h.name)).collect();
    for s in &lab.segments {
        if let SegmentKind::Lan { name, .. } = &s.kind {
            v.push(ns_name(prefix, name));
        }
    }
    v
}

/// Sysctls for every namespace: forward, no reverse-path filter (routes may
/// be asymmetric), no IPv6 chatter.
const SYSCTLS: [&str; 5] = [
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
];

/// tbf burst for a rate: 10 ms worth of bytes, at least two full frames.
pub fn tbf_burst_bytes(rate_kbit: u64) -> u64 {
    (rate_kbit * 1000 / 8 / 100).max(3200)
}

/// The steps that build the lab's network (no roles).
pub fn build(lab: &Lab, prefix: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let all_ns = namespaces(lab, prefix);
    for ns in &all_ns {
        steps.push(run(format!("namespace {ns}"), &["ip", "netns", "add", ns]));
    }
    for ns in &all_ns {
        let mut argv = vec!["ip", "netns", "exec", ns, "sysctl", "-qw"];
        argv.extend(SYSCTLS);
        steps.push(run(format!("sysctls of namespace {ns}"), &argv));
    }

    // Wires: veth pairs straight into their namespaces, LAN bridges.
    for s in &lab.segments {
        match &s.kind {
            SegmentKind::Link { .. } => {
                let (a, b) = (&s.members[0], &s.members[1]);
                let na = ns_name(prefix, &lab.hosts[a.host].name);
                let nb = ns_name(prefix, &lab.hosts[b.host].name);
                steps.push(run(
                    format!("{} ({})", s.label, s.net),
                    &[
                        "ip", "link", "add", "name", &a.iface, "netns", &na, "type", "veth", "peer", "name", &b.iface,
                        "netns", &nb,
                    ],
                ));
            }
            SegmentKind::Lan { name, ports } => {
                let nl = ns_name(prefix, name);
                steps.push(run(
                    format!("{} bridge", s.label),
                    &["ip", "-n", &nl, "link", "add", "name", BRIDGE, "type", "bridge"],
                ));
                for (m, port) in s.members.iter().zip(ports) {
                    let nm = ns_name(prefix, &lab.hosts[m.host].name);
                    steps.push(run(
                        format!("{} member {}", s.label, lab.hosts[m.host].name),
                        &[
                            "ip", "link", "add", "name", &m.iface, "netns", &nm, "type", "veth", "peer", "name", port,
                            "netns", &nl,
                        ],
                    ));
                }
                let mut lines = vec!["link set dev lo up".to_string(), format!("link set dev {BRIDGE} up")];
                for port in ports {
                    lines.push(format!("link set dev {port} master {BRIDGE}"));
                    lines.push(format!("link set dev {port} up"));
                }
                steps.push(Step::IpBatch { ns: nl, lines, what: format!("{} ports", s.label) });
            }
        }
    }

    // Addresses and routes, one batch per host.
    for (h, host) in lab.hosts.iter().enumerate() {
        let mut lines = vec!["link set dev lo up".to_string()];
        for i in &host.ifaces {
            lines.push(format!("addr add {} dev {}", i.addr, i.name));
            lines.push(format!("link set dev {} up", i.name));
        }
        for r in &lab.routes[h] {
            lines.push(format!("route add {} via {} dev {}", r.dest, r.via, r.dev));
        }
        steps.push(Step::IpBatch {
            ns: ns_name(prefix, &host.name),
            lines,
            what: format!("addresses and routes of {}", host.name),
        });
    }

    // Impairment: rate on the sender's interface, loss at the receiver.
    let mut loss_rules: Vec<Vec<String>> = vec![Vec::new(); lab.hosts.len()];
    for s in &lab.segments {
        let SegmentKind::Link { out } = &s.kind else {
            continue;
        };
        for (from, to, imp) in [(0, 1, &out[0]), (1, 0, &out[1])] {
            let sender = &s.members[from];
            let receiver = &s.members[to];
            let dir = format!("{}, {} -> {}", s.label, lab.hosts[sender.host].name, lab.hosts[receiver.host].name);
            if let Some(rate) = imp.rate_kbit {
                let burst = tbf_burst_bytes(rate).to_string();
                let ns = ns_name(prefix, &lab.hosts[sender.host].name);
                steps.push(run(
                    format!("{dir}: rate {rate} kbit/s"),
                    &[
                        "tc",
                        "-n",
                        &ns,
                        "qdisc",
                        "replace",
                        "dev",
                        &sender.iface,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{rate}kbit"),
                        "burst",
                        &burst,
                        "latency",
                        "100ms",
                    ],
                ));
            }
            if let Some(bp) = imp.loss_basis_points() {
                loss_rules[receiver.host]
                    .push(format!("    iifname \"{}\" numgen random mod 10000 < {bp} drop", receiver.iface));
            }
        }
    }
    for (h, rules) in loss_rules.iter().enumerate() {
        if rules.is_empty() {
            continue;
        }
        let mut script = format!(
            "table inet {IMPAIR_TABLE} {{\n  chain loss {{\n    type filter hook prerouting priority -300; policy accept;\n"
        );
        for r in rules {
            let _ = writeln!(script, "{r}");
        }
        script.push_str("  }\n}\n");
        steps.push(Step::Nft {
            ns: ns_name(prefix, &lab.hosts[h].name),
            script,
            what: format!("link loss into {}", lab.hosts[h].name),
        });
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn seed() -> Lab {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netns/labs/seed.json");
        Lab::load(&path).unwrap()
    }

    #[test]
    fn prefixes() {
        assert!(check_prefix("nl3f2a").is_ok());
        assert!(check_prefix("nl-3").is_err());
        assert!(check_prefix("3nl").is_err());
        assert!(check_prefix("abcdefghijk").is_err());
        assert!(check_prefix("").is_err());
    }

    #[test]
    fn interface_names_fit_the_kernel_limit() {
        for path in ["seed.json", "ring.json"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../netns/labs").join(path);
            let lab = Lab::load(&p).unwrap();
            for s in build(&lab, "abcdefghij") {
                if let Step::Run { argv, .. } = &s {
                    if argv[..3] == ["ip", "link", "add"] {
                        assert!(argv[4].len() <= 15, "{argv:?}");
                        assert!(argv[11].len() <= 15, "{argv:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn seed_plan_has_namespaces_wires_and_routes() {
        let lab = seed();
        let steps = build(&lab, "t1");
        let ns = namespaces(&lab, "t1");
        assert_eq!(ns.len(), 21 + 4);
        assert!(ns.contains(&"t1-lan7".to_string()));
        let adds =
            steps.iter().filter(|s| matches!(s, Step::Run { argv, .. } if argv[..3] == ["ip", "netns", "add"])).count();
        assert_eq!(adds, 25);
        let o3 = steps
            .iter()
            .find_map(|s| match s {
                Step::IpBatch { ns, lines, .. } if ns == "t1-o3" => Some(lines.clone()),
                _ => None,
            })
            .unwrap();
        assert!(o3.contains(&"addr add 10.0.18.2/24 dev v-r1".to_string()));
        assert!(o3.contains(&"route add 10.0.9.0/24 via 10.0.18.1 dev v-r1".to_string()));
        let veth = steps.iter().find(|s| s.what().starts_with("link o3-r1")).unwrap();
        assert_eq!(
            veth,
            &Step::Run {
                argv: "ip link add name v-r1 netns t1-o3 type veth peer name v-o3 netns t1-r1"
                    .split(' ')
                    .map(String::from)
                    .collect(),
                what: "link o3-r1 (10.0.18.0/24)".into()
            }
        );
    }

    #[test]
    fn impairment_becomes_tbf_and_nft() {
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "b"}],
            "links": [{"a": {"host": "a", "addr": "10.0.1.1/24", "impair_out": {"loss_pct": 5.5}},
                       "b": {"host": "b", "addr": "10.0.1.2/24"},
                       "impair": {"rate_kbit": 2000}}]
        }"#;
        let lab = Lab::from_spec(serde_json::from_str(json).unwrap(), None).unwrap();
        let steps = build(&lab, "t");
        let tbf: Vec<&Step> = steps.iter().filter(|s| matches!(s, Step::Run { argv, .. } if argv[0] == "tc")).collect();
        assert_eq!(tbf.len(), 2, "rate applies both ways");
        let Step::Run { argv, .. } = tbf[0] else { unreachable!() };
        assert_eq!(argv.join(" "), "tc -n t-a qdisc replace dev v-b root tbf rate 2000kbit burst 3200 latency 100ms");
        let nft: Vec<&Step> = steps.iter().filter(|s| matches!(s, Step::Nft { .. })).collect();
        assert_eq!(nft.len(), 1, "loss only a -> b");
        let Step::Nft { ns, script, .. } = nft[0] else { unreachable!() };
        assert_eq!(ns, "t-b");
        assert!(script.contains("iifname \"v-a\" numgen random mod 10000 < 550 drop"));
    }
}
