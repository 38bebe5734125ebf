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

/// How to reach a coordinator: its address and, when it serves TLS, the CA and (for mutual
/// TLS) this process's certificate. Shared by `client`, `status` and `adversary`.
#[derive(Args, Clone, Debug)]
pub struct ConnectArgs {
    /// Coordinator address (`http://host:port`; with --tls-ca, https is used).
    #[arg(
        long,
        env = "MJPFL_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub coordinator: String,
    /// CA certificate (PEM) the coordinator's certificate must chain to: connect with TLS.
    #[arg(long, env = "MJPFL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), when the coordinator asks for mutual TLS.
    #[arg(long, env = "MJPFL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "MJPFL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the address's host).
    #[arg(long, env = "MJPFL_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ConnectArgs {
    /// The coordinator to dial; `identity` (a certificate and key from a credential pool)
    /// stands in when no --tls-cert is given.
    pub fn target(
        &self,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> anyhow::Result<mjpfl_client::transport::Target> {
        let own = self.tls_cert.as_ref().zip(self.tls_key.as_ref());
        let tls = match &self.tls_ca {
            Some(ca) => Some(mjpfl_client::transport::ClientTls::load(
                ca,
                own.or(identity.map(|(c, k)| (c, k))),
                self.tls_domain.clone(),
            )?),
            None => None,
        };
        Ok(mjpfl_client::transport::Target::new(
            self.coordinator.clone(),
            tls,
        ))
    }
}

/// Reads a token or credential file (surrounding whitespace removed).
pub fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let s = s.trim().to_string();
    anyhow::ensure!(!s.is_empty(), "{} is empty", path.display());
    Ok(s)
}
