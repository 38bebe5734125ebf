//! Argument types and helpers shared by several subcommands.

use std::path::PathBuf;

use clap::Args;
use mjp::data::DataSource;
use mjp::{DeviceSpec, PeMode, VitConfig};

/// Sets up `RUST_LOG`-controlled logging to stderr (info by default).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Which model to build.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Architecture preset: vit-micro-28, vit-tiny-32, deit-s-224.
    #[arg(long, default_value = "vit-micro-28")]
    pub preset: String,
    /// Position-embedding mode: learned, none, naive-shuffle, mjp.
    #[arg(long, default_value = "mjp")]
    pub pe: PeMode,
    /// DAL head: off, linear, nonlinear (MJP only).
    #[arg(long, default_value = "nonlinear")]
    pub dal: mjp::DalKind,
    /// Override the number of classes of the preset.
    #[arg(long)]
    pub classes: Option<usize>,
}

impl ModelArgs {
    /// The architecture.
    pub fn config(&self) -> anyhow::Result<VitConfig> {
        let mut c = VitConfig::preset(&self.preset)?.with_pe(self.pe);
        c.dal = self.dal;
        if let Some(k) = self.classes {
            c.num_classes = k;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Where data comes from.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// Dataset: fashion-mnist, mnist, idx:DIR, cifar10:DIR, cifar100:DIR, folder:DIR.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: DataSource,
    /// Directory that scripts/fetch-data.sh filled.
    #[arg(long, env = "MJPFL_DATA", default_value = "data")]
    pub data_dir: PathBuf,
}

/// Compute device.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// flex (pure-Rust CPU), tch-cpu or tch-cuda:N (binaries built with --features tch).
    #[arg(long, default_value = "flex")]
    pub device: DeviceSpec,
}
