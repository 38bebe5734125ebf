//! TLS on the gRPC server (rustls through tonic), with optional mutual TLS: when `client_ca` is
//! set, a connection must present a certificate signed by it before any gRPC call is read.
//! `mjpfl secrets init` makes a development CA, the server's certificate and one per client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::{CoordinatorError, Result};

/// `[server.tls]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA (PEM): mutual TLS. Unset: any
    /// client may connect and authenticates by its credential alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// A TLS handshake must finish within this many seconds.
    #[serde(default = "default_handshake_secs")]
    pub handshake_timeout_secs: f64,
}

fn default_handshake_secs() -> f64 {
    10.0
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| CoordinatorError::io(path, e))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(CoordinatorError::ConfigFile {
            path: path.to_path_buf(),
            reason: format!("not a PEM file ({what} expected)"),
        });
    }
    Ok(bytes)
}

impl TlsSection {
    /// The server's TLS configuration, with every file read and checked now (a missing key is
    /// an error at start, not at the first connection).
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        if !(self.handshake_timeout_secs > 0.0 && self.handshake_timeout_secs <= 1e9) {
            return Err(CoordinatorError::Config(
                "server.tls.handshake_timeout_secs must be > 0".into(),
            ));
        }
        let cert = read_pem(&self.cert, "certificate")?;
        let key = read_pem(&self.key, "private key")?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(Duration::from_secs_f64(self.handshake_timeout_secs));
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(ca, "CA certificate")?));
        }
        Ok(config)
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }
}
