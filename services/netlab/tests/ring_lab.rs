//! The second lab (a ring of relays with a chord and routers between some
//! overlay neighbours): the underlay alone, then the acceptance when onode
//! and oclient are built. Needs root; skips with a reason otherwise.

mod common;

use common::*;
use netlab::lab::Lab;

fn ring() -> Lab {
    Lab::load(&lab_path("ring.json")).expect("ring lab validates")
}

#[test]
fn ring_network_reaches_everywhere_and_leaves_nothing() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = ring();
    let (guard, st) = up(&lab, None, None);
    assert_full_reachability(&lab, &guard.prefix);
    // Overlay neighbours o2 and o3 talk through router ra.
    assert!(route_get(&guard.prefix, "o2", "10.1.5.3").contains("via 10.1.4.254"));
    // The routers' own link is a shortcut of the underlay: o3 reaches o6's
    // router-side subnet through ra and rb.
    assert!(route_get(&guard.prefix, "ra", "10.1.9.6").contains("via 10.1.15.2"));
    // The chord's rate limit and delay are in place, in its emulator.
    let chord = st.emulators.iter().find(|e| e.link == "o1-o4").expect("the chord's emulator");
    let s = netlab::run::emulator_stats(chord).expect("emulator stats");
    assert_eq!((s.a2b.settings.rate_kbit, s.b2a.settings.delay_ms), (20000, 30.0));
    down_and_check_clean(guard);
    remove_lab_folder(&st.prefix);
}

#[test]
fn ring_lab_acceptance() {
    let Some((bins, _one)) = product_lab() else { return };
    let out = acceptance(&ring(), &bins);
    out.assert_no_problems();
    remove_lab_folder(&out.prefix);
}
