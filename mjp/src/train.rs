//! One local training step (forward, CE + lambda * DAL, backward, optimiser) and the evaluation
//! helpers: clean accuracy, accuracy "on the jigsaw" (ratio 0.9 + unk) and consistency (ratio
//! 0.5: prediction agreement and CLS-feature distance, shuffled vs clean).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig, momentum::MomentumConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{JigsawConfig, LambdaSchedule, PeMode, VitConfig};
use crate::data::{Augment, Dataset};
use crate::jigsaw::JigsawPlan;
use crate::model::{Vit, correct, cross_entropy, predictions};
use crate::seed::Seed;

/// Which local optimiser a trainer uses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum OptimizerKind {
    /// AdamW (betas 0.9/0.999), the centralised default.
    #[serde(rename = "adamw")]
    AdamW {
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// SGD with optional momentum, the usual FedAvg client optimiser.
    #[serde(rename = "sgd")]
    Sgd {
        /// Momentum (0 disables).
        momentum: f64,
    },
}

impl Default for OptimizerKind {
    fn default() -> Self {
        Self::AdamW { weight_decay: 0.05 }
    }
}

impl OptimizerKind {
    /// A fresh optimiser for a model on `device` (AdamW is one fused pass per parameter on the
    /// CPU backend, burn's own elsewhere; both give the same update).
    pub fn build(&self, device: &Device) -> ModuleOptimizer {
        match *self {
            Self::AdamW { weight_decay } => mjpfl_kernels::adamw(weight_decay as f32, 1e-8, device),
            Self::Sgd { momentum } => {
                let config = SgdConfig::new();
                let config = if momentum > 0.0 {
                    config.with_momentum(Some(MomentumConfig::new().with_momentum(momentum)))
                } else {
                    config
                };
                config.init()
            }
        }
    }
}

/// The MJP objective's knobs for one step.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectiveConfig {
    /// How the jigsaw is drawn.
    pub jigsaw: JigsawConfig,
    /// DAL weight schedule over training progress.
    pub dal_lambda: LambdaSchedule,
    /// Regress grid coordinates scaled to [0, 1] instead of raw (row, col).
    pub dal_normalized_targets: bool,
}

/// A batch on a device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Pixels in [0, 1], `[B, C, H, W]`.
    pub images: Tensor<4>,
    /// Labels `[B]`.
    pub labels: Tensor<1, Int>,
    /// Labels on the host.
    pub label_values: Vec<u32>,
}

impl Batch {
    /// Builds a batch from host pixels (CHW per image) and labels.
    pub fn new(pixels: Vec<f32>, labels: Vec<u32>, config: &VitConfig, device: &Device) -> Self {
        let b = labels.len();
        let s = config.image_size;
        let images =
            Tensor::<4>::from_data(TensorData::new(pixels, [b, config.channels, s, s]), device);
        let label_tensor = Tensor::<1, Int>::from_data(
            TensorData::new(
                labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>(),
                [b],
            ),
            device,
        );
        Self {
            images,
            labels: label_tensor,
            label_values: labels,
        }
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.label_values.len()
    }

    /// Samples `start..end` of this batch.
    pub fn slice(&self, start: usize, end: usize) -> Batch {
        Batch {
            images: self.images.clone().narrow(0, start, end - start),
            labels: self.labels.clone().narrow(0, start, end - start),
            label_values: self.label_values[start..end].to_vec(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.label_values.is_empty()
    }
}

/// The loss parts of one forward pass.
#[derive(Clone, Debug)]
pub struct Loss {
    /// `ce + lambda * dal`.
    pub total: Tensor<1>,
    /// Cross-entropy.
    pub ce: Tensor<1>,
    /// Unweighted DAL loss, when the model has a DAL head.
    pub dal: Option<Tensor<1>>,
    /// Logits.
    pub logits: Tensor<2>,
}

/// The training objective: cross-entropy on the (jigsawed) batch plus `lambda` times the DAL loss.
/// Shared by local training and by the attacks, which must reproduce it exactly.
pub fn objective(
    model: &Vit,
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    plan: Option<&JigsawPlan>,
    lambda: f64,
    normalized_targets: bool,
) -> Loss {
    let out = model.forward(images, plan);
    let ce = cross_entropy(out.logits.clone(), labels);
    let dal = if lambda > 0.0 {
        model.dal_loss(plan, normalized_targets)
    } else {
        None
    };
    let total = match &dal {
        Some(d) => ce.clone() + d.clone().mul_scalar(lambda),
        None => ce.clone(),
    };
    Loss {
        total,
        ce,
        dal,
        logits: out.logits,
    }
}

/// The jigsaw plan a training step uses: drawn with the step's probability, `None` otherwise.
pub fn draw_step_plan(
    config: &VitConfig,
    jigsaw: &JigsawConfig,
    batch: usize,
    rng: &mut impl Rng,
) -> Option<JigsawPlan> {
    let applies = match config.pe {
        PeMode::Mjp | PeMode::NaiveShuffle => rng.random_bool(jigsaw.probability.clamp(0.0, 1.0)),
        PeMode::Learned | PeMode::None => false,
    };
    if !applies || (config.pe == PeMode::Mjp && jigsaw.ratio <= 0.0) {
        return None;
    }
    Some(JigsawPlan::draw(config, jigsaw, jigsaw.ratio, batch, rng))
}

/// Statistics of one training step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepStats {
    /// Total loss.
    pub loss: f64,
    /// Cross-entropy part.
    pub ce: f64,
    /// DAL part (unweighted).
    pub dal: f64,
    /// Correct predictions in the batch.
    pub correct: usize,
    /// Batch size.
    pub examples: usize,
    /// Whether the step used the jigsaw.
    pub jigsaw: bool,
    /// Patches occluded by the plan (first sample).
    pub occluded: usize,
}

/// The outcome of a forward/backward pass: statistics and gradients (no parameter change).
pub struct Gradients {
    /// Statistics.
    pub stats: StepStats,
    /// Parameter gradients.
    pub grads: GradientsParams,
    /// The plan used (what the model saw).
    pub plan: Option<JigsawPlan>,
}

/// Forward and backward on one batch with an autodiff model.
///
/// burn's CPU backend runs one pass on about one core, so the batch is split into shards that run
/// in parallel where threads are free (see [`gradient_threads`]); their gradients are combined with weights
/// proportional to shard size, which gives exactly the full-batch gradient of the mean loss.
pub fn compute_gradients(
    model: &Vit,
    batch: &Batch,
    plan: Option<JigsawPlan>,
    lambda: f64,
    normalized_targets: bool,
) -> Gradients {
    compute_gradients_with_threads(
        model,
        batch,
        plan,
        lambda,
        normalized_targets,
        gradient_threads(),
    )
}

/// [`compute_gradients`] with an explicit number of threads.
pub fn compute_gradients_with_threads(
    model: &Vit,
    batch: &Batch,
    plan: Option<JigsawPlan>,
    lambda: f64,
    normalized_targets: bool,
    threads: usize,
) -> Gradients {
    let shards = threads.min(batch.len() / MIN_SHARD).max(1);
    if shards == 1 {
        return compute_gradients_single(model, batch, plan, lambda, normalized_targets);
    }
    // The DAL term is normalised over the whole plan's visible positions: with one plan per
    // sample a shard's own normalisation differs from the batch's, so the shards compute the
    // cross-entropy only and the DAL term is computed once on the full plan. (With a shared
    // plan every shard's DAL term equals the batch's and the shards keep it, bit for bit as
    // before.)
    let dal_apart = lambda > 0.0 && plan.as_ref().is_some_and(|p| !p.is_shared());
    let shard_lambda = if dal_apart { 0.0 } else { lambda };
    let n = batch.len();
    let bounds: Vec<(usize, usize)> = (0..shards)
        .map(|k| (k * n / shards, (k + 1) * n / shards))
        .collect();
    // The shards run on the calling thread's rayon pool: a training worker's own pool when the
    // client trains on one (`mjpfl_client::workers`; shards one after another on a 1-thread
    // worker), else the global pool. The shards (and so the gradient, bit for bit) are the same
    // either way; only where they run changes.
    let jobs: Vec<_> = bounds
        .iter()
        .map(|&(start, end)| {
            // A fork has its own autodiff graph; shards sharing parameter nodes would be merged
            // into one mutex-protected graph and run one after another.
            let model = model.clone().fork(&model.device());
            let sub = batch.slice(start, end);
            let sub_plan = plan.as_ref().map(|p| p.slice(start, end));
            (model, sub, sub_plan)
        })
        .collect();
    let parts: Vec<Gradients> = {
        use rayon::prelude::*;
        jobs.into_par_iter()
            .map(|(model, sub, sub_plan)| {
                compute_gradients_single(&model, &sub, sub_plan, shard_lambda, normalized_targets)
            })
            .collect()
    };
    let weights: Vec<f64> = bounds
        .iter()
        .map(|&(a, b)| (b - a) as f64 / n as f64)
        .collect();
    let mut stats = StepStats {
        examples: n,
        jigsaw: plan.is_some(),
        occluded: plan.as_ref().map_or(0, |p| p.sample(0).occluded_count()),
        ..StepStats::default()
    };
    for (p, w) in parts.iter().zip(&weights) {
        stats.loss += w * p.stats.loss;
        stats.ce += w * p.stats.ce;
        stats.dal += w * p.stats.dal;
        stats.correct += p.stats.correct;
    }
    let mut weighted: Vec<(GradientsParams, f64)> =
        parts.into_iter().map(|p| p.grads).zip(weights).collect();
    if dal_apart {
        let fork = model.clone().fork(&model.device());
        if let Some(dal) = fork.dal_loss(plan.as_ref(), normalized_targets) {
            let value = scalar(&dal);
            stats.dal = value;
            stats.loss += lambda * value;
            weighted.push((GradientsParams::from_grads(dal.backward(), &fork), lambda));
        }
    }
    let grads = combine_gradients(model, weighted);
    Gradients { stats, grads, plan }
}

/// Smallest shard worth a thread of its own.
const MIN_SHARD: usize = 8;

/// Shards of one gradient computation (batches of at least 16 are split in this many, computed in
/// parallel where threads are free): `MJPFL_GRAD_THREADS`, else the available cores (at most 4).
/// The gradient depends on it (f32 sums of shards), not on the threads that compute the shards.
pub fn gradient_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("MJPFL_GRAD_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)))
            .max(1)
    })
}

fn compute_gradients_single(
    model: &Vit,
    batch: &Batch,
    plan: Option<JigsawPlan>,
    lambda: f64,
    normalized_targets: bool,
) -> Gradients {
    let loss = objective(
        model,
        batch.images.clone(),
        batch.labels.clone(),
        plan.as_ref(),
        lambda,
        normalized_targets,
    );
    let stats = StepStats {
        loss: scalar(&loss.total),
        ce: scalar(&loss.ce),
        dal: loss.dal.as_ref().map_or(0.0, scalar),
        correct: correct(&loss.logits, &batch.label_values),
        examples: batch.len(),
        jigsaw: plan.is_some(),
        occluded: plan.as_ref().map_or(0, |p| p.sample(0).occluded_count()),
    };
    let grads = GradientsParams::from_grads(loss.total.backward(), model);
    Gradients { stats, grads, plan }
}

/// `sum_k w_k * grads_k`, parameter by parameter.
fn combine_gradients(model: &Vit, parts: Vec<(GradientsParams, f64)>) -> GradientsParams {
    struct Combine {
        parts: Vec<(GradientsParams, f64)>,
        out: GradientsParams,
    }
    impl ModuleVisitor for Combine {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let mut acc: Option<Tensor<D>> = None;
            for (g, w) in &mut self.parts {
                if let Some(t) = g.remove::<D>(param.id) {
                    let t = t.mul_scalar(*w);
                    acc = Some(match acc {
                        Some(a) => a + t,
                        None => t,
                    });
                }
            }
            if let Some(a) = acc {
                self.out.register(param.id, a);
            }
        }
    }
    let mut c = Combine {
        parts,
        out: GradientsParams::new(),
    };
    model.visit(&mut c);
    c.out
}

/// The value of a one-element tensor.
pub fn scalar(t: &Tensor<1>) -> f64 {
    crate::params::tensor_values(t)
        .first()
        .copied()
        .map_or(f64::NAN, f64::from)
}

/// A model with its optimiser: the local training loop of centralised runs and FL clients.
pub struct Trainer {
    /// The model on an autodiff device.
    pub model: Vit,
    /// Its optimiser.
    pub optimizer: ModuleOptimizer,
    /// Objective knobs.
    pub objective: ObjectiveConfig,
}

impl Trainer {
    /// Wraps a model (moved to autodiff) with a fresh optimiser.
    pub fn new(model: Vit, optimizer: &OptimizerKind, objective: ObjectiveConfig) -> Self {
        Self {
            optimizer: optimizer.build(&model.device()),
            model,
            objective,
        }
    }

    /// One optimiser step on `batch`; `progress` in [0, 1] drives the DAL lambda schedule.
    pub fn step(&mut self, batch: &Batch, lr: f64, progress: f64, rng: &mut impl Rng) -> StepStats {
        let plan = draw_step_plan(
            self.model.config(),
            &self.objective.jigsaw,
            batch.len(),
            rng,
        );
        let lambda = self.objective.dal_lambda.at(progress);
        let Gradients { stats, grads, .. } = compute_gradients(
            &self.model,
            batch,
            plan,
            lambda,
            self.objective.dal_normalized_targets,
        );
        let model = self.model.clone();
        self.model = self.optimizer.step(lr, model, grads);
        stats
    }
}

/// Cosine learning-rate schedule with linear warm-up.
pub fn cosine_lr(base: f64, min: f64, warmup_steps: usize, total_steps: usize, step: usize) -> f64 {
    if step < warmup_steps {
        return base * (step + 1) as f64 / warmup_steps as f64;
    }
    let t = (step - warmup_steps) as f64 / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
    min + 0.5 * (base - min) * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// How to evaluate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalOptions {
    /// Batch size.
    pub batch_size: usize,
    /// Also measure accuracy on the jigsaw (ratio 0.9) and consistency (ratio 0.5).
    pub jigsaw_metrics: bool,
    /// Seed of the evaluation jigsaws (fixed, so rounds are comparable).
    pub seed: Seed,
    /// Evaluate at most this many test images (None = all).
    pub limit: Option<usize>,
    /// Measure the jigsaw metrics on (about) the first N of them only (None = all).
    pub jigsaw_limit: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            jigsaw_metrics: true,
            seed: Seed(0),
            limit: None,
            jigsaw_limit: None,
        }
    }
}

/// Evaluation results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Clean top-1 accuracy.
    pub accuracy: f64,
    /// Clean mean cross-entropy.
    pub loss: f64,
    /// Accuracy with 90% of patches shuffled (+ unk for MJP).
    pub jigsaw_accuracy: Option<f64>,
    /// Fraction of predictions unchanged under a 50% jigsaw.
    pub consistency_agreement: Option<f64>,
    /// Mean L2 distance between clean and 50%-jigsaw CLS features.
    pub consistency_feature_l2: Option<f64>,
    /// Images evaluated.
    pub examples: usize,
    /// Images the jigsaw metrics were measured on.
    #[serde(default)]
    pub jigsaw_examples: usize,
}

impl EvalReport {
    /// Whether every figure is finite (JSON has no NaN or infinity: they would be written as
    /// `null` and not read back).
    pub fn is_finite(&self) -> bool {
        [self.accuracy, self.loss]
            .into_iter()
            .chain(self.jigsaw_accuracy)
            .chain(self.consistency_agreement)
            .chain(self.consistency_feature_l2)
            .all(f64::is_finite)
    }
}

/// Accuracy on the jigsaw uses this shuffle ratio (the paper's setting).
pub const JIGSAW_EVAL_RATIO: f64 = 0.9;
/// Consistency uses this shuffle ratio.
pub const CONSISTENCY_RATIO: f64 = 0.5;

/// Partial sums of one evaluation batch.
#[derive(Default)]
struct EvalSums {
    correct: usize,
    loss: f64,
    examples: usize,
    jig_correct: usize,
    agree: usize,
    feature_l2: f64,
    jig_examples: usize,
}

/// Evaluates an inference-mode model (no autodiff) on `data`. Batches run as tasks on the rayon pool;
/// each batch's jigsaws come from its own sub-seed, so results do not depend on the threading.
pub fn evaluate(model: &Vit, data: &Dataset, options: &EvalOptions) -> EvalReport {
    let n = options.limit.map_or(data.len(), |l| l.min(data.len()));
    let bs = options.batch_size.max(1);
    let batches: Vec<(usize, usize)> = (0..n.div_ceil(bs))
        .map(|b| (b * bs, ((b + 1) * bs).min(n)))
        .collect();
    let threads = gradient_threads().min(batches.len()).max(1);
    // `threads` fixed partitions of the batches (summed in order below), run as tasks on the
    // rayon pool the kernels use rather than on threads of their own beside it.
    let parts: Vec<EvalSums> = crate::kernels::on_pool(|| {
        use rayon::prelude::*;
        (0..threads)
            .into_par_iter()
            .map(|t| {
                let mut sums = EvalSums::default();
                for (b, &(start, end)) in batches.iter().enumerate().skip(t).step_by(threads) {
                    eval_batch(model, data, options, b, start, end, &mut sums);
                }
                sums
            })
            .collect()
    });
    let mut total = EvalSums::default();
    for p in parts {
        total.correct += p.correct;
        total.loss += p.loss;
        total.examples += p.examples;
        total.jig_correct += p.jig_correct;
        total.agree += p.agree;
        total.feature_l2 += p.feature_l2;
        total.jig_examples += p.jig_examples;
    }
    let nf = total.examples.max(1) as f64;
    let nj = total.jig_examples.max(1) as f64;
    let jig = options.jigsaw_metrics && total.jig_examples > 0;
    EvalReport {
        accuracy: total.correct as f64 / nf,
        loss: total.loss / nf,
        jigsaw_accuracy: jig.then(|| total.jig_correct as f64 / nj),
        consistency_agreement: jig.then(|| total.agree as f64 / nj),
        consistency_feature_l2: jig.then(|| total.feature_l2 / nj),
        examples: total.examples,
        jigsaw_examples: total.jig_examples,
    }
}

fn eval_batch(
    model: &Vit,
    data: &Dataset,
    options: &EvalOptions,
    b: usize,
    start: usize,
    end: usize,
    sums: &mut EvalSums,
) {
    let config = model.config();
    let device = model.device();
    let mut rng = options.seed.child("eval-jigsaw", b as u64).rng();
    let indices: Vec<usize> = (start..end).collect();
    let (pixels, labels) = data.batch(&indices, Augment::default(), &mut rng);
    let batch = Batch::new(pixels, labels, config, &device);
    let clean = model.forward(batch.images.clone(), None);
    sums.correct += correct(&clean.logits, &batch.label_values);
    sums.loss +=
        scalar(&cross_entropy(clean.logits.clone(), batch.labels.clone())) * indices.len() as f64;
    sums.examples += indices.len();
    if !options.jigsaw_metrics || start >= options.jigsaw_limit.unwrap_or(usize::MAX) {
        return;
    }
    let eval_jigsaw = JigsawConfig {
        per_sample: false,
        ..JigsawConfig::default()
    };
    let plan = JigsawPlan::draw(
        config,
        &eval_jigsaw,
        JIGSAW_EVAL_RATIO,
        indices.len(),
        &mut rng,
    );
    let out = model.forward(batch.images.clone(), Some(&plan));
    sums.jig_correct += correct(&out.logits, &batch.label_values);
    let plan = JigsawPlan::draw(
        config,
        &eval_jigsaw,
        CONSISTENCY_RATIO,
        indices.len(),
        &mut rng,
    );
    let out = model.forward(batch.images.clone(), Some(&plan));
    let (p_clean, p_jig) = (predictions(&clean.logits), predictions(&out.logits));
    sums.agree += p_clean.iter().zip(&p_jig).filter(|(a, b)| a == b).count();
    let dist = (clean.features - out.features)
        .powi_scalar(2)
        .sum_dim(1)
        .sqrt()
        .sum();
    sums.feature_l2 += scalar(&dist);
    sums.jig_examples += indices.len();
}
