//! The coordinator's error type.

use std::path::PathBuf;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Configuration that cannot work (values out of range, an initial checkpoint that does not
    /// fit).
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration file that cannot be parsed.
    #[error("{path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Model, data or checkpoint failure.
    #[error(transparent)]
    Model(#[from] mjp::MjpError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address from `[server] listen`.
        addr: String,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// A task of the coordinator (startup, round driver, round commit) panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// The join error (panic or cancellation).
        source: tokio::task::JoinError,
    },
    /// A round missed `min_fit` on every attempt; the federation stopped.
    #[error("round {round} could not collect min_fit={min_fit} updates after {attempts} attempts")]
    Starved {
        /// The round.
        round: u32,
        /// Updates it needed.
        min_fit: u32,
        /// Attempts made.
        attempts: u32,
    },
    /// The aggregated model is not finite; the round was not committed.
    #[error("round {round}: aggregated model is not finite ({reason}); lower the learning rates")]
    Diverged {
        /// The round.
        round: u32,
        /// Which tensor went non-finite.
        reason: String,
    },
    /// I/O on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The run directory is inconsistent.
    #[error("run directory {path}: {reason}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl CoordinatorError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps the join error of a coordinator task.
    pub fn task(task: &'static str, source: tokio::task::JoinError) -> Self {
        Self::TaskFailed { task, source }
    }
}

/// Result alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
