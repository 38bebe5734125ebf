//! # mjpfl-client
//!
//! Federated client: joins a coordinator, pulls tasks, downloads the global model (cached by
//! version), trains locally with the round's MJP setting on its data partition, and streams its
//! update back; reconnects with backoff when the coordinator restarts. Also the observer
//! connection the adversary uses.

pub mod connection;
pub mod error;
pub mod observer;
pub mod partition;
pub mod runner;

pub use error::{ClientError, Result};
pub use runner::{ClientConfig, ClientSummary, run};
