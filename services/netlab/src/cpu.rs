//! Where the CPU goes in a lab run: CPU time per process over a window, in
//! microseconds of CPU per second of wall time, grouped by what each
//! process does (relay at rest, relay forwarding, POP, server, client,
//! link emulator). The figures are pure arithmetic over two readings;
//! [`read_ticks`] and [`machine_ticks`] are the thin /proc readers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::lab::RoleKind;
use crate::state::LabState;

/// What a process does in the lab, for grouping its CPU figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    RelayIdle,
    RelayForwarding,
    Pop,
    Server,
    Client,
    LinkEmulator,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::RelayIdle => "relay at rest",
            Kind::RelayForwarding => "relay forwarding",
            Kind::Pop => "POP",
            Kind::Server => "server",
            Kind::Client => "client",
            Kind::LinkEmulator => "link emulator",
        }
    }
}

/// One process's CPU over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// Lab name of the process (`o3`, `c2`, `link o3-o4`).
    pub name: String,
    pub kind: Kind,
    /// Microseconds of CPU per second of wall time.
    pub us_per_s: f64,
}

/// CPU per second from two readings of a process's CPU time (in clock
/// ticks) taken `wall` apart.
pub fn rate(before_ticks: u64, after_ticks: u64, ticks_per_s: u64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs <= 0.0 || ticks_per_s == 0 {
        return 0.0;
    }
    after_ticks.saturating_sub(before_ticks) as f64 * 1e6 / ticks_per_s as f64 / secs
}

/// Busy share of the whole machine (0..1) from two readings of
/// [`machine_ticks`] (busy, total).
pub fn machine_busy(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total > 0.0 {
        busy / total
    } else {
        0.0
    }
}

/// Median, minimum and maximum per kind, with the processes' names.
pub fn by_kind(usages: &[Usage]) -> BTreeMap<Kind, Vec<&Usage>> {
    let mut out: BTreeMap<Kind, Vec<&Usage>> = BTreeMap::new();
    for u in usages {
        out.entry(u.kind).or_default().push(u);
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.us_per_s.total_cmp(&b.us_per_s));
    }
    out
}

/// One line per kind: median (min-max) µs/s and each process.
pub fn table(usages: &[Usage]) -> String {
    let mut out = String::new();
    for (kind, list) in by_kind(usages) {
        let median = list[list.len() / 2].us_per_s;
        let each: Vec<String> = list.iter().map(|u| format!("{} {:.0}", u.name, u.us_per_s)).collect();
        let _ = writeln!(
            out,
            "  {:<17} {:>8.0} µs/s median ({:.0}-{:.0})   {}",
            kind.label(),
            median,
            list[0].us_per_s,
            list[list.len() - 1].us_per_s,
            each.join(", ")
        );
    }
    out
}

/// The `n` busiest processes, busiest first ("s2 131 ms/s, c4 80 ms/s").
pub fn busiest(usages: &[Usage], n: usize) -> String {
    let mut sorted: Vec<&Usage> = usages.iter().collect();
    sorted.sort_by(|a, b| b.us_per_s.total_cmp(&a.us_per_s));
    sorted.iter().take(n).map(|u| format!("{} {:.0} ms/s", u.name, u.us_per_s / 1000.0)).collect::<Vec<_>>().join(", ")
}

/// A lab process (a role other than a client, or a link emulator) and its
/// CPU ticks when the window began.
#[derive(Debug, Clone)]
pub struct Tracked {
    name: String,
    role: Option<RoleKind>,
    pid: i32,
    start: Option<u64>,
}

/// A tracked process's CPU over the window, not yet grouped by kind.
#[derive(Debug, Clone)]
pub struct Spent {
    name: String,
    role: Option<RoleKind>,
    us_per_s: Option<f64>,
}

/// Starts a window over the lab's roles (clients excepted: they report
/// their own CPU) and link emulators.
pub fn track(st: &LabState) -> Vec<Tracked> {
    let roles =
        st.processes.iter().filter(|p| p.role != RoleKind::Client).map(|p| (p.name.clone(), Some(p.role), p.pid));
    let links = st.emulators.iter().map(|e| (format!("link {}", e.link), None, e.pid));
    roles.chain(links).map(|(name, role, pid)| Tracked { name, role, pid, start: read_ticks(pid) }).collect()
}

/// Ends the window, `wall` after [`track`].
pub fn spent(tracked: Vec<Tracked>, wall: Duration) -> Vec<Spent> {
    let tps = ticks_per_s();
    tracked
        .into_iter()
        .map(|t| {
            let us_per_s = t.start.zip(read_ticks(t.pid)).map(|(a, b)| rate(a, b, tps, wall));
            Spent { name: t.name, role: t.role, us_per_s }
        })
        .collect()
}

/// Groups what was spent by kind; relays are forwarding when `forwarding`
/// says so of their name.
pub fn classify(spent: &[Spent], forwarding: impl Fn(&str) -> bool) -> Vec<Usage> {
    spent
        .iter()
        .filter_map(|s| {
            let kind = match s.role {
                Some(RoleKind::Node) if forwarding(&s.name) => Kind::RelayForwarding,
                Some(RoleKind::Node) => Kind::RelayIdle,
                Some(RoleKind::Pop) => Kind::Pop,
                Some(_) => Kind::Server,
                None => Kind::LinkEmulator,
            };
            Some(Usage { name: s.name.clone(), kind, us_per_s: s.us_per_s? })
        })
        .collect()
}

/// User plus system CPU time of a process, in clock ticks; `None` once it
/// is gone.
pub fn read_ticks(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&text)
}

/// Busy and total ticks of the whole machine, from /proc/stat.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_ticks(&text)
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime of a /proc/PID/stat line (fields 14 and 15; the command
/// name in parentheses may hold spaces).
fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) is index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_machine_ticks(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_cpu_microseconds_per_wall_second() {
        assert_eq!(rate(100, 150, 100, Duration::from_secs(10)), 50_000.0);
        assert_eq!(rate(150, 100, 100, Duration::from_secs(10)), 0.0, "a counter never runs backwards");
        assert_eq!(rate(0, 10, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "4242 (tokio rt (x)) S 1 4242 4242 0 -1 4194560 500 0 0 0 37 12 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_ticks(line), Some(49));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_share_leaves_out_idle_and_iowait() {
        let a = parse_machine_ticks("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, (200, 1000));
        let b = parse_machine_ticks("cpu  200 0 200 800 100 0 0 0 0 0\n").unwrap();
        assert!((machine_busy(a, b) - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_table_groups_by_kind_with_the_median() {
        let u = |name: &str, kind, us_per_s| Usage { name: name.into(), kind, us_per_s };
        let usages = vec![
            u("o3", Kind::RelayForwarding, 3000.0),
            u("o4", Kind::RelayForwarding, 5000.0),
            u("o2", Kind::RelayIdle, 1000.0),
            u("o9", Kind::RelayForwarding, 4000.0),
            u("c2", Kind::Client, 40000.0),
        ];
        let t = table(&usages);
        assert!(t.contains("relay forwarding      4000 µs/s median (3000-5000)   o3 3000, o9 4000, o4 5000"), "{t}");
        assert!(t.find("relay at rest").unwrap() < t.find("relay forwarding").unwrap());
        assert_eq!(busiest(&usages, 2), "c2 40 ms/s, o4 5 ms/s");
    }
}
