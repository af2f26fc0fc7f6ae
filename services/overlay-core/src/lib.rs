//! The overlay protocol as pure, deterministic state machines: the topology
//! file, the STATUS route table, per-stream distribution trees, POP
//! sessions and the RTP packet view. No sockets, no clocks, no tasks: the
//! drivers in `onode` and `relay` feed inputs (with the time) and carry out
//! the outputs.

pub mod codec;
pub mod engine;
pub mod join;
pub mod liveness;
pub mod membership;
pub mod moves;
pub mod names;
pub mod repair;
pub mod routing;
pub mod rtp;
pub mod session;
pub mod silence;
#[cfg(test)]
mod testing;
pub mod topology;
pub mod tree;
