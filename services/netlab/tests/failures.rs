//! Faults while clients watch, on the default lab (network namespaces,
//! real processes, headless clients): every client must still be decoding
//! at the end; the media gap each fault caused is printed. Needs root.

mod common;

use common::*;
use netlab::faults::{self, Fault};
use netlab::lab::Lab;

fn check(fault: Fault) {
    let Some((bins, _one)) = product_lab() else { return };
    let lab = Lab::load(&lab_path("seed.json")).expect("seed lab");
    let prefix = test_prefix();
    let run = faults::run_in_fresh_lab(&lab, &bins, fault, &prefix, None).expect("fault run");
    for n in &run.notes {
        println!("{n}");
    }
    for c in &run.clients {
        println!(
            "{}: affected {} gap {:.0} ms final fps {:?} POP {} switches {}",
            c.host, c.affected, c.longest_gap_ms, c.final_fps, c.stats["pop_name"], c.stats["pop_switches"]
        );
    }
    println!("{}: gap {:.0} ms", fault.name(), run.gap_ms());
    assert!(run.clients.iter().any(|c| c.affected), "the fault hit no client");
    let problems = run.problems();
    assert!(problems.is_empty(), "{}\n(logs in /tmp/netlab-{prefix})", problems.join("\n"));
    assert!(netlab::sys::lab_namespaces(&prefix).unwrap().is_empty(), "lab left behind");
    remove_lab_folder(&prefix);
}

#[test]
fn a_killed_relay_is_routed_around() {
    check(Fault::KillRelay);
}

#[test]
fn a_tree_link_down_and_up() {
    check(Fault::LinkDown);
}

#[test]
fn clients_of_a_killed_pop_move() {
    check(Fault::KillPop);
}

#[test]
fn the_tree_reroots_when_its_server_dies() {
    check(Fault::KillRootServer);
}

#[test]
fn streams_go_on_when_the_bootstrapper_restarts() {
    check(Fault::RestartBootstrapper);
}

#[test]
fn a_restarted_relay_rejoins() {
    check(Fault::RestartRelay);
}
