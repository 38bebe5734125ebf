//! Reaching a coordinator: its address and, for a deployment, TLS (the CA that signed the
//! coordinator's certificate, and this client's own certificate when the coordinator asks for
//! mutual TLS). Plain `http://` is for loopback and tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{ClientError, Result};

/// TLS settings of a client, read from PEM files.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA certificate(s) the coordinator's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// This client's certificate and key (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the coordinator's certificate must carry (default: the endpoint's host).
    pub domain: Option<String>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))
}

impl ClientTls {
    /// Reads the CA and, if given, the client's certificate and key.
    pub fn load(
        ca: &Path,
        identity: Option<(&PathBuf, &PathBuf)>,
        domain: Option<String>,
    ) -> Result<Self> {
        let identity = match identity {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        Ok(Self {
            ca_pem: read(ca)?,
            identity,
            domain,
        })
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}

/// A coordinator's address and how to reach it.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `http://host:port`, `https://host:port` or `host:port`.
    pub endpoint: String,
    /// TLS, when the coordinator serves it.
    pub tls: Option<ClientTls>,
}

impl Target {
    /// `endpoint` with `tls`.
    pub fn new(endpoint: impl Into<String>, tls: Option<ClientTls>) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls,
        }
    }

    /// The URI to dial: `https` whenever TLS is configured.
    pub fn uri(&self) -> String {
        let rest = self
            .endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, r)| r);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if self.endpoint.contains("://") && self.tls.is_none() {
            return self.endpoint.clone();
        }
        format!("{scheme}://{rest}")
    }
}

impl From<&str> for Target {
    fn from(endpoint: &str) -> Self {
        Self::new(endpoint, None)
    }
}

impl From<&String> for Target {
    fn from(endpoint: &String) -> Self {
        Self::new(endpoint.as_str(), None)
    }
}

impl From<&Target> for Target {
    fn from(t: &Target) -> Self {
        t.clone()
    }
}

/// The endpoint of a target, configured as every connection of ours is.
fn endpoint(target: &Target) -> Result<Endpoint> {
    let uri = target.uri();
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ClientError::Unreachable {
            endpoint: uri.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(tls) = &target.tls {
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| ClientError::Unreachable {
                endpoint: uri,
                reason: format!("TLS configuration: {e}"),
            })?;
    }
    Ok(endpoint)
}

/// A channel that connects on first use (and reconnects after failures by itself): what
/// in-process clients share.
pub fn lazy_channel(target: &Target) -> Result<Channel> {
    Ok(endpoint(target)?.connect_lazy())
}

/// Opens a channel to the coordinator.
pub async fn connect(target: impl Into<Target>) -> Result<Channel> {
    let target = target.into();
    let uri = target.uri();
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: uri.clone(),
        reason,
    };
    let endpoint = endpoint(&target)?;
    endpoint.connect().await.map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason.push_str(&format!(": {s}"));
            source = s.source();
        }
        unreachable(format!(
            "{reason} (is the coordinator running, with matching TLS?)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_dials_https_and_plain_keeps_the_given_scheme() {
        assert_eq!(Target::from("h:1").uri(), "http://h:1");
        assert_eq!(Target::from("http://h:1").uri(), "http://h:1");
        let tls = ClientTls {
            ca_pem: vec![],
            identity: None,
            domain: None,
        };
        assert_eq!(
            Target::new("http://h:1", Some(tls.clone())).uri(),
            "https://h:1"
        );
        assert_eq!(Target::new("h:1", Some(tls)).uri(), "https://h:1");
    }
}
