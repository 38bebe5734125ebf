//! `mjpfl bench`: speed figures printed as ratios against a reference measured in the same run.
//!
//! `train-step`: milliseconds per training step (forward, backward, AdamW) of a preset on a
//! device, next to the PyTorch reference (`bench/reference_train_step.py`, same architecture and
//! shapes) when a Python with torch is available.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mjp::train::{Batch, ObjectiveConfig, OptimizerKind, Trainer};
use mjp::{PeMode, Seed, Vit};
use rand::Rng;

use crate::common::DeviceArgs;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Milliseconds per training step vs the PyTorch reference.
    TrainStep(TrainStepArgs),
}

/// Arguments of `bench train-step`.
#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// Architecture preset.
    #[arg(long, default_value = "vit-tiny-32")]
    preset: String,
    /// Position-embedding mode of our model (the reference is a learned-PE ViT).
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
    #[command(flatten)]
    device: DeviceArgs,
    /// Python interpreter with torch for the reference ("none" skips it).
    #[arg(long, env = "MJPFL_PYTHON", default_value = "python3")]
    python: String,
    /// Device of the reference (cpu, cuda:0); defaults to match --device.
    #[arg(long)]
    reference_device: Option<String>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::TrainStep(args) => train_step(args),
    }
}

fn train_step(args: TrainStepArgs) -> Result<()> {
    let config = mjp::VitConfig::preset(&args.preset)?.with_pe(args.pe);
    let device = args.device.device.device()?.autodiff();
    let model = Vit::new(&config, Seed(0), &device);
    let objective = ObjectiveConfig {
        jigsaw: mjp::JigsawConfig {
            probability: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut trainer = Trainer::new(
        model,
        &OptimizerKind::AdamW { weight_decay: 0.05 },
        objective,
    );
    let mut rng = Seed(1).rng();
    let n = args.batch * config.channels * config.image_size * config.image_size;
    let pixels: Vec<f32> = (0..n).map(|_| rng.random()).collect();
    let labels: Vec<u32> = (0..args.batch)
        .map(|_| rng.random_range(0..config.num_classes as u32))
        .collect();
    let batch = Batch::new(pixels, labels, &config, &device);
    let mut times = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t = Instant::now();
        trainer.step(&batch, 1e-3, 0.5, &mut rng);
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        if i >= args.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (mean, std) = mean_std(&times);
    println!(
        "mjpfl  {} pe={} batch={} device={}: {mean:.1} ms/step (std {std:.1}, {} steps)",
        args.preset, args.pe, args.batch, args.device.device, args.steps
    );
    if args.python == "none" {
        return Ok(());
    }
    let reference_device =
        args.reference_device
            .clone()
            .unwrap_or_else(|| match args.device.device {
                mjp::DeviceSpec::TchCuda(n) => format!("cuda:{n}"),
                _ => "cpu".into(),
            });
    match reference(&args, &reference_device) {
        Ok(ms) => {
            println!(
                "torch  {} batch={} device={reference_device}: {ms:.1} ms/step",
                args.preset, args.batch
            );
            println!("ratio mjpfl/torch = {:.2}x", mean / ms);
        }
        Err(e) => println!("reference skipped: {e:#}"),
    }
    Ok(())
}

fn reference(args: &TrainStepArgs, device: &str) -> Result<f64> {
    let script = reference_script()?;
    let output = Command::new(&args.python)
        .arg(&script)
        .args(["--preset", &args.preset, "--batch", &args.batch.to_string()])
        .args([
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ])
        .args(["--device", device])
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "{} failed (is torch installed? set MJPFL_PYTHON): {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("reference printed {line:?}"))?;
    v["ms_per_step"]
        .as_f64()
        .context("reference output lacks ms_per_step")
}

fn reference_script() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("bench/reference_train_step.py"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference_train_step.py"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("bench/reference_train_step.py not found (run from the repository root)")
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}
