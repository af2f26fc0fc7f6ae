//! Turns a validated lab into the ip commands that build it and the link
//! emulators it runs, as data: the runner executes them, the tests read
//! them.
//!
//! Every namespace is `<prefix>-<host>` (a LAN's bridge gets
//! `<prefix>-<lan>`, an emulated link `<prefix>-<a>.<b>`). Veth pairs are
//! created directly inside their two namespaces, so the root namespace
//! never holds anything of the lab and deleting the namespaces removes
//! every interface.
//!
//! An impaired link runs through linkem: host a's `v-<b>` is paired with
//! `e-<a>` in the link namespace, host b's `v-<a>` with `e-<b>`, and linkem
//! bridges `e-<a>` and `e-<b>` (its side a is the link's endpoint a). The
//! hosts see the same interface names, addresses and ARP as on a plain
//! link; their side of it has offloads off, so only real frames cross.

use std::path::{Path, PathBuf};

use crate::lab::{Lab, SegmentKind};

/// Longest lab prefix: namespaces are `<prefix>-<host>`, and a prefix has
/// no `-` so that `<prefix>-` never matches another lab's namespaces.
pub const MAX_PREFIX: usize = 10;

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
    /// Offloads off on these interfaces of namespace NS (linkem::offload).
    Offloads { ns: String, ifaces: Vec<String>, what: String },
}

impl Step {
    pub fn what(&self) -> &str {
        match self {
            Step::Run { what, .. }
            | Step::IpBatch { what, .. }
            | Step::Nft { what, .. }
            | Step::Offloads { what, .. } => what,
        }
    }
}

fn run(what: impl Into<String>, argv: &[&str]) -> Step {
    Step::Run { argv: argv.iter().map(|s| s.to_string()).collect(), what: what.into() }
}

/// The namespace of an emulated link between hosts `a` and `b` (a `.`
/// never appears in a host name, so it cannot clash with one).
pub fn link_ns_name(prefix: &str, a: &str, b: &str) -> String {
    format!("{prefix}-{a}.{b}")
}

/// Every namespace the lab uses: hosts first, then LAN bridges, then
/// emulated links.
pub fn namespaces(lab: &Lab, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = lab.hosts.iter().map(|h| ns_name(prefix, &h.name)).collect();
    for s in &lab.segments {
        if let SegmentKind::Lan { name, .. } = &s.kind {
            v.push(ns_name(prefix, name));
        }
    }
    for e in emulators(lab, prefix, Path::new("")) {
        v.push(e.ns);
    }
    v
}

/// A link emulator the lab runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EmulatorPlan {
    /// `a-b`, the link's hosts in file order.
    pub link: String,
    pub a: String,
    pub b: String,
    pub ns: String,
    pub iface_a: String,
    pub iface_b: String,
    /// What a sends, what b sends.
    pub a2b: linkem::Update,
    pub b2a: linkem::Update,
    pub control: PathBuf,
    pub stats: PathBuf,
    pub log: PathBuf,
}

impl EmulatorPlan {
    /// linkem's command line (after the binary).
    pub fn args(&self) -> Vec<String> {
        let mut v: Vec<String> = ["run", "--name", &self.link, "--iface-a", &self.iface_a, "--iface-b", &self.iface_b]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push("--control".into());
        v.push(self.control.display().to_string());
        v.push("--stats".into());
        v.push(self.stats.display().to_string());
        v.push("--a2b".into());
        v.push(self.a2b.to_string());
        v.push("--b2a".into());
        v.push(self.b2a.to_string());
        v
    }
}

/// The emulators of the lab's impaired links; their control sockets,
/// stats files and logs go under the lab folder `dir`.
pub fn emulators(lab: &Lab, prefix: &str, dir: &Path) -> Vec<EmulatorPlan> {
    lab.segments
        .iter()
        .filter_map(|s| {
            let out = s.emulated()?;
            let a = lab.hosts[s.members[0].host].name.clone();
            let b = lab.hosts[s.members[1].host].name.clone();
            let link = format!("{a}-{b}");
            Some(EmulatorPlan {
                ns: link_ns_name(prefix, &a, &b),
                iface_a: format!("e-{a}"),
                iface_b: format!("e-{b}"),
                a2b: out[0].to_update(),
                b2a: out[1].to_update(),
                control: dir.join("links").join(format!("{link}.sock")),
                stats: dir.join("links").join(format!("{link}.json")),
                log: dir.join("logs").join(format!("link-{link}.log")),
                link,
                a,
                b,
            })
        })
        .collect()
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
            SegmentKind::Link { .. } if s.emulated().is_some() => {
                let (a, b) = (&s.members[0], &s.members[1]);
                let (ha, hb) = (&lab.hosts[a.host].name, &lab.hosts[b.host].name);
                let (na, nb) = (ns_name(prefix, ha), ns_name(prefix, hb));
                let nl = link_ns_name(prefix, ha, hb);
                let (ea, eb) = (format!("e-{ha}"), format!("e-{hb}"));
                steps.push(run(
                    format!("{} ({}), emulated: {ha} side", s.label, s.net),
                    &[
                        "ip", "link", "add", "name", &a.iface, "netns", &na, "type", "veth", "peer", "name", &ea,
                        "netns", &nl,
                    ],
                ));
                steps.push(run(
                    format!("{} ({}), emulated: {hb} side", s.label, s.net),
                    &[
                        "ip", "link", "add", "name", &b.iface, "netns", &nb, "type", "veth", "peer", "name", &eb,
                        "netns", &nl,
                    ],
                ));
                let lines = vec![
                    "link set dev lo up".to_string(),
                    format!("link set dev {ea} up"),
                    format!("link set dev {eb} up"),
                ];
                steps.push(Step::IpBatch { ns: nl, lines, what: format!("{} emulator ports", s.label) });
                for (m, ns) in [(a, &na), (b, &nb)] {
                    steps.push(Step::Offloads {
                        ns: ns.clone(),
                        ifaces: vec![m.iface.clone()],
                        what: format!("{} offloads off at {}", s.label, lab.hosts[m.host].name),
                    });
                }
            }
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

    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn seed() -> Lab {
        crate::lab::shipped("seed.json")
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
            let lab = crate::lab::shipped(path);
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
        // 21 hosts, 4 LANs, 13 links with a delay.
        assert_eq!(ns.len(), 21 + 4 + 13);
        assert!(ns.contains(&"t1-lan7".to_string()));
        assert!(ns.contains(&"t1-o3.r1".to_string()));
        let adds =
            steps.iter().filter(|s| matches!(s, Step::Run { argv, .. } if argv[..3] == ["ip", "netns", "add"])).count();
        assert_eq!(adds, 38);
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
                argv: "ip link add name v-r1 netns t1-o3 type veth peer name e-o3 netns t1-o3.r1"
                    .split(' ')
                    .map(String::from)
                    .collect(),
                what: "link o3-r1 (10.0.18.0/24), emulated: o3 side".into()
            }
        );
        // The stub routers' links have no delay: plain veth pairs.
        let stub = steps.iter().find(|s| s.what().starts_with("link o2-r16")).unwrap();
        assert_eq!(
            stub,
            &Step::Run {
                argv: "ip link add name v-r16 netns t1-o2 type veth peer name v-o2 netns t1-r16"
                    .split(' ')
                    .map(String::from)
                    .collect(),
                what: "link o2-r16 (10.0.16.0/24)".into()
            }
        );
    }

    #[test]
    fn an_impaired_link_runs_through_a_link_namespace() {
        let json = r#"{
            "hosts": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
            "links": [{"a": {"host": "a", "addr": "10.0.1.1/24", "impair_out": {"loss_pct": 5.5}},
                       "b": {"host": "b", "addr": "10.0.1.2/24"},
                       "impair": {"rate_kbit": 2000, "delay_ms": 12}},
                      {"a": {"host": "b", "addr": "10.0.2.1/24"}, "b": {"host": "c", "addr": "10.0.2.2/24"}}]
        }"#;
        let lab = Lab::from_spec(serde_json::from_str(json).unwrap(), None).unwrap();
        assert_eq!(namespaces(&lab, "t"), ["t-a", "t-b", "t-c", "t-a.b"]);
        let steps = build(&lab, "t");
        let veths: Vec<String> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Run { argv, .. } if argv[..3] == ["ip", "link", "add"] => Some(argv.join(" ")),
                _ => None,
            })
            .collect();
        assert_eq!(
            veths,
            [
                "ip link add name v-b netns t-a type veth peer name e-a netns t-a.b",
                "ip link add name v-a netns t-b type veth peer name e-b netns t-a.b",
                "ip link add name v-c netns t-b type veth peer name v-b netns t-c",
            ]
        );
        let offloads: Vec<(&str, &[String])> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Offloads { ns, ifaces, .. } => Some((ns.as_str(), ifaces.as_slice())),
                _ => None,
            })
            .collect();
        assert_eq!(offloads, [("t-a", &["v-b".to_string()][..]), ("t-b", &["v-a".to_string()][..])]);
        assert!(!steps.iter().any(|s| matches!(s, Step::Nft { .. })), "no nft loss: linkem does it");
        let emus = emulators(&lab, "t", Path::new("/tmp/netlab-t"));
        assert_eq!(emus.len(), 1);
        let e = &emus[0];
        assert_eq!(
            e.args().join(" "),
            "run --name a-b --iface-a e-a --iface-b e-b \
--control /tmp/netlab-t/links/a-b.sock --stats /tmp/netlab-t/links/a-b.json \
--a2b delay_ms=12,loss_pct=5.5,rate_kbit=2000 --b2a delay_ms=12,rate_kbit=2000"
        );
    }
}
