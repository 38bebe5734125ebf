//! `mjpfl train`: arguments of centralised training, converted into a `mjpfl_lab` job.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mjpfl_lab::centralised::{TrainJob, run_training};

use crate::common::{DataArgs, DeviceArgs, ModelArgs};

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

/// `mjpfl train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let vit = args.model.config()?;
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/train-{}-{}-s{}",
            args.model.preset, vit.pe, args.seed
        ))
    });
    let job = TrainJob {
        vit,
        preset: args.model.preset,
        data: args.data.data,
        data_dir: args.data.data_dir,
        device: args.device.device,
        ratio: args.ratio,
        jigsaw_prob: args.jigsaw_prob,
        per_sample: args.per_sample,
        dal_lambda: args.dal_lambda,
        dal_schedule: args.dal_schedule,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        warmup: args.warmup,
        crop_padding: args.crop_padding,
        hflip: args.hflip,
        train_limit: args.train_limit,
        test_limit: args.test_limit,
        jigsaw_limit: args.jigsaw_limit,
        seed: args.seed,
        out,
        resume: args.resume,
        init_timm: args.init_timm,
        time_limit_min: args.time_limit_min,
    };
    run_training(&job)?;
    Ok(())
}
