//! The attacks crate's error type.

/// Errors of the adversary.
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// The attack does not apply to this update (e.g. no position embedding).
    #[error("not applicable: {0}")]
    NotApplicable(String),
    /// No attack of that name is registered.
    #[error("unknown attack `{name}` (known: {known})")]
    UnknownAttack {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A saved update that cannot be read back.
    #[error("{path}: {reason}")]
    SavedUpdate {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The update or model does not have the expected tensors.
    #[error("missing tensor `{0}` in the update")]
    MissingTensor(String),
    /// Model, data or checkpoint failure.
    #[error(transparent)]
    Model(#[from] mjp::MjpError),
    /// Numerical failure.
    #[error("numerics: {0}")]
    Numerics(String),
    /// Writing results.
    #[error("{path}: {reason}")]
    Output {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Result alias.
pub type Result<T, E = AttackError> = std::result::Result<T, E>;
