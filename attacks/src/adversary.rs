//! The adversary's pipeline for each intercepted update: rebuild the case, recover labels, run the
//! configured attacks, write a JSON record and a PNG grid under `attacks/round-NNNN/`, score
//! against the audit ground truth when it exists, and append per-round aggregates to
//! `attacks/rounds.jsonl` so privacy can be read round by round next to accuracy.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mjp::VitConfig;
use mjp::fl::{AuditRecord, ObservedUpdate};
use mjp::params::NamedTensors;
use serde::{Deserialize, Serialize};

use crate::april::{ClosedFormVariant, closed_form};
use crate::case::AttackCase;
use crate::error::{AttackError, Result};
use crate::labels::{mean_probabilities, recover_labels};
use crate::optimise::OptimisationConfig;
use crate::render::{Column, write_grid};
use crate::scoring::{AttackScores, GroundTruth, score_attack};

/// One attack to run on each selected update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AttackSpec {
    /// Closed-form PE attack (batch 1).
    ClosedForm {
        /// Name in outputs.
        name: String,
        /// Variant.
        variant: ClosedFormVariant,
    },
    /// Optimisation attack.
    Optimisation {
        /// Name in outputs.
        name: String,
        /// Hyper-parameters.
        config: OptimisationConfig,
    },
    /// Baseline: the dataset-mean image for every sample (what an attacker gets for free).
    MeanImage {
        /// Name in outputs.
        name: String,
    },
}

impl AttackSpec {
    /// The name in outputs.
    pub fn name(&self) -> &str {
        match self {
            Self::ClosedForm { name, .. }
            | Self::Optimisation { name, .. }
            | Self::MeanImage { name } => name,
        }
    }

    /// Parses a short name: `april`, `april-mjp`, `ig`, `ig-pe`, `ig-pe-adaptive`, `dlg`,
    /// `dlg-pe`, `mean-image`.
    pub fn by_name(name: &str, iterations: usize) -> Result<Self> {
        let opt = |mut c: OptimisationConfig| {
            c.iterations = iterations;
            Self::Optimisation {
                name: name.to_string(),
                config: c,
            }
        };
        Ok(match name {
            "april" => Self::ClosedForm {
                name: name.into(),
                variant: ClosedFormVariant::Standard,
            },
            "april-mjp" => Self::ClosedForm {
                name: name.into(),
                variant: ClosedFormVariant::MjpAware,
            },
            "ig" => opt(OptimisationConfig::inverting_gradients(false)),
            "ig-pe" => opt(OptimisationConfig::inverting_gradients(true)),
            "ig-pe-adaptive" => opt(OptimisationConfig {
                adaptive: true,
                ..OptimisationConfig::inverting_gradients(true)
            }),
            "dlg" => opt(OptimisationConfig::dlg(false)),
            "dlg-pe" => opt(OptimisationConfig::dlg(true)),
            "mean-image" => Self::MeanImage { name: name.into() },
            other => {
                return Err(AttackError::NotApplicable(format!(
                    "unknown attack `{other}` (april, april-mjp, ig, ig-pe, ig-pe-adaptive, dlg, dlg-pe, mean-image)"
                )));
            }
        })
    }
}

/// Which updates to attack and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdversaryConfig {
    /// Attacks, in output column order.
    pub attacks: Vec<AttackSpec>,
    /// Attack at most this many updates per round (0 = all).
    pub max_per_round: usize,
    /// Attack round 1 and every n-th round (1 = every round).
    pub every_rounds: u32,
    /// The run's attacks/ directory.
    pub out_dir: PathBuf,
    /// The run's audit/ directory (read only by the scorer).
    pub audit_dir: Option<PathBuf>,
    /// Per-pixel mean image of public data (for the mean-image baseline).
    pub mean_image: Option<Vec<f32>>,
    /// Also save each attacked update (safetensors) for offline study.
    pub save_updates: bool,
}

/// The outcome of one attack on one update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttackRecord {
    /// Attack name.
    pub attack: String,
    /// Labels it used (recovered by the attacker).
    pub labels: Vec<u32>,
    /// Seconds spent.
    pub seconds: f64,
    /// Final matching objective (optimisation attacks).
    pub objective: Option<f64>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Scores against the audit ground truth (absent without an audit record).
    pub scores: Option<AttackScores>,
}

/// The JSON record of one attacked update.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// Round.
    pub round: u32,
    /// Client.
    pub client_id: String,
    /// Position on the tap.
    pub sequence: u64,
    /// fedsgd or fedavg.
    pub update_kind: String,
    /// Whether the attacks worked on a pseudo-gradient (FedAvg).
    pub pseudo_gradient: bool,
    /// Local batch size.
    pub batch_size: u32,
    /// Local steps.
    pub local_steps: u32,
    /// MJP shuffle ratio of the round.
    pub shuffle_ratio: f64,
    /// PE mode of the model.
    pub pe: String,
    /// Labels recovered from the bias gradient.
    pub recovered_labels: Vec<u32>,
    /// Label recovery accuracy (when scored).
    pub label_accuracy: Option<f64>,
    /// Updates the observer lost before this one.
    pub dropped_before: u64,
    /// Each attack's outcome, in grid column order (after original and seen).
    pub attacks: Vec<AttackRecord>,
}

/// Per-round aggregate of one attack (a line of attacks/rounds.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundAttackSummary {
    /// Round.
    pub round: u32,
    /// Attack.
    pub attack: String,
    /// Updates attacked and scored.
    pub updates: usize,
    /// Mean PSNR vs originals.
    pub mean_psnr: f64,
    /// Median PSNR vs originals.
    pub median_psnr: f64,
    /// Mean SSIM vs originals.
    pub mean_ssim: f64,
    /// Mean PSNR vs what the model saw.
    pub mean_psnr_seen: f64,
    /// Mean label accuracy.
    pub label_accuracy: f64,
    /// MJP shuffle ratio of the round.
    pub shuffle_ratio: f64,
}

/// Which intercepted updates get attacked: round 1 (the model at initialisation) and every n-th
/// round; with `max_per_round` > 0, the updates of the `max_per_round` smallest client ids of the
/// round, so that the same seed attacks the same clients (and images) whatever the arrival order
/// (comparable across settings). Applied where updates come off the tap, so that updates nobody
/// will attack never queue behind a slow attack (and never count as dropped).
#[derive(Clone, Debug)]
pub struct Sampler<T> {
    every_rounds: u32,
    max_per_round: usize,
    /// Updates of the due round being collected (its choice is made when it is over).
    pending: Vec<T>,
}

impl<T: std::borrow::Borrow<ObservedUpdate>> Sampler<T> {
    /// The sampling rule of `config`.
    pub fn new(config: &AdversaryConfig) -> Self {
        Self {
            every_rounds: config.every_rounds.max(1),
            max_per_round: config.max_per_round,
            pending: Vec::new(),
        }
    }

    /// Takes the next update off the tap; returns those now chosen for attack (the previous due
    /// round's choice once a later round shows up, or this update at once when every update of
    /// a due round is attacked).
    pub fn offer(&mut self, update: T) -> Vec<T> {
        let o = update.borrow();
        let round = o.update.round;
        let mut out = match self.pending.first() {
            Some(p) if p.borrow().update.round != round => self.flush(),
            _ => Vec::new(),
        };
        if o.accepted && self.is_due(round) {
            if self.max_per_round == 0 {
                out.push(update);
            } else {
                self.pending.push(update);
            }
        }
        out
    }

    /// Whether updates of `round` are candidates at all.
    pub fn is_due(&self, round: u32) -> bool {
        round == 1 || round.is_multiple_of(self.every_rounds)
    }

    /// The choice of the round being collected (call when the tap ends).
    pub fn flush(&mut self) -> Vec<T> {
        let mut round = std::mem::take(&mut self.pending);
        round.sort_by(|a, b| a.borrow().client_id.cmp(&b.borrow().client_id));
        round.dedup_by(|a, b| a.borrow().client_id == b.borrow().client_id);
        round.truncate(self.max_per_round);
        round
    }
}

/// The adversary: stateless per update apart from per-round bookkeeping.
pub struct Adversary {
    config: AdversaryConfig,
    vit: VitConfig,
    pending: BTreeMap<u32, Vec<UpdateRecord>>,
    probs: Option<(u64, Vec<f64>)>,
}

impl Adversary {
    /// An adversary for models of `vit`.
    pub fn new(vit: VitConfig, config: AdversaryConfig) -> Self {
        Self {
            config,
            vit,
            pending: BTreeMap::new(),
            probs: None,
        }
    }

    /// Attacks one update computed from `global`, writes its record and picture, returns it.
    pub fn attack(
        &mut self,
        observed: &ObservedUpdate,
        global: &NamedTensors,
    ) -> Result<UpdateRecord> {
        let case = AttackCase::from_observed(self.vit.clone(), global.clone(), observed);
        let version = observed.update.model_version;
        if self.probs.as_ref().is_none_or(|(v, _)| *v != version) {
            self.probs = Some((version, mean_probabilities(&self.vit, global, 32)?));
        }
        let probs = &self.probs.as_ref().expect("computed above").1;
        let labels = recover_labels(&case, probs)?;
        let (c, s) = (self.vit.channels, self.vit.image_size);
        let per = c * s * s;
        let mut outputs: Vec<(AttackRecord, Option<Vec<f32>>)> = Vec::new();
        for spec in &self.config.attacks {
            let started = Instant::now();
            let result: Result<(Vec<f32>, Option<f64>)> = match spec {
                AttackSpec::ClosedForm { variant, .. } => {
                    closed_form(&case, *variant).map(|r| (r.image, None))
                }
                AttackSpec::Optimisation { config, .. } => crate::optimise::optimise_from(
                    &case,
                    &labels,
                    config,
                    self.config
                        .mean_image
                        .as_ref()
                        .filter(|m| config.init_mean_image && m.len() == per)
                        .map(|m| m.repeat(case.batch_size))
                        .as_deref(),
                    |_, _| {},
                )
                .map(|o| (o.images, Some(o.objective))),
                AttackSpec::MeanImage { .. } => match &self.config.mean_image {
                    Some(m) if m.len() == per => Ok((m.repeat(case.batch_size), None)),
                    _ => Err(AttackError::NotApplicable("no public mean image".into())),
                },
            };
            let seconds = started.elapsed().as_secs_f64();
            outputs.push(match result {
                Ok((images, objective)) => (
                    AttackRecord {
                        attack: spec.name().into(),
                        labels: labels.clone(),
                        seconds,
                        objective,
                        skipped: None,
                        scores: None,
                    },
                    Some(images),
                ),
                Err(e) => (
                    AttackRecord {
                        attack: spec.name().into(),
                        labels: labels.clone(),
                        seconds,
                        objective: None,
                        skipped: Some(e.to_string()),
                        scores: None,
                    },
                    None,
                ),
            });
        }
        let round_dir = self
            .config
            .out_dir
            .join(format!("round-{:04}", observed.update.round));
        // Scoring happens after every attack has finished: only now is the audit record read.
        let truth = self.ground_truth(observed)?;
        let mut label_accuracy = None;
        if let Some(t) = &truth {
            label_accuracy = Some(crate::labels::label_accuracy(&labels, &t.labels));
            for (rec, images) in &mut outputs {
                if let Some(images) = images {
                    rec.scores = Some(score_attack(images, &rec.labels, t));
                }
            }
        }
        let record = UpdateRecord {
            round: observed.update.round,
            client_id: observed.client_id.clone(),
            sequence: observed.sequence,
            update_kind: observed.update.kind.to_string(),
            pseudo_gradient: case.is_pseudo_gradient(),
            batch_size: observed.update.batch_size,
            local_steps: observed.update.local_steps,
            shuffle_ratio: observed.config.shuffle_ratio,
            pe: self.vit.pe.to_string(),
            recovered_labels: labels,
            label_accuracy,
            dropped_before: observed.dropped_before,
            attacks: outputs.iter().map(|(r, _)| r.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("record serialises");
        let json_path = round_dir.join(format!("{}.json", observed.client_id));
        mjp::fsutil::write_atomic(&json_path, &json)?;
        let rows = case.batch_size.min(8);
        let blank = vec![0.5f32; per * rows];
        let mut columns: Vec<Column<'_>> = Vec::new();
        if let Some(t) = &truth {
            columns.push(Column {
                images: &t.originals,
            });
            columns.push(Column { images: &t.seen });
        }
        for (_, images) in &outputs {
            columns.push(Column {
                images: images.as_deref().unwrap_or(&blank),
            });
        }
        write_grid(
            &round_dir.join(format!("{}.png", observed.client_id)),
            &columns,
            c,
            s,
            rows,
        )?;
        if self.config.save_updates {
            let meta = std::collections::HashMap::from([
                (
                    "mjpfl.round_config".to_string(),
                    serde_json::to_string(&observed.config).expect("config"),
                ),
                (
                    "mjpfl.update_kind".to_string(),
                    observed.update.kind.to_string(),
                ),
                (
                    "mjpfl.batch_size".to_string(),
                    observed.update.batch_size.to_string(),
                ),
                (
                    "mjpfl.local_steps".to_string(),
                    observed.update.local_steps.to_string(),
                ),
                (
                    "mjpfl.model_version".to_string(),
                    observed.update.model_version.to_string(),
                ),
            ]);
            observed.update.tensors.save(
                &round_dir.join(format!("{}.update.safetensors", observed.client_id)),
                meta,
            )?;
        }
        self.pending
            .entry(record.round)
            .or_default()
            .push(record.clone());
        // Rounds before this one are complete on the tap: summarise them.
        let done: Vec<u32> = self
            .pending
            .keys()
            .copied()
            .filter(|&r| r < record.round)
            .collect();
        for r in done {
            self.flush_round(r)?;
        }
        Ok(record)
    }

    /// Appends the aggregates of every round still pending (call when the federation ends).
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
        let path = self.config.out_dir.join("rounds.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| AttackError::Output {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        for l in lines {
            writeln!(
                f,
                "{}",
                serde_json::to_string(&l).expect("summary serialises")
            )
            .map_err(|e| AttackError::Output {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn ground_truth(&self, observed: &ObservedUpdate) -> Result<Option<GroundTruth>> {
        let Some(dir) = &self.config.audit_dir else {
            return Ok(None);
        };
        let path = audit_path(dir, observed.update.round, &observed.client_id);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let record: AuditRecord =
                    serde_json::from_slice(&bytes).map_err(|e| AttackError::Output {
                        path: path.clone(),
                        reason: format!("bad audit record: {e}"),
                    })?;
                Ok(Some(GroundTruth::from_audit(&record, self.vit.patch_size)))
            }
            Err(_) => Ok(None),
        }
    }
}

/// Where a simulated client writes the ground truth of an update.
pub fn audit_path(dir: &Path, round: u32, client: &str) -> PathBuf {
    dir.join(format!("round-{round:04}"))
        .join(format!("{client}.json"))
}

/// Per-attack aggregates of one round's scored records.
pub fn summarise(records: &[UpdateRecord]) -> Vec<RoundAttackSummary> {
    let mut by_attack: BTreeMap<String, Vec<&AttackScores>> = BTreeMap::new();
    for r in records {
        for a in &r.attacks {
            if let Some(s) = &a.scores {
                by_attack.entry(a.attack.clone()).or_default().push(s);
            }
        }
    }
    let Some(first) = records.first() else {
        return Vec::new();
    };
    by_attack
        .into_iter()
        .map(|(attack, scores)| {
            let mut psnrs: Vec<f64> = scores
                .iter()
                .flat_map(|s| s.vs_original.iter().map(|x| x.psnr))
                .collect();
            psnrs.sort_by(f64::total_cmp);
            let n = scores.len().max(1) as f64;
            RoundAttackSummary {
                round: first.round,
                attack,
                updates: scores.len(),
                mean_psnr: scores.iter().map(|s| s.mean_psnr).sum::<f64>() / n,
                median_psnr: psnrs.get(psnrs.len() / 2).copied().unwrap_or(f64::NAN),
                mean_ssim: scores.iter().map(|s| s.mean_ssim).sum::<f64>() / n,
                mean_psnr_seen: scores.iter().map(|s| s.mean_psnr_seen).sum::<f64>() / n,
                label_accuracy: scores.iter().map(|s| s.label_accuracy).sum::<f64>() / n,
                shuffle_ratio: first.shuffle_ratio,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mjp::fl::{ModelUpdate, RoundConfig, UpdateKind};

    fn observed(round: u32, client: &str, accepted: bool) -> ObservedUpdate {
        ObservedUpdate {
            sequence: 0,
            client_id: client.into(),
            accepted,
            dropped_before: 0,
            config: RoundConfig::fedsgd(1, 0.0, 0.0, 0),
            update: std::sync::Arc::new(ModelUpdate {
                round,
                model_version: u64::from(round - 1),
                kind: UpdateKind::FedSgd,
                batch_size: 1,
                num_examples: 1,
                local_steps: 1,
                metrics: Default::default(),
                tensors: NamedTensors::new(Vec::new()),
            }),
        }
    }

    fn chosen(arrivals: &[(u32, &str, bool)]) -> Vec<(u32, String)> {
        let config = AdversaryConfig {
            attacks: Vec::new(),
            max_per_round: 2,
            every_rounds: 3,
            out_dir: "unused".into(),
            audit_dir: None,
            mean_image: None,
            save_updates: false,
        };
        let mut sampler = Sampler::new(&config);
        let mut out = Vec::new();
        for &(r, c, a) in arrivals {
            out.extend(sampler.offer(observed(r, c, a)));
        }
        out.extend(sampler.flush());
        out.into_iter()
            .map(|o| (o.update.round, o.client_id))
            .collect()
    }

    #[test]
    fn sampler_picks_the_same_clients_whatever_the_arrival_order() {
        let a = chosen(&[
            (1, "client-007", true),
            (1, "client-002", true),
            (1, "client-001", false),
            (1, "client-004", true),
            (2, "client-000", true),
            (3, "client-009", true),
            (3, "client-003", true),
        ]);
        let b = chosen(&[
            (1, "client-004", true),
            (1, "client-001", false),
            (1, "client-002", true),
            (1, "client-007", true),
            (2, "client-000", true),
            (3, "client-003", true),
            (3, "client-009", true),
        ]);
        let expected: Vec<(u32, String)> = [
            (1, "client-002"),
            (1, "client-004"),
            (3, "client-003"),
            (3, "client-009"),
        ]
        .iter()
        .map(|(r, c)| (*r, c.to_string()))
        .collect();
        // Refused updates and rounds that are not due (2) are never attacked.
        assert_eq!(a, expected);
        assert_eq!(b, expected);
    }
}
