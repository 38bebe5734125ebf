//! # mjpfl-lab
//!
//! Experiments as a library: everything the `mjpfl` binary runs, callable from tests and other
//! programs. Long-running entry points take their shutdown as a future (the binary passes
//! Ctrl-C/SIGTERM, a test its own).
//!
//! Layout:
//! - `simulate`: a whole federation in this process (coordinator, clients, adversary) over
//!   loopback gRPC;
//! - `feed`: the adversary's feed from a model source (in-process tap or remote Observer) to
//!   the attack worker;
//! - `grid`: the sweep file and its cells; `sweep`: running them, resumable cell by cell;
//! - `report`: run and sweep reports regenerated from disk; `plots`: charts and montages;
//!   `stats`: the small statistics they share;
//! - `centralised`: centralised training; `offline`: single cases attacked offline;
//! - `bench`: benchmark bodies that print ratios against a reference measured in the same run;
//! - `runtime`: the async runtime, the shutdown signal, progress bars, timestamps;
//! - `error`: the crate's error type.

pub mod bench;
pub mod centralised;
pub mod error;
pub mod feed;
pub mod grid;
pub mod offline;
pub mod plots;
pub mod report;
pub mod runtime;
pub mod secrets;
pub mod simulate;
pub mod stats;
pub mod sweep;

pub use error::{LabError, Result};
pub use simulate::{ClientTransport, SimulationOptions, SimulationOutcome, run_simulation};
