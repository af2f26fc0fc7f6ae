//! The simulator drives overlay-core's route tables through named
//! scenarios and seeded random fault schedules; its oracle must catch
//! broken routes as well as pass good ones.

use overlay_core::tree::{JoinDecision, Requester, Source, StreamDesc};
use overlay_sim::graph::{Graph, Link, Role, Shape};
use overlay_sim::sim::{Config, TreeViolation, Violation, World};
use overlay_sim::{run, LIMIT, STEP_US};

/// s - a - p and s - b - p: two ways from the server to the POP, the one
/// by `a` shorter (10 + 10 ms against 15 + 15 ms).
fn square() -> Graph {
    let names = ["s", "a", "b", "p"].map(String::from).to_vec();
    let roles = vec![Role::Server, Role::Relay, Role::Relay, Role::Pop];
    let links = vec![
        Link { a: 0, b: 1, delay_us: 10_000 },
        Link { a: 1, b: 3, delay_us: 10_000 },
        Link { a: 0, b: 2, delay_us: 15_000 },
        Link { a: 2, b: 3, delay_us: 15_000 },
    ];
    Graph::from_links(names, roles, links)
}

fn quiet() -> Config {
    Config { loss: 0.0, jitter_us: 0, ..Config::default() }
}

#[test]
fn a_cold_square_routes_the_short_way_within_three_probe_intervals() {
    let mut w = World::new(square(), quiet(), 1);
    let k = w.converge(LIMIT, 0).expect("converges");
    assert!(k <= 3, "took {k} probe intervals");
    let j = w.judge();
    assert!(j.violations.is_empty(), "{:?}", j.violations);
    assert_eq!(j.routes, 3);
    assert!((j.penalty_sum / j.routes as f64 - 1.0).abs() < 1e-9, "penalty {}", j.penalty_max);
}

#[test]
fn the_oracle_catches_a_dead_hop_and_a_longer_route_and_both_are_repaired() {
    let mut w = World::new(square(), quiet(), 2);
    w.converge(LIMIT, 0).expect("converges");

    // a dies: at once, p's route goes through a dead node.
    w.crash(1);
    let j = w.judge();
    assert!(
        j.violations.iter().any(|v| matches!(v, Violation::DeadHop { node, via, .. } if node == "p" && via == "a")),
        "{:?}",
        j.violations
    );
    let k = w.converge(LIMIT, 0).expect("repairs");
    assert!(k <= 3, "repair took {k} probe intervals");

    // a comes back; then the a-p link gets slow (10 -> 60 ms): the route
    // by a is now longer than the one by b, which the oracle says at once.
    w.restart(1);
    w.converge(LIMIT, 0).expect("converges after the restart");
    w.set_delay(1, 60_000);
    let j = w.judge();
    assert!(
        j.violations.iter().any(|v| matches!(v, Violation::Longer { node, .. } if node == "p")),
        "{:?}",
        j.violations
    );
    let k = w.converge(LIMIT, 0).expect("moves to b");
    assert!(k <= 4, "took {k} probe intervals");
}

#[test]
fn a_dead_server_is_forgotten_with_and_without_the_bootstrappers_notice() {
    for notices in [true, false] {
        let mut w = World::new(square(), Config { notices, ..quiet() }, 3);
        w.converge(LIMIT, 0).expect("converges");
        w.crash(0);
        let k = w.converge(LIMIT, 0).expect("forgets the server");
        println!("server crash, notices {notices}: routes gone after {k} probe intervals");
        assert!(k <= 5, "took {k} probe intervals");
    }
}

#[test]
fn a_cut_off_region_loses_its_routes_and_gets_them_back() {
    // p is cut off entirely (both its links), then one comes back.
    let mut w = World::new(square(), quiet(), 4);
    w.converge(LIMIT, 0).expect("converges");
    w.cut(1);
    w.cut(3);
    w.converge(LIMIT, 0).expect("p has no route, and no one routes through it");
    w.restore(3);
    let k = w.converge(LIMIT, 0).expect("p routes by b");
    assert!(k <= 3, "took {k} probe intervals");
}

#[test]
fn a_seed_replays_exactly() {
    let shape = Shape { nodes: 60, servers: 3, pops: 12, nearest: 3, long_haul: 10, side_km: 3000 };
    let a = run(shape, Config::default(), 11, 6);
    let b = run(shape, Config::default(), 11, 6);
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.faults.iter().map(|f| &f.1).collect::<Vec<_>>(), b.faults.iter().map(|f| &f.1).collect::<Vec<_>>());
    assert_eq!(a.messages_per_node_interval, b.messages_per_node_interval);
}

/// Random schedules on 100-node overlays with loss and jitter: every fault
/// converges, at rest a node sends at most degree x servers probes per
/// interval. (`just sim` runs 1,000 nodes and more seeds.)
#[test]
fn random_fault_schedules_converge() {
    let shape = Shape { nodes: 100, servers: 4, pops: 20, nearest: 3, long_haul: 10, side_km: 4000 };
    let mut problems = Vec::new();
    let mut worst = 0;
    for seed in 1..=24 {
        let r = run(shape, Config::default(), seed, 10);
        for f in r.failures() {
            problems.push(format!("seed {seed}: {f}\n{}", r.trace.join("\n")));
        }
        worst = worst.max(r.faults.iter().filter_map(|f| f.1.as_ref().ok().copied()).max().unwrap_or(0));
        let bound = r.mean_degree * r.servers as f64;
        if r.messages_per_node_interval > bound {
            problems.push(format!(
                "seed {seed}: {:.1} probes per node per interval, bound {bound:.1}",
                r.messages_per_node_interval
            ));
        }
    }
    println!("24 seeds x 10 faults on 100 nodes: slowest convergence {worst} probe intervals");
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The square with a viewer at p: its tree runs the short way, through a.
fn watched_square(seed: u64) -> World {
    let mut w = World::new(square(), Config { watching: 1.0, ..quiet() }, seed);
    w.converge(LIMIT, 0).expect("routes");
    w.start_viewers();
    let c = w.converge_all(LIMIT, 0, STEP_US);
    assert!(c.fed_after_us.is_some() && c.broken.is_empty(), "{c:?}");
    w
}

#[test]
fn a_viewers_tree_is_repaired_around_a_dead_relay_and_a_cut_link() {
    let mut w = watched_square(5);
    let t = w.judge_trees();
    assert_eq!((t.fed, t.unfed.len()), (1, 0));
    assert!((t.penalty_sum - 1.0).abs() < 1e-9, "through a: {t:?}");
    // a dies: p is unfed at once, then fed through b.
    w.crash(1);
    assert_eq!(w.judge_trees().unfed.len(), 1, "a fed p");
    let c = w.converge_all(LIMIT, 0, STEP_US);
    let took = c.fed_after_us.expect("fed again");
    println!("relay crash: p fed again after {} ms", took / 1000);
    assert!(took > 0 && took < 2_000_000, "took {took} µs");
    assert!(c.broken.is_empty(), "{:?}", c.broken);
    // a comes back, then the s-b link is cut: through a again.
    w.restart(1);
    w.converge_all(LIMIT, 0, STEP_US);
    w.cut(2);
    let c = w.converge_all(LIMIT, 0, STEP_US);
    assert!(c.fed_after_us.is_some() && c.broken.is_empty(), "{c:?}");
    assert_eq!(w.judge_trees().strays, 0, "b's branch to p was pruned");
}

#[test]
fn the_tree_judge_catches_a_loop_and_a_link_used_both_ways() {
    let mut w = watched_square(6);
    assert!(w.judge_trees().broken.is_empty());
    // By hand: p (fed by a) drops its viewer and takes a as a downstream;
    // a then takes ch0 from p. Each sends to the other.
    let now = w.clock();
    let desc = StreamDesc {
        stream: "ch0".into(),
        server: "s".into(),
        ssrcs: vec![1, 2],
        depth: 1,
        // (a route that names neither, as a stale one may)
        route: vec!["s".into()],
        delay_us: 0,
    };
    let p = w.engine_mut(3);
    p.trees.leave("ch0", &Requester::Local);
    let d = p.trees.request("ch0", Requester::Neighbour("a".into()), &["a".into()], 99, &p.routes, now);
    assert!(matches!(d, JoinDecision::Forward { .. }), "{d:?}");
    p.trees.joined(Source::Neighbour("a".into()), desc.clone());
    assert!(w.engine_mut(1).trees.repaired("p", desc).is_some());
    let t = w.judge_trees();
    assert!(t.broken.iter().any(|v| matches!(v, TreeViolation::Loop { .. })), "{:?}", t.broken);
    assert!(t.broken.iter().any(|v| matches!(v, TreeViolation::BothWays { .. })), "{:?}", t.broken);
    // The check run after every event at a node sees both from p alone.
    assert!(w.broken_seen().is_empty());
    w.check_trees_at(3);
    let seen = w.broken_seen();
    assert!(seen.iter().any(|v| matches!(v, TreeViolation::Loop { .. })), "{seen:?}");
    assert!(seen.iter().any(|v| matches!(v, TreeViolation::BothWays { .. })), "{seen:?}");
}

/// s - o2 - o3 - p, with a longer way s - x - o3: the tree runs
/// s-o2-o3-p. When s-o2 is cut, o2's only way back to the root runs
/// through its own downstream o3: it hands o3 the search at once, o3
/// repairs through x, and p is fed again.
#[test]
fn a_branch_walled_in_by_its_subtree_lets_the_subtree_repair() {
    let names = ["s", "o2", "o3", "x", "p"].map(String::from).to_vec();
    let roles = vec![Role::Server, Role::Relay, Role::Relay, Role::Relay, Role::Pop];
    let links = vec![
        Link { a: 0, b: 1, delay_us: 10_000 },
        Link { a: 1, b: 2, delay_us: 10_000 },
        Link { a: 2, b: 4, delay_us: 10_000 },
        Link { a: 2, b: 3, delay_us: 20_000 },
        Link { a: 3, b: 0, delay_us: 20_000 },
    ];
    let mut w = World::new(Graph::from_links(names, roles, links), Config { watching: 1.0, ..quiet() }, 7);
    w.converge(LIMIT, 0).expect("routes");
    w.start_viewers();
    assert!(w.converge_all(LIMIT, 0, STEP_US).fed_after_us.is_some());
    assert!((w.judge_trees().penalty_sum - 1.0).abs() < 1e-9, "through o2 first");
    w.cut(0);
    let c = w.converge_all(LIMIT, 0, STEP_US);
    let took = c.fed_after_us.expect("p fed again");
    println!("walled-in branch: p fed again after {} ms", took / 1000);
    assert!(took < 1_500_000, "took {took} µs");
    assert!(c.broken.is_empty(), "{:?}", c.broken);
}

/// Many short random schedules on small overlays, where faults hit the
/// trees more often: no tree ever breaks (checked every 50 ms of virtual
/// time), every viewer's POP a server reaches is fed again after each
/// fault.
#[test]
fn many_small_random_schedules_keep_the_trees_sound() {
    let shape = Shape { nodes: 30, servers: 3, pops: 10, nearest: 2, long_haul: 10, side_km: 3000 };
    let config = Config { watching: 0.8, ..Config::default() };
    let mut problems = Vec::new();
    let mut repaired = 0;
    for seed in 1000..1400 {
        let r = run(shape, config, seed, 6);
        repaired += r.repairs.iter().filter(|x| x.1.as_ref().is_ok_and(|us| *us > 0)).count();
        for f in r.failures() {
            problems.push(format!("seed {seed}: {f}\n{}", r.trace.join("\n")));
        }
    }
    println!("400 schedules x 6 faults on 30 nodes: {repaired} faults cut a feed and were repaired");
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.iter().map(|p| p.lines().next().unwrap_or_default().to_string()).collect::<Vec<_>>().join("\n")
    );
}
