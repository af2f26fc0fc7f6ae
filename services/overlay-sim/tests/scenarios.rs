//! The simulator drives overlay-core's route tables through named
//! scenarios and seeded random fault schedules; its oracle must catch
//! broken routes as well as pass good ones.

use overlay_sim::graph::{Graph, Link, Role, Shape};
use overlay_sim::sim::{Config, Violation, World};
use overlay_sim::{run, LIMIT};

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
