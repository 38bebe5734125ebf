//! The coordinator's error type.

use std::path::PathBuf;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Configuration that cannot work.
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
}

/// Result alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
