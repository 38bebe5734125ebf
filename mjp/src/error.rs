//! The one error type of the model crate: every failure names what was wrong and where.

use std::path::PathBuf;

/// Errors raised by the model, data and training code.
#[derive(Debug, thiserror::Error)]
pub enum MjpError {
    /// A `--device` string that names no known backend.
    #[error("unknown device `{0}`: expected `flex`, `tch-cpu` or `tch-cuda:N`")]
    UnknownDevice(String),
    /// The device needs a backend this binary was built without.
    #[error(
        "device `{device}` needs a binary built with the `{feature}` feature \
         (cargo build --release --features {feature})"
    )]
    BackendNotBuilt {
        /// The device string the user gave.
        device: String,
        /// The Cargo feature that provides it.
        feature: &'static str,
    },
    /// A CUDA device was asked for but LibTorch sees none (or not that index).
    #[error("device `{device}`: LibTorch sees {visible} CUDA device(s)")]
    NoGpu {
        /// The device string the user gave.
        device: String,
        /// How many CUDA devices LibTorch reports.
        visible: usize,
    },
    /// A data file that is missing, truncated or not in the expected format.
    #[error("{path}: {reason}")]
    Data {
        /// The offending file or directory.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A configuration value out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A partition scheme that cannot split the training set (bad parameters, too little data).
    #[error("partition: {0}")]
    Partition(String),
    /// A checkpoint that cannot be read or does not fit the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A named tensor set that does not fit the model (names, shapes, values).
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What was wrong with it.
        reason: String,
    },
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl MjpError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A data error for `path`.
    pub fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = MjpError> = std::result::Result<T, E>;
