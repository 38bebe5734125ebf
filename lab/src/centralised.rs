//! Centralised training (`mjpfl train`): per-epoch clean accuracy, jigsaw accuracy and
//! consistency, safetensors checkpoints, resume and seeds. The run directory's layout is
//! [`mjp::layout::TrainLayout`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mjp::checkpoint::{self, Checkpoint};
use mjp::data::{Augment, DataSource, Split};
use mjp::layout::TrainLayout;
use mjp::train::{
    Batch, EvalOptions, ObjectiveConfig, OptimizerKind, Trainer, cosine_lr, evaluate,
};
use mjp::{DeviceSpec, JigsawConfig, LambdaSchedule, Seed, Vit, VitConfig};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Context, LabError, Result};
use crate::runtime::progress_bar;

/// A centralised training job.
#[derive(Clone, Debug)]
pub struct TrainJob {
    /// The architecture.
    pub vit: VitConfig,
    /// The preset it came from (for messages).
    pub preset: String,
    /// Dataset.
    pub data: DataSource,
    /// Directory that scripts/fetch-data.sh filled.
    pub data_dir: PathBuf,
    /// Compute device.
    pub device: DeviceSpec,
    /// MJP shuffle ratio.
    pub ratio: f64,
    /// Probability that a step uses the jigsaw.
    pub jigsaw_prob: f64,
    /// One jigsaw per sample instead of one per batch.
    pub per_sample: bool,
    /// DAL loss weight (constant).
    pub dal_lambda: f64,
    /// The reference DAL schedule instead of a constant.
    pub dal_schedule: bool,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Warm-up length as a fraction of all steps.
    pub warmup: f64,
    /// Random-crop padding (0 disables).
    pub crop_padding: usize,
    /// Random horizontal flips.
    pub hflip: bool,
    /// Use only the first N training images.
    pub train_limit: Option<usize>,
    /// Evaluate on only the first N test images.
    pub test_limit: Option<usize>,
    /// Jigsaw accuracy and consistency on the first N test images (0 = all).
    pub jigsaw_limit: usize,
    /// Run seed.
    pub seed: u64,
    /// Run directory.
    pub out: PathBuf,
    /// Continue from the last completed epoch.
    pub resume: bool,
    /// Initialise from timm ViT safetensors where names and shapes match.
    pub init_timm: Option<PathBuf>,
    /// Stop after the epoch during which this many minutes have passed.
    pub time_limit_min: Option<f64>,
}

/// What a training job ended with.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// Epochs trained in all.
    pub epochs_done: usize,
    /// The final evaluation (`None` when there was nothing to do).
    pub test: Option<mjp::train::EvalReport>,
}

/// The resolved run configuration (written to config.json; resume checks it).
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct RunConfig {
    vit: mjp::VitConfig,
    objective: ObjectiveConfig,
    optimizer: OptimizerKind,
    data: String,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    warmup: f64,
    augment: Augment,
    train_limit: Option<usize>,
    seed: u64,
}

/// What resume needs.
#[derive(Serialize, Deserialize, Default)]
struct State {
    epochs_done: usize,
    steps_done: usize,
    train_seconds: f64,
}

/// One epoch's record in epochs.jsonl.
#[derive(Serialize)]
struct EpochRecord {
    epoch: usize,
    train_loss: f64,
    train_accuracy: f64,
    test: mjp::train::EvalReport,
    lr: f64,
    train_seconds: f64,
    wall_seconds: f64,
}

/// Trains `job` (resuming when asked) and returns the final evaluation.
pub fn run_training(job: &TrainJob) -> Result<TrainOutcome> {
    mjp::kernels::on_pool(|| train_on_pool(job))
}

fn train_on_pool(job: &TrainJob) -> Result<TrainOutcome> {
    let vit = job.vit.clone();
    let jigsaw = JigsawConfig {
        ratio: job.ratio,
        probability: job.jigsaw_prob,
        per_sample: job.per_sample,
        min_block: None,
    };
    jigsaw.validate()?;
    if job.batch_size == 0 || job.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    let objective = ObjectiveConfig {
        jigsaw,
        dal_lambda: if job.dal_schedule {
            LambdaSchedule::reference()
        } else {
            LambdaSchedule::Constant {
                value: job.dal_lambda,
            }
        },
        dal_normalized_targets: false,
    };
    let config = RunConfig {
        vit: vit.clone(),
        objective: objective.clone(),
        optimizer: OptimizerKind::AdamW {
            weight_decay: job.weight_decay,
        },
        data: job.data.to_string(),
        epochs: job.epochs,
        batch_size: job.batch_size,
        lr: job.lr,
        warmup: job.warmup,
        augment: Augment {
            crop_padding: job.crop_padding,
            hflip: job.hflip,
        },
        train_limit: job.train_limit,
        seed: job.seed,
    };
    let out = job.out.clone();
    let layout = TrainLayout::new(&out);
    let device = job.device.device()?;
    let ad = device.clone().autodiff();

    let train_data = load(job, Split::Train, &vit, job.train_limit)?;
    let test_data = load(job, Split::Test, &vit, job.test_limit)?;
    println!(
        "train: {} on {} ({} train / {} test images), pe={} ratio={} jigsaw p={} device={}",
        job.preset,
        train_data.name,
        train_data.len(),
        test_data.len(),
        vit.pe,
        job.ratio,
        job.jigsaw_prob,
        job.device
    );

    let ckpt_dir = layout.checkpoints();
    let (mut trainer, mut state) = if job.resume {
        resume(&layout, &config, &objective, &ad)?
    } else {
        if layout.state().exists() {
            bail!(
                "{} already holds a training run; pass --resume to continue it or --out for a new one",
                out.display()
            );
        }
        std::fs::create_dir_all(&ckpt_dir)
            .with_context(|| format!("creating {}", ckpt_dir.display()))?;
        mjp::fsutil::write_atomic(
            &layout.config(),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let mut model = Vit::new(&vit, Seed(job.seed), &ad);
        if let Some(path) = &job.init_timm {
            let (m, report) = checkpoint::load_timm(model, path)?;
            println!(
                "timm init: loaded {} tensors, kept {} as initialised",
                report.loaded.len(),
                report.skipped.len()
            );
            for (name, why) in &report.skipped {
                println!("  kept {name}: {why}");
            }
            model = m;
        }
        (
            Trainer::new(model, &config.optimizer, objective.clone()),
            State::default(),
        )
    };
    if state.epochs_done >= job.epochs {
        println!(
            "already trained {} epochs; nothing to do",
            state.epochs_done
        );
        return Ok(TrainOutcome {
            epochs_done: state.epochs_done,
            test: None,
        });
    }

    let steps_per_epoch = train_data.len().div_ceil(job.batch_size);
    let total_steps = steps_per_epoch * job.epochs;
    let warmup_steps = ((total_steps as f64) * job.warmup).round() as usize;
    let eval_options = EvalOptions {
        seed: Seed(job.seed).child("eval", 0),
        jigsaw_limit: (job.jigsaw_limit > 0).then_some(job.jigsaw_limit),
        ..EvalOptions::default()
    };
    let mut last_test = None;
    let started = Instant::now();
    let seed = Seed(job.seed);

    for epoch in state.epochs_done + 1..=job.epochs {
        let t_epoch = Instant::now();
        let mut order_rng = seed.child("epoch-order", epoch as u64).rng();
        let mut step_rng = seed.child("epoch-steps", epoch as u64).rng();
        let order = train_data.epoch_order(&mut order_rng);
        let bar = progress_bar(
            steps_per_epoch as u64,
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
        );
        bar.set_prefix(format!("epoch {epoch}/{}", job.epochs));
        let (mut loss_sum, mut correct, mut seen, mut lr) = (0.0, 0usize, 0usize, job.lr);
        for chunk in order.chunks(job.batch_size) {
            let (pixels, labels) = train_data.batch(chunk, config.augment, &mut step_rng);
            let batch = Batch::new(pixels, labels, &vit, &ad);
            lr = cosine_lr(
                job.lr,
                job.lr * 0.01,
                warmup_steps,
                total_steps,
                state.steps_done,
            );
            let progress = state.steps_done as f64 / total_steps as f64;
            let stats = trainer.step(&batch, lr, progress, &mut step_rng);
            if !stats.loss.is_finite() {
                bail!(
                    "training diverged at epoch {epoch}, step {} (loss {}); lower --lr",
                    state.steps_done,
                    stats.loss
                );
            }
            loss_sum += stats.loss * stats.examples as f64;
            correct += stats.correct;
            seen += stats.examples;
            state.steps_done += 1;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.3} acc {:.3}",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ));
        }
        bar.finish_and_clear();
        state.train_seconds += t_epoch.elapsed().as_secs_f64();
        let test = evaluate(&trainer.model.inference(), &test_data, &eval_options);
        state.epochs_done = epoch;
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test: test.clone(),
            lr,
            train_seconds: state.train_seconds,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        println!(
            "epoch {epoch}/{}: train loss {:.4} acc {:.4} | test acc {:.4} loss {:.4} | jigsaw acc {} | consistency {} | {:.0}s training, {:.0}s wall",
            job.epochs,
            record.train_loss,
            record.train_accuracy,
            test.accuracy,
            test.loss,
            fmt_opt(test.jigsaw_accuracy),
            fmt_opt(test.consistency_agreement),
            state.train_seconds,
            record.wall_seconds,
        );
        save_epoch(&layout, &trainer, &state, epoch)?;
        append(&layout.epochs(), &serde_json::to_string(&record)?)?;
        last_test = Some(test);
        if let Some(limit) = job.time_limit_min
            && started.elapsed().as_secs_f64() > limit * 60.0
            && epoch < job.epochs
        {
            println!("time limit of {limit} min reached after epoch {epoch}; resume with --resume");
            break;
        }
    }
    // The last epoch's evaluation is the final one; evaluate only when no epoch ran now (a
    // resume of a finished run).
    let final_test = match last_test {
        Some(t) => t,
        None => evaluate(&trainer.model.inference(), &test_data, &eval_options),
    };
    let summary = serde_json::json!({
        "epochs_done": state.epochs_done,
        "test": final_test,
        "train_seconds": state.train_seconds,
        "config": config,
    });
    mjp::fsutil::write_atomic(
        &layout.summary(),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "done: test accuracy {:.4} after {} epochs, {:.1} min of training ({:.1} min wall); run directory {}",
        final_test.accuracy,
        state.epochs_done,
        state.train_seconds / 60.0,
        started.elapsed().as_secs_f64() / 60.0,
        out.display()
    );
    Ok(TrainOutcome {
        epochs_done: state.epochs_done,
        test: Some(final_test),
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

fn load(
    job: &TrainJob,
    split: Split,
    vit: &mjp::VitConfig,
    limit: Option<usize>,
) -> Result<mjp::data::Dataset> {
    let ds = job.data.load(split, &job.data_dir)?;
    let ds = match limit {
        Some(n) => ds.take(n),
        None => ds,
    };
    Ok(ds.conform(vit.channels, vit.image_size)?)
}

fn save_epoch(out: &TrainLayout, trainer: &Trainer, state: &State, epoch: usize) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("mjpfl.epoch".to_string(), epoch.to_string());
    checkpoint::save(&trainer.model, &out.model(epoch), meta)?;
    let optim = out.optimiser(epoch);
    trainer.optimizer.save(&optim).map_err(|e| {
        LabError::Message(format!("saving optimiser state {}: {e:?}", optim.display()))
    })?;
    // state.json is written last: it only ever points at a complete checkpoint.
    mjp::fsutil::write_atomic(
        &out.state(),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    Ok(())
}

fn resume(
    out: &TrainLayout,
    config: &RunConfig,
    objective: &ObjectiveConfig,
    device: &mjp::burn::tensor::Device,
) -> Result<(Trainer, State)> {
    let state_path = out.state();
    let state: State = serde_json::from_slice(
        &std::fs::read(&state_path)
            .with_context(|| format!("--resume: cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("--resume: {} is corrupt", state_path.display()))?;
    let saved: RunConfig = serde_json::from_slice(&std::fs::read(out.config())?)
        .with_context(|| "--resume: config.json is corrupt")?;
    if saved.vit != config.vit
        || saved.seed != config.seed
        || saved.batch_size != config.batch_size
        || saved.data != config.data
    {
        bail!(
            "--resume: {} was trained with a different model, data, batch size or seed; use another --out",
            out.root().display()
        );
    }
    let ckpt = Checkpoint::read(&out.model(state.epochs_done))?;
    let model = ckpt.into_model(device)?;
    let mut trainer = Trainer::new(model, &config.optimizer, objective.clone());
    let optim = out.optimiser(state.epochs_done);
    trainer.optimizer = trainer.optimizer.load(&optim).map_err(|e| {
        LabError::Message(format!(
            "--resume: optimiser state {}: {e:?}",
            optim.display()
        ))
    })?;
    println!(
        "resuming after epoch {} ({} steps)",
        state.epochs_done, state.steps_done
    );
    Ok((trainer, state))
}

fn append(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}")?;
    f.sync_data()?;
    Ok(())
}
