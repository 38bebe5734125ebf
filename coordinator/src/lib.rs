//! # mjpfl-coordinator
//!
//! The federation's server side: membership, seeded client sampling, per-round configuration
//! (with the MJP shuffle-ratio schedule), update validation, streaming aggregation, the server
//! optimiser, evaluation, checkpoints and the run directory, and the interception tap the
//! honest-but-curious adversary reads.
//!
//! Layout follows one concern per module: `config` (TOML), `schedule` (shuffle ratios),
//! `aggregate` (strategies and server optimiser), `rundir` (files), `tap` (observers),
//! `federation` (the state machine), `service` (the gRPC edge), `server` (serving and shutdown).

pub mod aggregate;
pub mod config;
pub mod error;
pub mod federation;
pub mod rundir;
pub mod schedule;
pub mod server;
pub mod service;
pub mod tap;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};
pub use federation::Federation;
pub use schedule::ShuffleSchedule;
pub use server::Coordinator;
