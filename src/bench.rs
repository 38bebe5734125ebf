//! `mjpfl bench`: arguments of the benchmarks in `mjpfl_lab::bench` (speed figures printed as
//! ratios against a reference measured in the same run).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mjp::PeMode;
use mjpfl_lab::bench::{AggregateBench, AttackBench, TrainStepBench};

use crate::common::DeviceArgs;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Milliseconds per training step vs the PyTorch reference.
    TrainStep(TrainStepArgs),
    /// Aggregation throughput over gRPC and the coordinator's peak memory.
    Aggregate(AggregateArgs),
    /// Inverting Gradients iterations per second vs a PyTorch double-backward reference.
    Attack(AttackBenchArgs),
    /// The model's gradient (fused kernels and burn's unfused path) against an independent
    /// PyTorch implementation in float64.
    Parity(ParityArgs),
}

/// Arguments of `bench parity`.
#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Architecture preset (learned PE, cross-entropy).
    #[arg(long, default_value = "vit-micro-28")]
    preset: String,
    /// Batch size.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Python interpreter with torch for the reference.
    #[arg(long, env = "MJPFL_PYTHON", default_value = "python3")]
    python: String,
}

/// Arguments of `bench attack`.
#[derive(Args, Debug)]
pub struct AttackBenchArgs {
    /// Architecture preset (learned PE, batch 1).
    #[arg(long, default_value = "vit-micro-28")]
    preset: String,
    /// Timed iterations.
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Python interpreter with torch for the reference ("none" skips it).
    #[arg(long, env = "MJPFL_PYTHON", default_value = "python3")]
    python: String,
}

/// Arguments of `bench aggregate`.
#[derive(Args, Debug)]
pub struct AggregateArgs {
    /// Architecture preset whose size the updates have.
    #[arg(long, default_value = "vit-tiny-32")]
    preset: String,
    /// Updates folded into the round (one client each).
    #[arg(long, default_value_t = 100)]
    updates: usize,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

/// Arguments of `bench train-step`.
#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// Architecture preset.
    #[arg(long, default_value = "vit-tiny-32")]
    preset: String,
    /// Position-embedding mode of our model (the reference takes MJP's step for mjp: shuffle, unk rows, DAL loss; a learned-PE step otherwise).
    #[arg(long, default_value = "learned")]
    pe: PeMode,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Start from this mjpfl checkpoint (e.g. a federation's `checkpoints/model-0020`) instead
    /// of a fresh model: step time can depend on the weights (saturated softmaxes).
    #[arg(long)]
    init: Option<std::path::PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Python interpreter with torch for the reference ("none" skips it).
    #[arg(long, env = "MJPFL_PYTHON", default_value = "python3")]
    python: String,
    /// Device of the reference (cpu, cuda:0); defaults to match --device.
    #[arg(long)]
    reference_device: Option<String>,
    /// Skip timing the step with the fused kernels off (burn's own operations).
    #[arg(long)]
    skip_unfused: bool,
}

/// `mjpfl bench ...`.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TrainStep(a) => mjpfl_lab::bench::train_step(&TrainStepBench {
            preset: a.preset,
            pe: a.pe,
            batch: a.batch,
            steps: a.steps,
            warmup: a.warmup,
            init: a.init,
            device: a.device.device,
            python: a.python,
            reference_device: a.reference_device,
            compare_unfused: !a.skip_unfused,
        })?,
        BenchCommand::Aggregate(a) => mjpfl_lab::bench::aggregate(&AggregateBench {
            preset: a.preset,
            updates: a.updates,
            concurrency: a.concurrency,
            coordinator_exe: std::env::current_exe().context("locating the mjpfl binary")?,
        })?,
        BenchCommand::Parity(a) => mjpfl_lab::bench::parity(&a.preset, a.batch, &a.python)?,
        BenchCommand::Attack(a) => mjpfl_lab::bench::attack_speed(&AttackBench {
            preset: a.preset,
            iterations: a.iterations,
            python: a.python,
        })?,
    }
    Ok(())
}
