//! `mjpfl train`: centralised training with a progress bar, per-epoch clean accuracy, jigsaw
//! accuracy and consistency, safetensors checkpoints, resume and seeds.
//!
//! Run directory: `config.json`, `epochs.jsonl` (one record per epoch), `checkpoints/
//! epoch-NNNN.safetensors` (+ `.optim` optimiser state), `state.json` (what resume reads) and
//! `summary.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use mjp::checkpoint::{self, Checkpoint};
use mjp::data::{Augment, Split};
use mjp::train::{
    Batch, EvalOptions, ObjectiveConfig, OptimizerKind, Trainer, cosine_lr, evaluate,
};
use mjp::{JigsawConfig, LambdaSchedule, Seed, Vit};
use serde::{Deserialize, Serialize};

use crate::common::{DataArgs, DeviceArgs, ModelArgs, progress_bar};

/// Arguments of `mjpfl train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// MJP shuffle ratio.
    #[arg(long, default_value_t = 0.1)]
    ratio: f64,
    /// Probability that a step uses the jigsaw (reference 0.5).
    #[arg(long, default_value_t = 0.5)]
    jigsaw_prob: f64,
    /// One jigsaw per sample instead of one per batch.
    #[arg(long)]
    per_sample: bool,
    /// DAL loss weight.
    #[arg(long, default_value_t = 0.01)]
    dal_lambda: f64,
    /// Use the reference DAL schedule (warm-up to 0.01, cosine to 0.005) instead of a constant.
    #[arg(long)]
    dal_schedule: bool,
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (AdamW, cosine decay after one warm-up epoch fraction).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Warm-up length as a fraction of all steps.
    #[arg(long, default_value_t = 0.05)]
    warmup: f64,
    /// Random-crop padding (0 disables).
    #[arg(long, default_value_t = 0)]
    crop_padding: usize,
    /// Random horizontal flips.
    #[arg(long)]
    hflip: bool,
    /// Use only the first N training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on only the first N test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Measure jigsaw accuracy and consistency on the first N test images (0 = all); clean
    /// accuracy always uses every test image.
    #[arg(long, default_value_t = 2000)]
    jigsaw_limit: usize,
    /// Run seed (model init, data order, jigsaws).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run directory (default runs/train-<preset>-<pe>-s<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the last completed epoch in the run directory.
    #[arg(long)]
    resume: bool,
    /// Initialise from timm ViT safetensors where names and shapes match.
    #[arg(long)]
    init_timm: Option<PathBuf>,
    /// Stop after the epoch during which this many minutes have passed.
    #[arg(long)]
    time_limit_min: Option<f64>,
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

pub fn run(args: TrainArgs) -> Result<()> {
    let vit = args.model.config()?;
    let jigsaw = JigsawConfig {
        ratio: args.ratio,
        probability: args.jigsaw_prob,
        per_sample: args.per_sample,
        min_block: None,
    };
    jigsaw.validate()?;
    if args.batch_size == 0 || args.epochs == 0 {
        bail!("--batch-size and --epochs must be positive");
    }
    let objective = ObjectiveConfig {
        jigsaw,
        dal_lambda: if args.dal_schedule {
            LambdaSchedule::reference()
        } else {
            LambdaSchedule::Constant {
                value: args.dal_lambda,
            }
        },
        dal_normalized_targets: false,
    };
    let config = RunConfig {
        vit: vit.clone(),
        objective: objective.clone(),
        optimizer: OptimizerKind::AdamW {
            weight_decay: args.weight_decay,
        },
        data: args.data.data.to_string(),
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup: args.warmup,
        augment: Augment {
            crop_padding: args.crop_padding,
            hflip: args.hflip,
        },
        train_limit: args.train_limit,
        seed: args.seed,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/train-{}-{}-s{}",
            args.model.preset, vit.pe, args.seed
        ))
    });
    let device = args.device.device.device()?;
    let ad = device.clone().autodiff();

    let train_data = load(&args.data, Split::Train, &vit, args.train_limit)?;
    let test_data = load(&args.data, Split::Test, &vit, args.test_limit)?;
    println!(
        "train: {} on {} ({} train / {} test images), pe={} ratio={} jigsaw p={} device={}",
        args.model.preset,
        train_data.name,
        train_data.len(),
        test_data.len(),
        vit.pe,
        args.ratio,
        args.jigsaw_prob,
        args.device.device
    );

    let ckpt_dir = out.join("checkpoints");
    let (mut trainer, mut state) = if args.resume {
        resume(&out, &config, &objective, &ad)?
    } else {
        if out.join("state.json").exists() {
            bail!(
                "{} already holds a training run; pass --resume to continue it or --out for a new one",
                out.display()
            );
        }
        std::fs::create_dir_all(&ckpt_dir)
            .with_context(|| format!("creating {}", ckpt_dir.display()))?;
        mjp::fsutil::write_atomic(
            &out.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let mut model = Vit::new(&vit, Seed(args.seed), &ad);
        if let Some(path) = &args.init_timm {
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
    if state.epochs_done >= args.epochs {
        println!(
            "already trained {} epochs; nothing to do",
            state.epochs_done
        );
        return Ok(());
    }

    let steps_per_epoch = train_data.len().div_ceil(args.batch_size);
    let total_steps = steps_per_epoch * args.epochs;
    let warmup_steps = ((total_steps as f64) * args.warmup).round() as usize;
    let eval_options = EvalOptions {
        seed: Seed(args.seed).child("eval", 0),
        jigsaw_limit: (args.jigsaw_limit > 0).then_some(args.jigsaw_limit),
        ..EvalOptions::default()
    };
    let mut last_test = None;
    let started = Instant::now();
    let seed = Seed(args.seed);

    for epoch in state.epochs_done + 1..=args.epochs {
        let t_epoch = Instant::now();
        let mut order_rng = seed.child("epoch-order", epoch as u64).rng();
        let mut step_rng = seed.child("epoch-steps", epoch as u64).rng();
        let order = train_data.epoch_order(&mut order_rng);
        let bar = progress_bar(
            steps_per_epoch as u64,
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
        );
        bar.set_prefix(format!("epoch {epoch}/{}", args.epochs));
        let (mut loss_sum, mut correct, mut seen, mut lr) = (0.0, 0usize, 0usize, args.lr);
        for chunk in order.chunks(args.batch_size) {
            let (pixels, labels) = train_data.batch(chunk, config.augment, &mut step_rng);
            let batch = Batch::new(pixels, labels, &vit, &ad);
            lr = cosine_lr(
                args.lr,
                args.lr * 0.01,
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
            args.epochs,
            record.train_loss,
            record.train_accuracy,
            test.accuracy,
            test.loss,
            fmt_opt(test.jigsaw_accuracy),
            fmt_opt(test.consistency_agreement),
            state.train_seconds,
            record.wall_seconds,
        );
        save_epoch(&out, &trainer, &state, epoch)?;
        append(&out.join("epochs.jsonl"), &serde_json::to_string(&record)?)?;
        last_test = Some(test);
        if let Some(limit) = args.time_limit_min
            && started.elapsed().as_secs_f64() > limit * 60.0
            && epoch < args.epochs
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
        &out.join("summary.json"),
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
    Ok(())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

fn load(
    data: &DataArgs,
    split: Split,
    vit: &mjp::VitConfig,
    limit: Option<usize>,
) -> Result<mjp::data::Dataset> {
    let ds = data.data.load(split, &data.data_dir)?;
    let ds = match limit {
        Some(n) => ds.take(n),
        None => ds,
    };
    Ok(ds.conform(vit.channels, vit.image_size)?)
}

fn epoch_path(out: &Path, epoch: usize, ext: &str) -> PathBuf {
    out.join("checkpoints")
        .join(format!("epoch-{epoch:04}.{ext}"))
}

fn save_epoch(out: &Path, trainer: &Trainer, state: &State, epoch: usize) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("mjpfl.epoch".to_string(), epoch.to_string());
    checkpoint::save(&trainer.model, &epoch_path(out, epoch, "safetensors"), meta)?;
    let optim = epoch_path(out, epoch, "optim");
    trainer
        .optimizer
        .save(&optim)
        .map_err(|e| anyhow::anyhow!("saving optimiser state {}: {e:?}", optim.display()))?;
    // state.json is written last: it only ever points at a complete checkpoint.
    mjp::fsutil::write_atomic(
        &out.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    Ok(())
}

fn resume(
    out: &Path,
    config: &RunConfig,
    objective: &ObjectiveConfig,
    device: &mjp::burn::tensor::Device,
) -> Result<(Trainer, State)> {
    let state_path = out.join("state.json");
    let state: State = serde_json::from_slice(
        &std::fs::read(&state_path)
            .with_context(|| format!("--resume: cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("--resume: {} is corrupt", state_path.display()))?;
    let saved: RunConfig = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)
        .with_context(|| "--resume: config.json is corrupt")?;
    if saved.vit != config.vit
        || saved.seed != config.seed
        || saved.batch_size != config.batch_size
        || saved.data != config.data
    {
        bail!(
            "--resume: {} was trained with a different model, data, batch size or seed; use another --out",
            out.display()
        );
    }
    let ckpt = Checkpoint::read(&epoch_path(out, state.epochs_done, "safetensors"))?;
    let model = ckpt.into_model(device)?;
    let mut trainer = Trainer::new(model, &config.optimizer, objective.clone());
    let optim = epoch_path(out, state.epochs_done, "optim");
    trainer.optimizer = trainer
        .optimizer
        .load(&optim)
        .map_err(|e| anyhow::anyhow!("--resume: optimiser state {}: {e:?}", optim.display()))?;
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
