//! Federated-learning domain types shared by the coordinator, the clients and the adversary
//! (wire types are converted to these once, at the gRPC edge), and the client-side local update:
//! FedSGD (one step, send the gradient) or FedAvg (several steps, send the weight delta), with the
//! round's MJP setting and an optional FedProx term.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::JigsawConfig;
use crate::data::{Augment, Dataset};
use crate::jigsaw::JigsawPlan;
use crate::model::Vit;
use crate::params::NamedTensors;
use crate::seed::Seed;
use crate::train::{Batch, OptimizerKind, StepStats, compute_gradients, draw_step_plan};

/// What an update holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum UpdateKind {
    /// The gradient of one local step (the most leaky case).
    #[default]
    #[serde(rename = "fedsgd")]
    FedSgd,
    /// Local weights minus global weights after several local steps.
    #[serde(rename = "fedavg")]
    FedAvg,
}

impl std::fmt::Display for UpdateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::FedSgd => "fedsgd",
            Self::FedAvg => "fedavg",
        })
    }
}

impl std::str::FromStr for UpdateKind {
    type Err = crate::MjpError;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "fedsgd" => Ok(Self::FedSgd),
            "fedavg" => Ok(Self::FedAvg),
            _ => Err(crate::MjpError::Config(format!(
                "unknown update kind `{s}` (fedsgd, fedavg)"
            ))),
        }
    }
}

/// The local training recipe of one round, fixed by the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Gradient or delta.
    pub update_kind: UpdateKind,
    /// Local optimiser steps (FedSGD: 1).
    pub local_steps: u32,
    /// Local epochs (FedAvg; 0 = use `local_steps`).
    pub local_epochs: u32,
    /// Client learning rate.
    pub learning_rate: f64,
    /// Local batch size.
    pub batch_size: u32,
    /// MJP shuffle ratio of this round.
    pub shuffle_ratio: f64,
    /// Probability that a local step uses the jigsaw.
    pub jigsaw_probability: f64,
    /// One jigsaw per sample.
    pub per_sample_jigsaw: bool,
    /// DAL loss weight.
    pub dal_lambda: f64,
    /// FedProx proximal weight.
    pub fedprox_mu: f64,
    /// Seed of this client's round.
    pub seed: u64,
    /// Unix ms after which the round refuses updates.
    pub deadline_unix_ms: u64,
    /// Local optimiser of FedAvg steps.
    pub local_optimizer: OptimizerKind,
    /// What the client does to the update before upload (pruning, clipping, noise).
    #[serde(default)]
    pub defense: crate::Defense,
}

impl RoundConfig {
    /// One FedSGD step of `batch_size` with the jigsaw on every step (the recipe of an attack
    /// study: `mjpfl attack`, benchmarks, tests).
    pub fn fedsgd(batch_size: u32, shuffle_ratio: f64, dal_lambda: f64, seed: u64) -> Self {
        Self {
            update_kind: UpdateKind::FedSgd,
            local_steps: 1,
            local_epochs: 0,
            learning_rate: 0.1,
            batch_size,
            shuffle_ratio,
            jigsaw_probability: 1.0,
            per_sample_jigsaw: false,
            dal_lambda,
            fedprox_mu: 0.0,
            seed,
            deadline_unix_ms: 0,
            local_optimizer: OptimizerKind::Sgd { momentum: 0.0 },
            defense: crate::Defense::NONE,
        }
    }

    /// The jigsaw knobs of this round.
    pub fn jigsaw(&self) -> JigsawConfig {
        JigsawConfig {
            ratio: self.shuffle_ratio,
            probability: self.jigsaw_probability,
            per_sample: self.per_sample_jigsaw,
            min_block: None,
        }
    }
}

/// An update as a client sends it and the server receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelUpdate {
    /// Round.
    pub round: u32,
    /// Global version it was computed from.
    pub model_version: u64,
    /// Gradient or delta.
    pub kind: UpdateKind,
    /// Local batch size.
    pub batch_size: u32,
    /// Examples behind the update.
    pub num_examples: u64,
    /// Local steps.
    pub local_steps: u32,
    /// Client metrics.
    pub metrics: BTreeMap<String, f64>,
    /// The tensors, model-shaped.
    pub tensors: NamedTensors,
}

/// What an update's sender declares before its tensors arrive, as the coordinator receives it.
/// The tensor layout (names, shapes, wire element types) stays at the wire edge.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadHeader {
    /// Session token of the sender.
    pub session_token: String,
    /// Round the update claims to belong to.
    pub round: u32,
    /// Global version it claims to be computed from.
    pub model_version: u64,
    /// Gradient or delta; `None` when the sender left it unset, so that the round checks refuse
    /// it in their usual order (an unknown session is refused before a missing kind).
    pub kind: Option<UpdateKind>,
    /// Local batch size.
    pub batch_size: u32,
    /// Examples behind the update (its aggregation weight).
    pub num_examples: u64,
    /// Local steps.
    pub local_steps: u32,
    /// Client metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Tensor bytes the sender says follow.
    pub total_bytes: u64,
}

impl UploadHeader {
    /// The update this header announced, once its tensors have arrived; `kind` is the header's
    /// kind as the round admitted it.
    pub fn into_update(self, kind: UpdateKind, tensors: NamedTensors) -> ModelUpdate {
        ModelUpdate {
            round: self.round,
            model_version: self.model_version,
            kind,
            batch_size: self.batch_size,
            num_examples: self.num_examples,
            local_steps: self.local_steps,
            metrics: self.metrics,
            tensors,
        }
    }
}

/// An update seen by the honest-but-curious server, with what the server knows about it.
#[derive(Clone, Debug)]
pub struct ObservedUpdate {
    /// Position on the interception tap.
    pub sequence: u64,
    /// Sender.
    pub client_id: String,
    /// Whether the coordinator accepted it.
    pub accepted: bool,
    /// Updates this observer lost before this one.
    pub dropped_before: u64,
    /// The round's recipe (public to the server).
    pub config: RoundConfig,
    /// The update exactly as received (shared by every observer: one copy however many watch).
    pub update: std::sync::Arc<ModelUpdate>,
    /// Under the secure-aggregation view, the clients whose updates `update` sums (what secure
    /// aggregation reveals to the server: who took part, and the sum); empty for one client's
    /// update.
    pub contributors: Vec<String>,
}

/// What a simulated client used to compute an update: the ground truth for scoring, written to
/// the audit directory only when auditing is on (the attacker never reads it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Round.
    pub round: u32,
    /// Client.
    pub client_id: String,
    /// Image shape `[C, H, W]`.
    pub image_shape: [usize; 3],
    /// Pixels in [0, 1], CHW per image, of the local examples in training order: the first
    /// local batch, then (FedAvg) the client's further examples, at most [`AUDIT_MAX_IMAGES`]
    /// in all (a FedAvg attack on a small client reconstructs every one of them).
    pub images: Vec<f32>,
    /// Their labels.
    pub labels: Vec<u32>,
    /// How many of them were the first local batch, which the jigsaw fields describe (0 in
    /// records written before further examples were kept: all of them).
    #[serde(default)]
    pub first_batch: usize,
    /// Jigsaw of the first local step: per sample (or one shared) source index per position.
    pub plan_sources: Vec<Vec<usize>>,
    /// Jigsaw of the first local step: occluded positions.
    pub plan_occluded: Vec<Vec<bool>>,
    /// Local steps behind the update.
    pub local_steps: u32,
}

/// The most local examples an audit record keeps (beyond the first batch, which it always keeps).
pub const AUDIT_MAX_IMAGES: usize = 64;

/// The result of local training.
pub struct LocalResult {
    /// The update to send.
    pub update: ModelUpdate,
    /// Ground truth of the first batch (for the audit directory).
    pub audit: AuditRecord,
}

/// Runs one round of local training on `data` from `global` (an autodiff model) and builds the
/// update. FedSGD: one batch, gradient. FedAvg: `local_epochs` epochs (or `local_steps` steps)
/// with `optimizer`, weight delta.
#[allow(clippy::too_many_arguments)]
pub fn local_update(
    global: &Vit,
    data: &Dataset,
    round: u32,
    model_version: u64,
    client_id: &str,
    config: &RoundConfig,
    device: &Device,
) -> crate::Result<LocalResult> {
    if data.is_empty() {
        return Err(crate::MjpError::Config(format!(
            "client {client_id} has no local data"
        )));
    }
    let vit = global.config().clone();
    let seed = Seed(config.seed);
    let mut rng = seed.child("local", 0).rng();
    let batch_size = (config.batch_size.max(1) as usize).min(data.len());
    let jigsaw = config.jigsaw();
    let order = data.epoch_order(&mut seed.child("order", 0).rng());
    let steps = match config.update_kind {
        UpdateKind::FedSgd => 1,
        UpdateKind::FedAvg if config.local_epochs > 0 => {
            data.len().div_ceil(batch_size) * config.local_epochs as usize
        }
        UpdateKind::FedAvg => config.local_steps.max(1) as usize,
    };
    let mut model = global.clone();
    let global_values = NamedTensors::from_module(global);
    let mut optim = config.local_optimizer.build(device);
    let mut totals = StepStats::default();
    let mut audit = None;
    let mut gradient = None;
    for step in 0..steps {
        let start = (step * batch_size) % order.len();
        let idx: Vec<usize> = (0..batch_size)
            .map(|k| order[(start + k) % order.len()])
            .collect();
        let (pixels, labels) = data.batch(&idx, Augment::default(), &mut rng);
        let plan = draw_step_plan(&vit, &jigsaw, idx.len(), &mut rng);
        if audit.is_none() {
            audit = Some(audit_record(
                round,
                client_id,
                &vit,
                &pixels,
                &labels,
                plan.as_ref(),
            ));
        }
        let batch = Batch::new(pixels, labels, &vit, device);
        let out = compute_gradients(&model, &batch, plan, config.dal_lambda, false);
        accumulate(&mut totals, &out.stats);
        match config.update_kind {
            UpdateKind::FedSgd => gradient = Some(NamedTensors::gradients_of(&model, &out.grads)),
            UpdateKind::FedAvg => {
                let grads = if config.fedprox_mu > 0.0 {
                    add_proximal(&model, global, out.grads, config.fedprox_mu)
                } else {
                    out.grads
                };
                model = optim.step(config.learning_rate, model, grads);
            }
        }
    }
    let mut audit = audit.expect("at least one step");
    if config.update_kind == UpdateKind::FedAvg {
        // The client's further examples, in the order it trained on them (no randomness drawn:
        // the training above is unchanged).
        for &i in order.iter().take(AUDIT_MAX_IMAGES).skip(batch_size) {
            audit.images.extend(data.image(i));
            audit.labels.push(data.labels[i]);
        }
    }
    let tensors = match gradient {
        Some(g) => g,
        None => NamedTensors::from_module(&model).sub(&global_values)?,
    };
    let n = totals.examples.max(1) as f64;
    let metrics = BTreeMap::from([
        ("loss".to_string(), totals.loss / steps as f64),
        ("accuracy".to_string(), totals.correct as f64 / n),
        ("dal".to_string(), totals.dal / steps as f64),
        (
            "occluded_patches".to_string(),
            totals.occluded as f64 / steps as f64,
        ),
    ]);
    Ok(LocalResult {
        update: ModelUpdate {
            round,
            model_version,
            kind: config.update_kind,
            batch_size: batch_size as u32,
            num_examples: match config.update_kind {
                UpdateKind::FedSgd => batch_size as u64,
                UpdateKind::FedAvg => data.len() as u64,
            },
            local_steps: steps as u32,
            metrics,
            tensors,
        },
        audit: AuditRecord {
            local_steps: steps as u32,
            ..audit
        },
    })
}

fn accumulate(totals: &mut StepStats, s: &StepStats) {
    totals.loss += s.loss;
    totals.ce += s.ce;
    totals.dal += s.dal;
    totals.correct += s.correct;
    totals.examples += s.examples;
    totals.occluded += s.occluded;
}

fn audit_record(
    round: u32,
    client_id: &str,
    vit: &crate::VitConfig,
    pixels: &[f32],
    labels: &[u32],
    plan: Option<&JigsawPlan>,
) -> AuditRecord {
    let plans = plan.map(|p| p.plans().to_vec()).unwrap_or_default();
    AuditRecord {
        round,
        client_id: client_id.to_string(),
        image_shape: [vit.channels, vit.image_size, vit.image_size],
        images: pixels.to_vec(),
        labels: labels.to_vec(),
        first_batch: labels.len(),
        plan_sources: plans.iter().map(|p| p.sources.clone()).collect(),
        plan_occluded: plans.iter().map(|p| p.occluded.clone()).collect(),
        local_steps: 0,
    }
}

/// Adds the FedProx term's gradient `mu * (w - w_global)` to every parameter's gradient.
fn add_proximal(model: &Vit, global: &Vit, mut grads: GradientsParams, mu: f64) -> GradientsParams {
    let mut globals = GlobalsByPath::default();
    global.visit(&mut globals);
    let mut visitor = ProxVisitor {
        path: Vec::new(),
        globals: &globals.tensors,
        grads: &mut grads,
        mu,
    };
    model.visit(&mut visitor);
    grads
}

#[derive(Default)]
struct GlobalsByPath {
    path: Vec<String>,
    tensors: std::collections::HashMap<String, Tensor<1>>,
}

impl ModuleVisitor for GlobalsByPath {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().detach();
        let n = t.shape().num_elements();
        self.tensors.insert(self.path.join("."), t.reshape([n]));
    }
}

struct ProxVisitor<'a> {
    path: Vec<String>,
    globals: &'a std::collections::HashMap<String, Tensor<1>>,
    grads: &'a mut GradientsParams,
    mu: f64,
}

impl ModuleVisitor for ProxVisitor<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(g) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let Some(wg) = self.globals.get(&self.path.join(".")) else {
            self.grads.register(param.id, g);
            return;
        };
        let w = param.val().detach().inner();
        let shape = w.shape();
        let wg = wg.clone().inner().reshape(shape);
        self.grads
            .register(param.id, g + (w - wg).mul_scalar(self.mu));
    }
}
