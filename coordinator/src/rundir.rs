//! The coordinator's side of a federation's run directory (paths: [`mjp::layout::RunLayout`]):
//! the resolved configuration, one round record per committed round, the global model of every
//! version, the server optimiser's moments, and `state.json`, the commit point.
//!
//! A round is committed by writing its checkpoint, appending its record, then rewriting
//! `state.json` (each write atomic). On restart, records past `state.json` are dropped, so a
//! round is never lost once committed and never applied twice.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use mjp::layout::RunLayout;
use mjp::params::NamedTensors;
use mjp::train::EvalReport;
use mjp::{NamedTensor, VitConfig};
use serde::{Deserialize, Serialize};

use crate::aggregate::ServerState;
use crate::error::{CoordinatorError, Result};

/// What happened in one completed round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    /// Round number (1-based).
    pub round: u32,
    /// Attempts it took (1 = first try).
    pub attempt: u32,
    /// Global model version after the round.
    pub model_version: u64,
    /// fedsgd or fedavg.
    pub update_kind: String,
    /// MJP shuffle ratio of the round.
    pub shuffle_ratio: f64,
    /// The clients' defenses and the server's view in the round.
    #[serde(default)]
    pub defense: crate::schedule::RoundDefense,
    /// Differential privacy so far of the clients sampled in the round (rounds with noise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::RoundPrivacy>,
    /// Clients sampled.
    pub sampled: Vec<String>,
    /// Clients whose update was aggregated.
    pub aggregated: Vec<String>,
    /// Updates refused (validation failures and late arrivals).
    pub rejected: u32,
    /// Updates folded out of client-id order because `training.ordered_fold_mb` was full (0
    /// when the round's aggregate is independent of arrival order, or the fold is on arrival).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub folded_out_of_order: u32,
    /// Why it closed: "all-submitted", "absent-clients" (every client that took its task
    /// submitted; the others never asked for theirs within `client_timeout_secs`) or "deadline".
    pub closed_by: String,
    /// Mean client-reported metrics.
    pub client_metrics: std::collections::BTreeMap<String, f64>,
    /// Global model evaluation after the round (absent when evaluation is off).
    pub test: Option<EvalReport>,
    /// Seconds from opening to commit.
    pub wall_seconds: f64,
    /// Unix ms when the round was committed.
    pub committed_unix_ms: u64,
}

/// Contents of state.json.
#[derive(Clone, Debug, Serialize, Deserialize, Default, PartialEq)]
pub struct RunState {
    /// Rounds completed (= current model version).
    pub completed_rounds: u32,
}

/// A federation's run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    layout: RunLayout,
}

impl RunDir {
    /// Opens (creating) a run directory.
    pub fn open(root: &Path) -> Result<Self> {
        let layout = RunLayout::new(root);
        for p in [
            layout.checkpoints(),
            layout.attacks().dir().to_path_buf(),
            layout.audit().dir().to_path_buf(),
        ] {
            std::fs::create_dir_all(&p).map_err(|e| CoordinatorError::io(&p, e))?;
        }
        let stale = mjp::fsutil::remove_stale_temps(layout.root())
            + mjp::fsutil::remove_stale_temps(&layout.checkpoints());
        if stale > 0 {
            tracing::info!("removed {stale} temporary files an interrupted write left behind");
        }
        Ok(Self { layout })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Its layout.
    pub fn layout(&self) -> &RunLayout {
        &self.layout
    }

    /// Path of model version `v`.
    pub fn checkpoint_path(&self, version: u64) -> PathBuf {
        self.layout.checkpoint(version)
    }

    /// The committed state, if this directory holds a run.
    pub fn state(&self) -> Result<Option<RunState>> {
        let p = self.layout.state();
        match std::fs::read(&p) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| CoordinatorError::RunDir {
                        path: self.root().to_path_buf(),
                        reason: format!("state.json is corrupt: {e}"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CoordinatorError::io(p, e)),
        }
    }

    /// Writes the resolved config.
    pub fn write_config(&self, toml: &str) -> Result<()> {
        Ok(mjp::fsutil::write_atomic(
            &self.layout.config(),
            toml.as_bytes(),
        )?)
    }

    /// Saves model version `version`.
    pub fn save_model(&self, version: u64, params: &NamedTensors, vit: &VitConfig) -> Result<()> {
        let meta = HashMap::from([("mjpfl.model_version".to_string(), version.to_string())]);
        Ok(mjp::checkpoint::save_params(
            params,
            vit,
            None,
            &self.checkpoint_path(version),
            meta,
        )?)
    }

    /// Loads model version `version`.
    pub fn load_model(&self, version: u64) -> Result<NamedTensors> {
        Ok(mjp::checkpoint::Checkpoint::read(&self.checkpoint_path(version))?.params)
    }

    /// Commits a completed round: record appended, then state.json moved forward.
    pub fn commit_round(&self, record: &RoundRecord, server: &ServerState) -> Result<()> {
        self.save_server_state(record.model_version, server)?;
        let path = self.layout.rounds();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CoordinatorError::io(&path, e))?;
        let line = serde_json::to_string(record).expect("record serialises");
        writeln!(f, "{line}").map_err(|e| CoordinatorError::io(&path, e))?;
        f.sync_data().map_err(|e| CoordinatorError::io(&path, e))?;
        let state = RunState {
            completed_rounds: record.round,
        };
        mjp::fsutil::write_atomic(
            &self.layout.state(),
            serde_json::to_string(&state).expect("state").as_bytes(),
        )?;
        Ok(())
    }

    /// Committed round records (records past state.json, left by a crash, are dropped from the
    /// file so they cannot be counted twice).
    pub fn rounds(&self) -> Result<Vec<RoundRecord>> {
        let committed = self.state()?.map_or(0, |s| s.completed_rounds);
        let records = read_rounds(self.root())?;
        let keep: Vec<RoundRecord> = records
            .iter()
            .filter(|r| r.round <= committed)
            .cloned()
            .collect();
        if keep.len() != records.len() {
            let text: String = keep
                .iter()
                .map(|r| serde_json::to_string(r).expect("record") + "\n")
                .collect();
            mjp::fsutil::write_atomic(&self.layout.rounds(), text.as_bytes())?;
        }
        Ok(keep)
    }

    fn save_server_state(&self, version: u64, s: &ServerState) -> Result<()> {
        if s.m.is_empty() {
            return Ok(());
        }
        // Moments older than the previous version are never read again.
        if let Some(old) = version.checked_sub(2) {
            let _ = std::fs::remove_file(self.layout.server_optimiser(old));
        }
        let tensors =
            s.m.iter()
                .enumerate()
                .map(|(i, m)| NamedTensor {
                    name: format!("m.{i}"),
                    shape: vec![m.len()],
                    data: m.clone(),
                })
                .chain(s.v.iter().enumerate().map(|(i, v)| NamedTensor {
                    name: format!("v.{i}"),
                    shape: vec![v.len()],
                    data: v.clone(),
                }))
                .collect();
        let meta = HashMap::from([("step".to_string(), s.step.to_string())]);
        Ok(NamedTensors::new(tensors).save(&self.layout.server_optimiser(version), meta)?)
    }

    /// The server optimiser state committed with model version `version` (empty if the
    /// optimiser keeps none; a run of an earlier mjpfl kept only the last one, unversioned).
    pub fn load_server_state(&self, version: u64) -> Result<ServerState> {
        let versioned = self.layout.server_optimiser(version);
        let p = if versioned.exists() {
            versioned
        } else {
            self.layout.legacy_server_optimiser()
        };
        if !p.exists() {
            return Ok(ServerState::default());
        }
        let (t, meta) = NamedTensors::load(&p)?;
        let step = meta.get("step").and_then(|s| s.parse().ok()).unwrap_or(0);
        let (m, v): (Vec<_>, Vec<_>) = t
            .into_tensors()
            .into_iter()
            .partition(|t| t.name.starts_with("m."));
        Ok(ServerState {
            step,
            m: m.into_iter().map(|t| t.data).collect(),
            v: v.into_iter().map(|t| t.data).collect(),
        })
    }
}

/// Reads rounds.jsonl of a run directory as it is (for reports).
pub fn read_rounds(root: &Path) -> Result<Vec<RoundRecord>> {
    let path = RunLayout::new(root).rounds();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CoordinatorError::io(path, e)),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| CoordinatorError::RunDir {
                path: root.to_path_buf(),
                reason: format!("rounds.jsonl line {}: {e}", i + 1),
            })
        })
        .collect()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
