//! The generated wire types and service stubs of `proto/federation.proto` (package `mjpfl.v1`),
//! and the one place where wire types become domain types ([`convert`]). Only the gRPC edges
//! (coordinator service, client connection, observer tap) use this crate.

pub mod convert;

/// Package `mjpfl.v1` (generated).
#[allow(
    missing_docs,
    clippy::large_enum_variant,
    clippy::doc_overindented_list_items,
    clippy::doc_lazy_continuation
)]
pub mod v1 {
    tonic::include_proto!("mjpfl.v1");
}

/// Largest tensor chunk on the wire (1 MiB).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// gRPC message size limit set on both sides (one chunk plus framing headroom).
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_BYTES + (64 << 10);
