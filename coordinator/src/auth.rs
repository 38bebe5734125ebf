//! Who may do what. Clients join with the federation's shared secret (the simulator's loopback
//! default) or, in a deployment, each with its own credential `<client-id>:<secret>` whose hash
//! is listed in a credentials file (`mjpfl credentials issue`, `mjpfl secrets init`). The
//! observer (adversary) endpoint and, optionally, `Status` have tokens of their own. Every
//! secret may be configured as `sha256:<hex>` instead of in the clear, and every comparison
//! takes the same time whatever the presented value.
//!
//! With per-client credentials a client is its credential: its id is the credential's id, and
//! a second join with the same credential retires the first session, so one credential is one
//! sampled client however often it joins (sybils need credentials, not just connections).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoordinatorError, Result};

/// The join secret of a configuration that sets none (fine on loopback, refused elsewhere).
pub const DEFAULT_JOIN_SECRET: &str = "mjpfl";
/// The observer token of a configuration that sets none (fine on loopback, refused elsewhere).
pub const DEFAULT_OBSERVER_TOKEN: &str = "observer";
/// Longest credential id.
pub const MAX_ID: usize = 64;

/// `[auth]`: where the deployment's credentials live (read once, at start).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Per-client credentials (a TOML file of `[[client]]` entries with `id`, `sha256` and an
    /// optional `partition`). When set, only these credentials may join; the shared
    /// `federation.join_secret` is refused.
    pub clients_file: Option<PathBuf>,
    /// A file holding the observer token (overrides `federation.observer_token`).
    pub observer_token_file: Option<PathBuf>,
    /// A file holding the token `Status` calls must present (unset: `Status` answers anyone,
    /// which health checks rely on; it reveals only round numbers and accuracies).
    pub status_token_file: Option<PathBuf>,
    /// Sessions kept at once; a join beyond is refused with RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            clients_file: None,
            observer_token_file: None,
            status_token_file: None,
            max_sessions: 100_000,
        }
    }
}

/// The SHA-256 of `s`, hex.
pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `presented` is the secret `configured` names (`configured` in the clear or as
/// `sha256:<hex>`). Both sides are hashed first, so the comparison is over 32 bytes whatever
/// the lengths, and it looks at every byte.
pub fn secret_matches(configured: &str, presented: &str) -> bool {
    if configured.is_empty() {
        return false;
    }
    let want = match configured.strip_prefix("sha256:") {
        Some(hex) => hex.to_ascii_lowercase(),
        None => sha256_hex(configured),
    };
    let got = sha256_hex(presented);
    want.len() == got.len()
        && want
            .bytes()
            .zip(got.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A credential as a client holds it: `<id>:<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The client id it stands for.
    pub id: String,
    /// The secret (64 hex digits when issued by mjpfl).
    pub secret: String,
}

impl Credential {
    /// A fresh credential for `id` (256 random bits from the OS generator).
    pub fn issue(id: &str) -> Result<Self> {
        check_id(id)?;
        use rand::Rng;
        let mut rng = rand::rng();
        let secret = (0..8)
            .map(|_| format!("{:08x}", rng.random::<u32>()))
            .collect();
        Ok(Self {
            id: id.to_string(),
            secret,
        })
    }

    /// Parses `<id>:<secret>`.
    pub fn parse(s: &str) -> Option<Self> {
        let (id, secret) = s.trim().split_once(':')?;
        (check_id(id).is_ok() && !secret.is_empty()).then(|| Self {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

impl std::fmt::Display for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.secret)
    }
}

/// A client id must be 1-64 characters of `[A-Za-z0-9._-]` (it names audit directories and
/// appears in logs).
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::Config(format!(
            "client id {:?} must be 1-{MAX_ID} characters of A-Z a-z 0-9 . _ -",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// One line of the credentials file: the hash of a client's secret, never the secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialEntry {
    /// Client id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    /// Data partition of this client (simulated data); unset: the coordinator assigns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// The credentials file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// The clients.
    #[serde(default, rename = "client")]
    pub clients: Vec<CredentialEntry>,
}

impl CredentialsFile {
    /// Reads `path` (every id valid and unique, every hash 64 hex digits).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::io(path, e))?;
        let file: Self = toml::from_str(&text).map_err(|e| CoordinatorError::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for c in &file.clients {
            check_id(&c.id)?;
            if !seen.insert(c.id.as_str()) {
                return Err(CoordinatorError::ConfigFile {
                    path: path.to_path_buf(),
                    reason: format!("client id {} listed twice", c.id),
                });
            }
            if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(CoordinatorError::ConfigFile {
                    path: path.to_path_buf(),
                    reason: format!("client {}: sha256 must be 64 hex digits", c.id),
                });
            }
        }
        Ok(file)
    }

    /// Reads `path`, or an empty file when it does not exist yet.
    pub fn load_or_empty(path: &Path) -> Result<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::default())
        }
    }

    /// Adds a fresh credential for `id` (refused if the id is listed) and returns it: the only
    /// time the secret exists outside the client.
    pub fn issue(&mut self, id: &str, partition: Option<u32>) -> Result<Credential> {
        if self.clients.iter().any(|c| c.id == id) {
            return Err(CoordinatorError::Config(format!(
                "client id {id} already has a credential (remove its entry to reissue)"
            )));
        }
        let credential = Credential::issue(id)?;
        self.clients.push(CredentialEntry {
            id: id.to_string(),
            sha256: sha256_hex(&credential.secret),
            partition,
        });
        Ok(credential)
    }

    /// Writes the file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# mjpfl per-client credentials: hashes only (the secrets are with the clients).\n\
             # Add one: mjpfl credentials issue --file {} --id NAME\n\n{}",
            path.display(),
            toml::to_string_pretty(self).expect("credentials serialise")
        );
        write_private(path, text.as_bytes())
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (secrets and keys).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    mjp::fsutil::write_atomic(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| CoordinatorError::io(path, e))?;
    }
    Ok(())
}

/// How clients prove they may join.
#[derive(Clone, Debug)]
enum Join {
    /// One secret for everyone.
    Shared(String),
    /// One credential each, by id.
    PerClient(BTreeMap<String, CredentialEntry>),
}

/// Who a successful join is.
#[derive(Clone, Debug, PartialEq)]
pub enum Member {
    /// Someone with the shared secret (the coordinator names it).
    Anonymous,
    /// The holder of a credential.
    Credential {
        /// Its id.
        id: String,
        /// Its partition, if the credentials file gives one.
        partition: Option<u32>,
    },
}

/// The coordinator's secrets, resolved at start.
#[derive(Clone, Debug)]
pub struct Auth {
    join: Join,
    observer: String,
    status: Option<String>,
}

fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| CoordinatorError::io(path, e))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(CoordinatorError::ConfigFile {
            path: path.to_path_buf(),
            reason: "the token file is empty".into(),
        });
    }
    Ok(token)
}

impl Auth {
    /// Reads the credentials and token files the configuration names.
    pub fn load(federation_secret: &str, observer_token: &str, auth: &AuthSection) -> Result<Self> {
        let join = match &auth.clients_file {
            Some(path) => Join::PerClient(
                CredentialsFile::load(path)?
                    .clients
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect(),
            ),
            None => Join::Shared(federation_secret.to_string()),
        };
        let observer = match &auth.observer_token_file {
            Some(path) => read_token(path)?,
            None => observer_token.to_string(),
        };
        let status = auth
            .status_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        Ok(Self {
            join,
            observer,
            status,
        })
    }

    /// Who presents `secret` to join, or `None` when it opens nothing.
    pub fn member(&self, secret: &str) -> Option<Member> {
        match &self.join {
            Join::Shared(s) => secret_matches(s, secret).then_some(Member::Anonymous),
            Join::PerClient(clients) => {
                let credential = Credential::parse(secret)?;
                let entry = clients.get(&credential.id)?;
                secret_matches(&format!("sha256:{}", entry.sha256), &credential.secret).then(|| {
                    Member::Credential {
                        id: entry.id.clone(),
                        partition: entry.partition,
                    }
                })
            }
        }
    }

    /// Whether `token` is the observer's.
    pub fn is_observer(&self, token: &str) -> bool {
        secret_matches(&self.observer, token)
    }

    /// Whether a Status call presenting `token` is answered.
    pub fn may_see_status(&self, token: &str) -> bool {
        self.status
            .as_deref()
            .is_none_or(|want| secret_matches(want, token))
    }

    /// Clients with a credential (0 with the shared secret).
    pub fn credentials(&self) -> usize {
        match &self.join {
            Join::Shared(_) => 0,
            Join::PerClient(c) => c.len(),
        }
    }

    /// The built-in secrets still in effect, which anyone who has read the README knows: a
    /// coordinator that listens beyond loopback refuses to start with any of them.
    pub fn built_in_secrets(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if let Join::Shared(s) = &self.join
            && secret_matches(s, DEFAULT_JOIN_SECRET)
        {
            out.push("federation.join_secret");
        }
        if secret_matches(&self.observer, DEFAULT_OBSERVER_TOKEN) {
            out.push("federation.observer_token");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_in_the_clear_and_as_hashes_only() {
        assert!(secret_matches("s3cret", "s3cret"));
        assert!(!secret_matches("s3cret", "s3cre"));
        assert!(!secret_matches("s3cret", ""));
        assert!(!secret_matches("", ""));
        let hashed = format!("sha256:{}", sha256_hex("s3cret"));
        assert!(secret_matches(&hashed, "s3cret"));
        assert!(secret_matches(
            &hashed.to_uppercase().replace("SHA256", "sha256"),
            "s3cret"
        ));
        assert!(!secret_matches(&hashed, &hashed));
    }

    #[test]
    fn issued_credentials_open_only_their_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        let mut file = CredentialsFile::default();
        let a = file.issue("hospital-a", Some(3)).unwrap();
        let b = file.issue("hospital-b", None).unwrap();
        assert!(file.issue("hospital-a", None).is_err());
        assert!(file.issue("bad id", None).is_err());
        file.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a.secret), "the file keeps hashes only");
        let auth = Auth::load(
            DEFAULT_JOIN_SECRET,
            "obs",
            &AuthSection {
                clients_file: Some(path),
                ..AuthSection::default()
            },
        )
        .unwrap();
        assert_eq!(
            auth.member(&a.to_string()),
            Some(Member::Credential {
                id: "hospital-a".into(),
                partition: Some(3)
            })
        );
        assert!(matches!(
            auth.member(&b.to_string()),
            Some(Member::Credential { .. })
        ));
        let swapped = format!("hospital-a:{}", b.secret);
        assert_eq!(auth.member(&swapped), None);
        assert_eq!(auth.member(DEFAULT_JOIN_SECRET), None, "no shared secret");
        assert_eq!(auth.member("nobody:xyz"), None);
        assert!(auth.built_in_secrets().is_empty());
    }

    #[test]
    fn broken_credentials_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        let h = sha256_hex("x");
        for text in [
            format!(
                "[[client]]\nid = \"a\"\nsha256 = \"{h}\"\n[[client]]\nid = \"a\"\nsha256 = \"{h}\""
            ),
            "[[client]]\nid = \"a\"\nsha256 = \"abc\"".to_string(),
            format!("[[client]]\nid = \"a/b\"\nsha256 = \"{h}\""),
            format!("[[client]]\nid = \"a\"\nsha256 = \"{h}\"\nextra = 1"),
        ] {
            std::fs::write(&path, text).unwrap();
            assert!(CredentialsFile::load(&path).is_err());
        }
    }
}
