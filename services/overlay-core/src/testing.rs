//! Helpers the unit tests of several modules share.

use std::time::Instant;

use crate::routing::{Probe, RouteTable, RoutingConfig};
use crate::tree::{Requester, Source, StreamDesc, Trees};

/// A copy of round `seq` of `server`'s probe for stream `test`, sent by
/// `sender` along `visited` (the server first, the sender last), with the
/// delay summed so far.
pub(crate) fn probe(server: &str, seq: u64, sender: &str, visited: &[&str], delay_us: u64) -> Probe {
    Probe {
        server: server.into(),
        seq,
        send_time_unix_us: 0,
        hops: visited.len() as u32,
        visited: visited.iter().map(|s| s.to_string()).collect(),
        path_delay_us: delay_us,
        best_delay_us: delay_us,
        streams: vec!["test".into()],
        sender: sender.into(),
        withdrawn: false,
    }
}

/// `routes`' node carrying `test` from s1: fed by `up` (wherever the routes
/// sent the join), feeding `down`. The routes need some way to s1 at `now`.
pub(crate) fn carrying(routes: &RouteTable, up: &str, down: &str, now: Instant) -> Trees {
    let mut trees = Trees::new(routes.me(), []);
    trees.request("test", Requester::Neighbour(down.into()), &[down.into()], 1, routes, now);
    let desc = StreamDesc {
        stream: "test".into(),
        server: "s1".into(),
        ssrcs: vec![1, 2],
        depth: 1,
        route: vec!["s1".into(), up.into()],
        delay_us: 0,
    };
    trees.joined(Source::Neighbour(up.into()), desc);
    assert_eq!(trees.branch("test").map(|b| &b.source), Some(&Source::Neighbour(up.into())), "fed by {up}");
    trees
}

/// `me`'s route table with these neighbours, every link measured with a
/// round trip of 0 (a copy over an unmeasured link is not learnt).
pub(crate) fn table(me: &str, neighbours: &[&str]) -> RouteTable {
    table_with(me, neighbours, RoutingConfig::default())
}

/// [`table`] with its own route selection knobs.
pub(crate) fn table_with(me: &str, neighbours: &[&str], config: RoutingConfig) -> RouteTable {
    let mut routes = RouteTable::new(me, neighbours.iter().map(|s| s.to_string()).collect(), config);
    for n in neighbours {
        routes.on_link_rtt(n, 0);
    }
    routes
}
