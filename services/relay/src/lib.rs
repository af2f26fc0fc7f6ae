//! The overlay's data plane: RTP over UDP forwarded by SSRC, as received,
//! from a stream's upstream to its downstream neighbours and clients.
//! [`table`] holds the pure per-packet decision; [`socket`] the batched
//! socket loop that carries it out.

pub mod continuity;
pub mod gop;
pub mod socket;
pub mod table;

pub use continuity::{Continuity, SharedContinuity};
pub use socket::{CounterSnapshot, Relay};
pub use table::{clock_ms, decide, Accept, DropReason, ForwardTable, Heard, Route, SplitDest, Tally, Verdict};
