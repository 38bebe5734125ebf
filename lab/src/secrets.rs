//! A deployment's secrets in one directory, made once (`mjpfl secrets init`): a development CA,
//! the coordinator's TLS certificate, one credential and one client certificate per client, an
//! operator certificate (adversary, health checks), the observer and Status tokens, and the
//! coordinator's credentials file (hashes only). `docker compose up` makes it on first start;
//! for a real deployment use your own CA and keep this layout, or only the parts you need.
//!
//! ```text
//! DIR/ca.pem ca.key                 development CA (keep ca.key off the coordinator)
//! DIR/server.pem server.key         the coordinator's certificate (names from --server-name)
//! DIR/clients.toml                  [auth] clients_file: one [[client]] per client, hashes only
//! DIR/observer.token status.token   [auth] observer_token_file, status_token_file
//! DIR/operator/cert.pem key.pem     a client certificate for the adversary and `mjpfl status`
//! DIR/clients/<id>/credential       <id>:<secret>, what the client presents to join
//! DIR/clients/<id>/cert.pem key.pem the client's certificate (mutual TLS)
//! ```
//!
//! A client started with `--credential-pool DIR/clients` takes the first credential no other
//! running client holds (a lock on `DIR/clients/<id>/lock`, released when the process ends), so
//! identical containers each get their own identity.

use std::fs::File;
use std::path::{Path, PathBuf};

use mjpfl_coordinator::auth::{CredentialsFile, write_private};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Context, LabError, Result};

/// What `secrets init` makes.
#[derive(Clone, Debug)]
pub struct SecretsPlan {
    /// The directory.
    pub dir: PathBuf,
    /// Clients to issue (`client-000` ...), each on its own data partition.
    pub clients: u32,
    /// DNS names and IP addresses the coordinator's certificate covers.
    pub server_names: Vec<String>,
    /// Days the certificates are valid.
    pub days: u32,
}

/// What `secrets init` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    /// Everything was made.
    Created,
    /// The directory already held a deployment's secrets; nothing was touched.
    Existing,
}

/// The files of a secrets directory.
#[derive(Clone, Debug)]
pub struct SecretsLayout {
    dir: PathBuf,
}

impl SecretsLayout {
    /// The layout of `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The coordinator's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// The coordinator's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// The credentials file.
    pub fn clients_file(&self) -> PathBuf {
        self.dir.join("clients.toml")
    }
    /// The observer token.
    pub fn observer_token(&self) -> PathBuf {
        self.dir.join("observer.token")
    }
    /// The Status token.
    pub fn status_token(&self) -> PathBuf {
        self.dir.join("status.token")
    }
    /// The operator's certificate directory.
    pub fn operator(&self) -> PathBuf {
        self.dir.join("operator")
    }
    /// The pool of client identities.
    pub fn pool(&self) -> PathBuf {
        self.dir.join("clients")
    }
}

fn params(names: &[String], days: u32) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(names.to_vec())
        .map_err(|e| LabError::Message(format!("certificate names {names:?}: {e}")))?;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    Ok(p)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    days: u32,
) -> Result<(String, String)> {
    let mut p = params(names, days)?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.use_authority_key_identifier_extension = true;
    p.key_usages.push(KeyUsagePurpose::DigitalSignature);
    p.extended_key_usages.push(usage);
    let key = KeyPair::generate().map_err(|e| LabError::Message(format!("key: {e}")))?;
    let cert = p
        .signed_by(&key, issuer)
        .map_err(|e| LabError::Message(format!("signing {common_name}: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_pair(dir: &Path, (cert, key): &(String, String)) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    mjp::fsutil::write_atomic(&dir.join("cert.pem"), cert.as_bytes())?;
    write_private(&dir.join("key.pem"), key.as_bytes())?;
    Ok(())
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..8)
        .map(|_| format!("{:08x}", rng.random::<u32>()))
        .collect()
}

/// Makes the secrets directory, unless it already holds one (then nothing changes: a restart
/// of `docker compose up` keeps its credentials).
pub fn init(plan: &SecretsPlan) -> Result<Made> {
    let layout = SecretsLayout::new(&plan.dir);
    if layout.clients_file().exists() {
        return Ok(Made::Existing);
    }
    if plan.clients == 0 || plan.server_names.is_empty() || plan.days == 0 {
        return Err(LabError::Message(
            "secrets init needs at least one client, one server name and one day".into(),
        ));
    }
    std::fs::create_dir_all(&plan.dir)
        .with_context(|| format!("creating {}", plan.dir.display()))?;
    let mut ca = params(&[], plan.days)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "mjpfl development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca_key = KeyPair::generate().map_err(|e| LabError::Message(format!("key: {e}")))?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| LabError::Message(format!("CA: {e}")))?;
    write_private(&plan.dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    mjp::fsutil::write_atomic(&layout.ca(), ca_cert.pem().as_bytes())?;
    let issuer = Issuer::new(ca, ca_key);

    let (cert, key) = leaf(
        &issuer,
        &plan.server_names[0],
        &plan.server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        plan.days,
    )?;
    mjp::fsutil::write_atomic(&layout.server_cert(), cert.as_bytes())?;
    write_private(&layout.server_key(), key.as_bytes())?;
    let operator = leaf(
        &issuer,
        "operator",
        &["operator".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        plan.days,
    )?;
    write_pair(&layout.operator(), &operator)?;
    write_private(&layout.observer_token(), random_token().as_bytes())?;
    write_private(&layout.status_token(), random_token().as_bytes())?;

    let mut file = CredentialsFile::default();
    for i in 0..plan.clients {
        let id = format!("client-{i:03}");
        let credential = file.issue(&id, Some(i))?;
        let dir = layout.pool().join(&id);
        let pair = leaf(
            &issuer,
            &id,
            std::slice::from_ref(&id),
            ExtendedKeyUsagePurpose::ClientAuth,
            plan.days,
        )?;
        write_pair(&dir, &pair)?;
        write_private(&dir.join("credential"), credential.to_string().as_bytes())?;
    }
    // Last: its presence marks the directory complete.
    file.save(&layout.clients_file())?;
    Ok(Made::Created)
}

/// One client identity taken from a pool: its credential, its certificate if it has one, and
/// the lock that keeps other clients from taking it while this process runs.
#[derive(Debug)]
pub struct PoolIdentity {
    /// `<id>:<secret>`.
    pub credential: String,
    /// The certificate and key, when the identity has them.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    _lock: File,
}

/// Takes the first identity of `pool` that no running process holds.
pub fn take_from_pool(pool: &Path) -> Result<PoolIdentity> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(pool)
        .with_context(|| format!("reading the credential pool {}", pool.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("credential").is_file())
        .collect();
    dirs.sort();
    for dir in &dirs {
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            continue;
        }
        let credential = std::fs::read_to_string(dir.join("credential"))
            .with_context(|| format!("reading {}", dir.join("credential").display()))?
            .trim()
            .to_string();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let cert_and_key = (cert.is_file() && key.is_file()).then_some((cert, key));
        return Ok(PoolIdentity {
            credential,
            cert_and_key,
            _lock: lock,
        });
    }
    Err(LabError::Message(format!(
        "every one of the {} credentials in {} is held by a running client; issue more \
         (mjpfl secrets init --clients N on a fresh directory, or mjpfl credentials issue)",
        dirs.len(),
        pool.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_complete_directory_once_and_the_pool_hands_out_each_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let plan = SecretsPlan {
            dir: dir.path().join("s"),
            clients: 2,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            days: 30,
        };
        assert_eq!(init(&plan).unwrap(), Made::Created);
        let layout = SecretsLayout::new(&plan.dir);
        let clients = CredentialsFile::load(&layout.clients_file()).unwrap();
        assert_eq!(clients.clients.len(), 2);
        let before = std::fs::read(layout.server_cert()).unwrap();
        assert_eq!(init(&plan).unwrap(), Made::Existing);
        assert_eq!(std::fs::read(layout.server_cert()).unwrap(), before);
        let a = take_from_pool(&layout.pool()).unwrap();
        let b = take_from_pool(&layout.pool()).unwrap();
        assert_ne!(a.credential, b.credential);
        assert!(a.credential.starts_with("client-000:"));
        assert!(a.cert_and_key.is_some());
        assert!(take_from_pool(&layout.pool()).is_err(), "both are held");
        drop(a);
        let c = take_from_pool(&layout.pool()).unwrap();
        assert!(
            c.credential.starts_with("client-000:"),
            "a released identity is reused"
        );
    }
}
