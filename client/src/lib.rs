//! # mjpfl-client
//!
//! Federated client: joins a coordinator, pulls tasks, downloads the global model (cached by
//! version), trains locally with the round's MJP setting on its data partition, and streams its
//! update back; reconnects with backoff when the coordinator restarts. Also the observer
//! connection the adversary uses.
//!
//! Layout: `protocol` (the Federation protocol on domain types: connect, join, task, download,
//! submit, status), `runner` (the training client's loop and retry policy), `observer` (the
//! adversary's tap connection), `workers` (thread pools that in-process clients train on),
//! `error`.

pub mod error;
pub mod observer;
pub mod protocol;
pub mod runner;
pub mod shared;
pub mod transport;
pub mod workers;

pub use error::{ClientError, Result};
pub use runner::{ClientConfig, ClientSummary, run};
