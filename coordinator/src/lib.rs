//! # mjpfl-coordinator
//!
//! The federation's server side: membership, seeded client sampling, per-round configuration
//! (with the MJP shuffle-ratio schedule), update validation, streaming aggregation, the server
//! optimiser, evaluation, checkpoints and the run directory, and the interception tap the
//! honest-but-curious adversary reads.
//!
//! Layout, one concern per module:
//!
//! - `config`: the TOML configuration (every section, defaults, validation);
//! - `schedule`: the MJP shuffle-ratio schedule;
//! - `admission`: what one update may weigh and move (weights, norm bound, metrics);
//! - `auth`: the shared secret, per-client credentials, the observer's and Status's tokens;
//! - `tls`: TLS and mutual TLS of the gRPC server;
//! - `wire_limits`: bounds on gRPC messages begun but never finished (size, time, memory);
//! - `aggregate`: aggregation strategies and the server optimiser;
//! - `rundir`: the run directory's files;
//! - `tap`: the interception tap observers read;
//! - `federation`: the state machine shared by services and driver, with its behaviour in
//!   `federation/membership` (join, sessions), `federation/round` (sampling, round configs,
//!   tasks, admission, acceptance) and `federation/driver` (round loop, commit, evaluation);
//! - `service`: the gRPC edge (wire types in and out, refusals to statuses);
//! - `listener`: accepting connections within a cap, idle connections closed;
//! - `server`: binding, serving and shutdown.

pub mod admission;
pub mod aggregate;
pub mod auth;
pub mod config;
pub mod error;
pub mod federation;
pub mod listener;
pub mod privacy;
pub mod rundir;
pub mod schedule;
pub mod server;
pub mod service;
pub mod tap;
pub mod tls;
pub mod wire_limits;

pub use config::CoordinatorConfig;
pub use error::{CoordinatorError, Result};
pub use federation::Federation;
pub use schedule::{DefensePhase, DefenseSchedule, RoundDefense, ShuffleSchedule};
pub use server::Coordinator;
