//! linkem: a link emulator for the network-namespace lab, for kernels
//! without netem.
//!
//! It runs in a small "link namespace" in the middle of a lab link: the two
//! nodes' veths end there, and linkem bridges them with two AF_PACKET
//! sockets, so the nodes still share one subnet and ARP, TCP and UDP cross
//! unchanged. Per direction it applies delay, jitter (without reordering
//! unless asked), random loss and a rate limit with a bounded queue.
//!
//! [`schedule`] is the whole emulation as a pure function of time (tested
//! without sockets); [`driver`] is the thin socket loop that carries it
//! out; [`control`] is the control socket's protocol, with the counters it
//! reports; [`packet`] and [`offload`] wrap the system calls; [`testbed`]
//! builds three namespaces around a linkem for the tests and the bench.

pub mod control;
pub mod driver;
pub mod offload;
pub mod packet;
pub mod schedule;
pub mod testbed;

pub use control::{Dir, DirStats, Request, Snapshot};
pub use schedule::{Scheduler, Settings, Update, Verdict};
