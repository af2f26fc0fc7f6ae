//! The overlay's control-plane contract, generated from `proto/overlay/v1`
//! and included once here for every binary.

pub mod v1 {
    tonic::include_proto!("overlay.v1");
}

pub use v1::*;
