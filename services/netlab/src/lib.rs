//! netlab: the overlay's underlay in Linux network namespaces.
//!
//! A lab file ([`lab`]) describes hosts, routers, links, LANs and roles;
//! [`routes`] computes shortest-path static routes and [`plan`] turns the
//! lab into ip commands and the link emulators (linkem) of its impaired
//! links; [`delays`] computes the overlay's expected next hops from the
//! link delays; all pure and tested without root. [`sys`] runs the
//! commands, [`run`] brings a lab up and down and starts the emulators and
//! the roles,
//! [`media`] counts RTP bytes per overlay link and stream with nftables,
//! [`analysis`] checks the distribution trees from those counts, and
//! [`cpu`] accounts for the CPU each process uses, and [`demo`] plays the
//! whole scenario and prints the report.

pub mod addr;
pub mod analysis;
pub mod browser;
pub mod cpu;
pub mod delays;
pub mod demo;
pub mod faults;
pub mod lab;
pub mod media;
pub mod plan;
pub mod probe;
pub mod routes;
pub mod run;
pub mod state;
pub mod sys;
