//! What the adversary writes, and the one reader of it: a JSON record and a PNG grid per
//! attacked update, optionally the update itself (safetensors, with its metadata as one typed
//! value), and per-round summaries in `attacks/rounds.jsonl` so privacy can be read round by
//! round next to accuracy. Paths come from [`mjp::layout`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use mjp::fl::{ModelUpdate, ObservedUpdate, RoundConfig, UpdateKind};
use mjp::layout::AttacksLayout;
use mjp::params::NamedTensors;
use serde::{Deserialize, Serialize};

use crate::error::{AttackError, Result};
pub use crate::record::{AttackRecord, RoundAttackSummary, UpdateRecord};
use crate::render::{Column, write_grid};
use crate::scoring::GroundTruth;
use crate::stats::per_attack;

/// Per-attack aggregates of one round's scored records (sorted by attack name).
pub fn summarise(records: &[UpdateRecord]) -> Vec<RoundAttackSummary> {
    let Some(first) = records.first() else {
        return Vec::new();
    };
    let mut out: Vec<RoundAttackSummary> = per_attack(records)
        .into_iter()
        .filter(|s| s.scored > 0)
        .map(|s| RoundAttackSummary {
            round: first.round,
            attack: s.attack,
            updates: s.scored,
            mean_psnr: s.mean_psnr,
            median_psnr: s.median_image_psnr,
            mean_ssim: s.mean_ssim,
            mean_psnr_seen: s.mean_psnr_seen,
            label_accuracy: s.label_accuracy,
            shuffle_ratio: first.shuffle_ratio,
        })
        .collect();
    out.sort_by(|a, b| a.attack.cmp(&b.attack));
    out
}

/// The metadata saved with an intercepted update: everything needed to attack it again
/// offline, written and read by this one type (a missing field is an error, never a default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedUpdateMeta {
    /// The client that sent it.
    pub client_id: String,
    /// Its round.
    pub round: u32,
    /// The global version it was computed from.
    pub model_version: u64,
    /// fedsgd or fedavg.
    pub kind: UpdateKind,
    /// Local batch size.
    pub batch_size: u32,
    /// Examples it claims.
    pub num_examples: u64,
    /// Local steps.
    pub local_steps: u32,
    /// The round's recipe.
    pub round_config: RoundConfig,
}

/// The safetensors metadata key that holds [`SavedUpdateMeta`] as JSON.
const SAVED_UPDATE_KEY: &str = "mjpfl.saved_update";

/// Saves an intercepted update with its metadata.
pub fn save_update(path: &Path, observed: &ObservedUpdate) -> Result<()> {
    let u = &observed.update;
    let meta = SavedUpdateMeta {
        client_id: observed.client_id.clone(),
        round: u.round,
        model_version: u.model_version,
        kind: u.kind,
        batch_size: u.batch_size,
        num_examples: u.num_examples,
        local_steps: u.local_steps,
        round_config: observed.config.clone(),
    };
    let json = serde_json::to_string(&meta).map_err(|e| AttackError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(u.tensors
        .save(path, HashMap::from([(SAVED_UPDATE_KEY.to_string(), json)]))?)
}

/// Reads an update saved by [`save_update`] back as the adversary first saw it.
pub fn load_update(path: &Path) -> Result<ObservedUpdate> {
    let (tensors, meta) = NamedTensors::load(path)?;
    let bad = |reason: String| AttackError::SavedUpdate {
        path: path.to_path_buf(),
        reason,
    };
    let json = meta.get(SAVED_UPDATE_KEY).ok_or_else(|| {
        bad(format!(
            "no `{SAVED_UPDATE_KEY}` metadata (not saved by `--save-updates` of this version)"
        ))
    })?;
    let m: SavedUpdateMeta = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    Ok(ObservedUpdate {
        sequence: 0,
        client_id: m.client_id,
        accepted: true,
        dropped_before: 0,
        contributors: Vec::new(),
        config: m.round_config,
        update: std::sync::Arc::new(ModelUpdate {
            round: m.round,
            model_version: m.model_version,
            kind: m.kind,
            batch_size: m.batch_size,
            num_examples: m.num_examples,
            local_steps: m.local_steps,
            metrics: BTreeMap::new(),
            tensors,
        }),
    })
}

fn output_error(path: &Path, e: impl std::fmt::Display) -> AttackError {
    AttackError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes what the adversary produces under one attacks directory.
pub struct Recorder {
    layout: AttacksLayout,
    save_updates: bool,
    /// Records of rounds not yet summarised.
    pending: BTreeMap<u32, Vec<UpdateRecord>>,
}

impl Recorder {
    /// A recorder writing under `layout`; `save_updates` also keeps each update.
    pub fn new(layout: AttacksLayout, save_updates: bool) -> Self {
        Self {
            layout,
            save_updates,
            pending: BTreeMap::new(),
        }
    }

    /// Writes one attacked update: its record, its picture grid (original | seen | each
    /// attack's images, a blank column where an attack did not run) and, if asked, the update.
    /// Rounds before this one are complete on the tap and get summarised.
    pub fn write(
        &mut self,
        record: &UpdateRecord,
        observed: &ObservedUpdate,
        truth: Option<&GroundTruth>,
        images: &[Option<Vec<f32>>],
        shape: (usize, usize),
    ) -> Result<()> {
        let (round, client) = (record.round, record.client_id.as_str());
        let json_path = self.layout.record(round, client);
        let json = serde_json::to_vec_pretty(record).map_err(|e| output_error(&json_path, e))?;
        mjp::fsutil::write_atomic(&json_path, &json)?;
        let (c, s) = shape;
        let per = c * s * s;
        let rows = record.recovered_labels.len().clamp(1, 8);
        let blank = vec![0.5f32; per * rows];
        let mut columns: Vec<Column<'_>> = Vec::new();
        if let Some(t) = truth {
            columns.push(Column {
                images: &t.originals,
            });
            columns.push(Column { images: &t.seen });
        }
        // Row j of an attack's column shows the reconstruction matched to original j (the
        // attacks return images in label order).
        let aligned: Vec<Option<Vec<f32>>> = images
            .iter()
            .zip(&record.attacks)
            .map(|(i, a)| {
                let (i, scores) = (i.as_ref()?, a.scores.as_ref()?);
                let mut out = vec![0.5f32; per * rows];
                for (r, &j) in scores.assignment.iter().enumerate() {
                    if j < rows && (r + 1) * per <= i.len() {
                        out[j * per..(j + 1) * per].copy_from_slice(&i[r * per..(r + 1) * per]);
                    }
                }
                Some(out)
            })
            .collect();
        for (i, a) in images.iter().zip(&aligned) {
            columns.push(Column {
                images: a.as_deref().or(i.as_deref()).unwrap_or(&blank),
            });
        }
        write_grid(&self.layout.picture(round, client), &columns, c, s, rows)?;
        if self.save_updates {
            save_update(&self.layout.saved_update(round, client), observed)?;
        }
        self.pending.entry(round).or_default().push(record.clone());
        let done: Vec<u32> = self
            .pending
            .keys()
            .copied()
            .filter(|&r| r < round)
            .collect();
        for r in done {
            self.flush_round(r)?;
        }
        Ok(())
    }

    /// Summarises every round still pending (call when the federation ends).
    pub fn finish(&mut self) -> Result<()> {
        let rounds: Vec<u32> = self.pending.keys().copied().collect();
        for r in rounds {
            self.flush_round(r)?;
        }
        Ok(())
    }

    fn flush_round(&mut self, round: u32) -> Result<()> {
        let Some(records) = self.pending.remove(&round) else {
            return Ok(());
        };
        let lines = summarise(&records);
        if lines.is_empty() {
            return Ok(());
        }
        let path = self.layout.round_summaries();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| output_error(&path, e))?;
        for l in lines {
            let line = serde_json::to_string(&l).map_err(|e| output_error(&path, e))?;
            writeln!(f, "{line}").map_err(|e| output_error(&path, e))?;
        }
        Ok(())
    }
}

/// Every attacked-update record under `layout`, in round then client order (unreadable records
/// are skipped with a warning: a report shows what can be read).
pub fn read_records(layout: &AttacksLayout) -> Result<Vec<UpdateRecord>> {
    let files = layout
        .records()
        .map_err(|e| output_error(layout.dir(), e))?;
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| output_error(&f, e))?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping {}: {e}", f.display()),
        }
    }
    Ok(out)
}

/// The per-round summaries under `layout` (lines that do not parse are skipped).
pub fn read_round_summaries(layout: &AttacksLayout) -> Vec<RoundAttackSummary> {
    std::fs::read_to_string(layout.round_summaries())
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mjp::NamedTensor;

    #[test]
    fn a_saved_update_reads_back_as_it_was_seen_and_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = NamedTensors::new(vec![NamedTensor {
            name: "w".into(),
            shape: vec![2],
            data: vec![0.5, -1.0],
        }]);
        let observed = ObservedUpdate {
            sequence: 7,
            client_id: "sim-03".into(),
            accepted: true,
            dropped_before: 0,
            contributors: Vec::new(),
            config: RoundConfig::fedsgd(4, 0.25, 0.01, 9),
            update: std::sync::Arc::new(ModelUpdate {
                round: 12,
                model_version: 11,
                kind: UpdateKind::FedSgd,
                batch_size: 4,
                num_examples: 4,
                local_steps: 1,
                metrics: BTreeMap::new(),
                tensors: tensors.clone(),
            }),
        };
        let layout = AttacksLayout::new(dir.path());
        let path = layout.saved_update(12, "sim-03");
        save_update(&path, &observed).unwrap();
        let back = load_update(&path).unwrap();
        assert_eq!(back.client_id, "sim-03");
        assert_eq!(back.config, observed.config);
        assert_eq!(*back.update, *observed.update);
        // A safetensors file without our metadata is refused by name, not read with defaults.
        let foreign = dir.path().join("foreign.safetensors");
        tensors.save(&foreign, HashMap::new()).unwrap();
        let err = load_update(&foreign).unwrap_err().to_string();
        assert!(
            err.contains("foreign.safetensors") && err.contains(SAVED_UPDATE_KEY),
            "{err}"
        );
    }
}
