//! The client crate's error type.

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
    /// The coordinator sent something that breaks the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Model, data or training failure.
    #[error(transparent)]
    Model(#[from] mjp::MjpError),
    /// Data partitioning failure.
    #[error(transparent)]
    Partition(#[from] crate::partition::PartitionError),
    /// Tensor stream damage.
    #[error("tensor stream: {0}")]
    Wire(#[from] mjpfl_proto::convert::WireError),
}

impl ClientError {
    /// Wraps a refused call.
    pub fn refused(call: &'static str, status: tonic::Status) -> Self {
        Self::Refused { call, status }
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
