//! The client crate's error type: what the coordinator refused or broke, kept apart from what
//! failed locally, because the retry policy in `runner` retries only the former.

/// Errors of a federated client or observer connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the coordinator.
    #[error("cannot reach the coordinator at {endpoint}: {reason}")]
    Unreachable {
        /// Where we tried.
        endpoint: String,
        /// Why it failed.
        reason: String,
    },
    /// The coordinator refused a call.
    #[error("coordinator refused {call}: {status}")]
    Refused {
        /// The RPC.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// The coordinator sent something that breaks the protocol (a malformed reply or task).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Model, data, partitioning or training failure.
    #[error(transparent)]
    Model(#[from] mjp::MjpError),
    /// Tensor stream damage.
    #[error("tensor stream: {0}")]
    Wire(#[from] mjpfl_proto::convert::WireError),
    /// A local task (data loading, training) panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// The join error.
        source: tokio::task::JoinError,
    },
    /// Any other failure on this side of the connection (never the coordinator's doing).
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    /// Wraps a refused call.
    pub fn refused(call: &'static str, status: tonic::Status) -> Self {
        Self::Refused { call, status }
    }

    /// Wraps the join error of a local task.
    pub fn task(task: &'static str, source: tokio::task::JoinError) -> Self {
        Self::TaskFailed { task, source }
    }

    /// Whether this is damage on the wire or a malformed message from the coordinator: worth
    /// asking again, unlike a local failure, which asking again would only repeat.
    pub fn is_protocol_damage(&self) -> bool {
        matches!(self, Self::Protocol(_) | Self::Wire(_))
    }

    /// The gRPC code when this is a refusal.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Refused { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
