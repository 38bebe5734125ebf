//! # mjp — the MJP-ViT model crate
//!
//! A Vision Transformer with every position-embedding mode the Masked Jigsaw Puzzle paper
//! compares (`learned`, `none`, `naive-shuffle`, `mjp`), the block-wise jigsaw mask generator,
//! the DAL regressor, real-data loaders, checkpoints, and the local training step shared by
//! centralised training and federated clients.
//!
//! The backend is chosen at run time through [`device::DeviceSpec`]; tensors carry no backend
//! type parameter (burn 0.22).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod defense;
pub mod device;
pub mod error;
pub mod fl;
pub mod fsutil;
pub mod jigsaw;
pub mod layout;
pub mod model;
pub mod params;
pub mod partition;
pub mod seed;
pub mod train;

pub use config::{DalKind, JigsawConfig, LambdaSchedule, PeMode, VitConfig};
pub use defense::Defense;
pub use device::DeviceSpec;
pub use error::{MjpError, Result};
pub use model::Vit;
pub use params::{NamedTensor, NamedTensors};
pub use partition::PartitionScheme;
pub use seed::Seed;

/// Re-exported so downstream crates use the same burn without naming it.
pub use burn;
/// The fused CPU kernels the model runs on (LayerNorm, attention, GELU, AdamW).
pub use mjpfl_kernels as kernels;
