//! The adversary's pipeline for each intercepted update, in stages kept apart as breaching keeps
//! them: rebuild the case (what the server knows), recover labels, run every configured attack
//! through the [`Attack`] trait, then (only after every attack has finished) read the audit
//! ground truth and score, and hand everything to the [`Recorder`]. [`Sampler`] decides which
//! updates are attacked at all.

use mjp::fl::{AuditRecord, ObservedUpdate};
use mjp::layout::{AuditLayout, RunLayout};
use mjp::params::NamedTensors;
use mjp::{DeviceSpec, VitConfig};
use std::time::Instant;

use crate::attack::{Attack, Knowledge};
use crate::case::AttackCase;
use crate::error::{AttackError, Result};
use crate::labels::{mean_probabilities, recover_labels};
use crate::record::{AttackRecord, UpdateRecord};
use crate::recorder::Recorder;
use crate::scoring::{GroundTruth, score_attack};
use crate::settings::AdversarySettings;

/// Everything an adversary needs besides the updates.
#[derive(Clone, Debug)]
pub struct AdversaryConfig {
    /// What to run on which updates.
    pub settings: AdversarySettings,
    /// The run directory: results go to its `attacks/`, the scorer reads its `audit/`.
    pub run: RunLayout,
    /// Per-pixel mean image of public data (the mean-image baseline and optimisation starts).
    pub mean_image: Option<Vec<f32>>,
    /// Where the attacks compute.
    pub device: DeviceSpec,
}

/// Which intercepted updates get attacked: round 1 (the model at initialisation) and every n-th
/// round; with `max_per_round` > 0, the updates of the `max_per_round` smallest client ids of the
/// round, so that the same seed attacks the same clients (and images) whatever the arrival order
/// (comparable across settings). Applied where updates come off the tap, so that updates nobody
/// will attack never queue behind a slow attack (and never count as dropped).
#[derive(Clone, Debug)]
pub struct Sampler<T> {
    settings: AdversarySettings,
    /// Updates of the due round being collected (its choice is made when it is over).
    pending: Vec<T>,
}

impl<T: std::borrow::Borrow<ObservedUpdate>> Sampler<T> {
    /// The sampling rule of `settings`.
    pub fn new(settings: &AdversarySettings) -> Self {
        Self {
            settings: settings.clone(),
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
            if self.settings.max_per_round == 0 {
                out.push(update);
            } else {
                self.pending.push(update);
            }
        }
        out
    }

    /// Whether updates of `round` are candidates at all.
    pub fn is_due(&self, round: u32) -> bool {
        self.settings.is_due(round)
    }

    /// The choice of the round being collected (call when the tap ends).
    pub fn flush(&mut self) -> Vec<T> {
        let mut round = std::mem::take(&mut self.pending);
        round.sort_by(|a, b| a.borrow().client_id.cmp(&b.borrow().client_id));
        round.dedup_by(|a, b| a.borrow().client_id == b.borrow().client_id);
        round.truncate(self.settings.max_per_round);
        round
    }
}

/// The adversary: stateless per update apart from the recorder's per-round bookkeeping.
pub struct Adversary {
    vit: VitConfig,
    attacks: Vec<Box<dyn Attack>>,
    mean_image: Option<Vec<f32>>,
    device: DeviceSpec,
    audit: AuditLayout,
    recorder: Recorder,
    /// The mean softmax output of the last global version (label recovery's prior).
    probs: Option<(u64, Vec<f64>)>,
}

impl Adversary {
    /// An adversary for models of `vit`; fails on an unknown attack name.
    pub fn new(vit: VitConfig, config: AdversaryConfig) -> Result<Self> {
        let attacks = config
            .settings
            .attacks
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(|a| crate::registry::build(a, &config.settings))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vit,
            attacks,
            mean_image: config.mean_image,
            device: config.device,
            audit: config.run.audit(),
            recorder: Recorder::new(config.run.attacks(), config.settings.save_updates),
            probs: None,
        })
    }

    /// Attacks one update computed from `global`, records and returns the outcome (on a worker
    /// of the current rayon pool: see [`mjp::kernels::on_pool`]).
    pub fn attack(
        &mut self,
        observed: &ObservedUpdate,
        global: &NamedTensors,
    ) -> Result<UpdateRecord> {
        mjp::kernels::on_pool(|| self.attack_on_pool(observed, global))
    }

    fn attack_on_pool(
        &mut self,
        observed: &ObservedUpdate,
        global: &NamedTensors,
    ) -> Result<UpdateRecord> {
        let case =
            AttackCase::from_observed(self.vit.clone(), global.clone(), observed, self.device);
        let version = observed.update.model_version;
        if self.probs.as_ref().is_none_or(|(v, _)| *v != version) {
            let probs = mean_probabilities(&self.vit, global, 32, self.device)?;
            self.probs = Some((version, probs));
        }
        let probs = self.probs.as_ref().map_or(&[][..], |(_, p)| p.as_slice());
        let counted = recover_labels(&case, probs)?;
        // FedAvg clients of plain SGD: refit the counted labels by simulating the local steps.
        let labels = match crate::fedavg::fit_labels(&case, &counted, self.mean_image.as_deref()) {
            Err(crate::error::AttackError::NotApplicable(_)) => counted,
            other => other?,
        };
        let knowledge = Knowledge {
            labels: &labels,
            mean_image: self.mean_image.as_deref(),
        };
        let mut records = Vec::with_capacity(self.attacks.len());
        let mut images = Vec::with_capacity(self.attacks.len());
        for attack in &self.attacks {
            let started = Instant::now();
            let result = attack.reconstruct(&case, &knowledge);
            let seconds = started.elapsed().as_secs_f64();
            let (objective, skipped, recon) = match result {
                Ok(r) => (r.objective, None, Some(r.images)),
                Err(e) => (None, Some(e.to_string()), None),
            };
            records.push(AttackRecord {
                attack: attack.name().into(),
                labels: labels.clone(),
                seconds,
                objective,
                skipped,
                scores: None,
            });
            images.push(recon);
        }
        // Scoring happens after every attack has finished: only now is the audit record read.
        let truth = self.ground_truth(observed)?;
        let mut label_accuracy = None;
        if let Some(t) = &truth {
            label_accuracy = Some(crate::labels::label_accuracy(&labels, &t.labels));
            for (rec, recon) in records.iter_mut().zip(&images) {
                if let Some(recon) = recon {
                    rec.scores = Some(score_attack(recon, &rec.labels, t));
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
            num_examples: observed.update.num_examples,
            local_optimizer: match (observed.update.kind, observed.config.local_optimizer) {
                (mjp::fl::UpdateKind::FedSgd, _) => String::new(),
                (_, mjp::train::OptimizerKind::Sgd { momentum: 0.0 }) => "sgd".into(),
                (_, mjp::train::OptimizerKind::Sgd { .. }) => "sgd-momentum".into(),
                (_, mjp::train::OptimizerKind::AdamW { .. }) => "adamw".into(),
            },
            shuffle_ratio: observed.config.shuffle_ratio,
            defense: observed.config.defense,
            clients: case.clients,
            pe: self.vit.pe.to_string(),
            recovered_labels: labels,
            label_accuracy,
            dropped_before: observed.dropped_before,
            attacks: records,
        };
        self.recorder.write(
            &record,
            observed,
            truth.as_ref(),
            &images,
            (self.vit.channels, self.vit.image_size),
        )?;
        Ok(record)
    }

    /// Summarises every round still pending (call when the federation ends).
    pub fn finish(&mut self) -> Result<()> {
        self.recorder.finish()
    }

    fn ground_truth(&self, observed: &ObservedUpdate) -> Result<Option<GroundTruth>> {
        let round = observed.update.round;
        if observed.contributors.is_empty() {
            return self.audit_truth(round, &observed.client_id);
        }
        // The secure-aggregation view's sum: every contributor's images (all must be on disk).
        let mut parts = Vec::with_capacity(observed.contributors.len());
        for id in &observed.contributors {
            match self.audit_truth(round, id)? {
                Some(t) => parts.push(t),
                None => return Ok(None),
            }
        }
        Ok(GroundTruth::concat(parts))
    }

    fn audit_truth(&self, round: u32, client_id: &str) -> Result<Option<GroundTruth>> {
        let path = self.audit.record(round, client_id);
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
            contributors: Vec::new(),
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
        let settings = AdversarySettings {
            attacks: Vec::new(),
            max_per_round: 2,
            every_rounds: 3,
            ..AdversarySettings::default()
        };
        let mut sampler = Sampler::new(&settings);
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
