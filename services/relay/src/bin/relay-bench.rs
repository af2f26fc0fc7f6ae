//! Stand-alone relay for the benchmark harness (shared/bench/bench.py):
//! forwards every RTP packet reaching LISTEN, whatever its SSRC and source,
//! to K ports from FIRST on 127.0.0.1, through the same table and socket
//! loop as `onode`. With RELAY_BENCH_CACHE_GOP=1 the route also keeps a
//! GOP cache and drops copies, as a node's video route does.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use relay::{Accept, ForwardTable, Relay, Route};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: relay-bench LISTEN_PORT FIRST_PORT K SSRC\nForwards RTP with SSRC from 127.0.0.1:LISTEN_PORT to K consecutive ports.");
        std::process::exit(2);
    }
    let port = |i: usize| -> u16 { args[i].parse().unwrap_or_else(|_| panic!("argument {i} is not a port")) };
    let listen = port(1);
    let first = port(2);
    let k: u16 = args[3].parse().expect("K is a number");
    let ssrc: u32 = args[4].parse().expect("SSRC is a number");
    let relay = Relay::bind(([127, 0, 0, 1], listen).into()).expect("bind the listen port");
    let mut table = ForwardTable::default();
    let downstream = (0..k).map(|j| ([127, 0, 0, 1], first + j).into()).collect();
    table.insert(
        ssrc,
        Route {
            cache_gop: std::env::var_os("RELAY_BENCH_CACHE_GOP").is_some_and(|v| v == "1"),
            ..Route::plain(Accept::Any, downstream)
        },
    );
    relay.publish(table);
    let stop = Arc::new(AtomicBool::new(false));
    relay.run(&stop);
}
