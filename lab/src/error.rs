//! The lab crate's error type: the errors of the crates it drives, I/O and parsing, and
//! messages with the context of what was being done (a small `context` extension keeps call
//! sites as short as with anyhow, which only the binary uses).

use std::fmt::Display;

/// Errors of an experiment.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Model, data or checkpoint failure.
    #[error(transparent)]
    Model(#[from] mjp::MjpError),
    /// The coordinator failed.
    #[error(transparent)]
    Coordinator(#[from] mjpfl_coordinator::CoordinatorError),
    /// A client (or the observer connection) failed.
    #[error(transparent)]
    Client(#[from] mjpfl_client::ClientError),
    /// The adversary failed.
    #[error(transparent)]
    Attack(#[from] mjpfl_attacks::AttackError),
    /// I/O without a path of its own (the context says which).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON that does not parse or serialise.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// TOML that does not parse.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// Reading or writing a picture.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// Formatting a report.
    #[error(transparent)]
    Fmt(#[from] std::fmt::Error),
    /// Input that cannot work, or a failure explained in words.
    #[error("{0}")]
    Message(String),
    /// Any of the above, with what was being done.
    #[error("{context}: {source}")]
    Context {
        /// What was being done.
        context: String,
        /// What failed.
        source: Box<LabError>,
    },
}

/// Result alias.
pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// Adds what was being done to an error (or to a missing value).
pub trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl Display) -> Result<T>;
    /// Wraps the error with a lazily built context.
    fn with_context<D: Display>(self, context: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<LabError>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Display) -> Result<T> {
        self.map_err(|e| LabError::Context {
            context: context.to_string(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<D: Display>(self, context: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| LabError::Context {
            context: context().to_string(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Display) -> Result<T> {
        self.ok_or_else(|| LabError::Message(context.to_string()))
    }

    fn with_context<D: Display>(self, context: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| LabError::Message(context().to_string()))
    }
}

/// Returns early with a [`LabError::Message`].
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::LabError::Message(format!($($t)*)))
    };
}
