//! The default lab (the original network) in network namespaces: the
//! underlay alone, then, when onode and oclient are built, the whole
//! product with five clients (issue 3's acceptance), and again with 5% loss
//! on a tree link. Needs root; skips with a reason otherwise.

mod common;

use common::*;
use netlab::lab::{Impairment, Lab};

fn seed() -> Lab {
    Lab::load(&lab_path("seed.json")).expect("seed lab validates")
}

#[test]
fn seed_network_reaches_everywhere_and_leaves_nothing() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = seed();
    let (guard, st) = up(&lab, None, None);
    assert_eq!(netlab::sys::lab_namespaces(&guard.prefix).unwrap().len(), st.namespaces.len());
    assert_full_reachability(&lab, &guard.prefix);
    // o3 and o7 are on different subnets; the plain router r1 joins them.
    assert!(route_get(&guard.prefix, "o3", "10.0.14.1").contains("via 10.0.18.1 dev v-r1"));
    assert!(route_get(&guard.prefix, "o7", "10.0.18.2").contains("via 10.0.14.2 dev v-r1"));
    // Clients reach the bootstrapper through their POP.
    assert!(route_get(&guard.prefix, "c3", "10.0.25.10").contains("via 10.0.7.2"));
    down_and_check_clean(guard);
    remove_lab_folder(&st.prefix);
}

#[test]
fn seed_lab_acceptance() {
    let Some((bins, _one)) = product_lab() else { return };
    let out = acceptance(&seed(), &bins);
    out.assert_no_problems();
    // The three clients behind o6 share one upstream copy per stream.
    for tree in &out.scenario.trees.trees {
        let into_o6: Vec<_> = tree.links.iter().filter(|(d, _, _)| d.to == "o6").collect();
        assert!(into_o6.len() <= 1, "{}: {into_o6:?}", tree.stream);
    }
    remove_lab_folder(&out.prefix);
}

#[test]
fn seed_lab_with_loss_on_a_tree_link() {
    let Some((bins, _one)) = product_lab() else { return };
    // o6's only overlay neighbour is o4: o4-o6 is on every tree to o6.
    let mut lab = seed();
    let mut spec = lab.spec.clone();
    let link = spec.links.iter_mut().find(|l| l.a.host == "o4" && l.b.host == "o6").expect("link o4-o6");
    link.impair = Impairment { loss_pct: Some(5.0), ..Impairment::default() };
    lab = Lab::from_spec(spec, lab.file.as_deref()).expect("lab with loss validates");
    let out = acceptance(&lab, &bins);
    out.assert_no_problems();
    for c in out.scenario.clients.iter().filter(|c| ["c2", "c3", "c4"].contains(&c.host.as_str())) {
        let s = c.stats.as_ref().expect("stats");
        assert!(s.packets_lost > 0, "client {} behind the lossy link reports no loss", c.label);
    }
    remove_lab_folder(&out.prefix);
}
