//! Benchmark bodies (`mjpfl bench ...`): speed figures printed as ratios against a reference
//! measured in the same run.
//!
//! `train-step`: milliseconds per training step (forward, backward, AdamW) of a preset on a
//! device, next to the PyTorch reference (`bench/reference_train_step.py`, same architecture and
//! shapes) when a Python with torch is available.
//!
//! `aggregate`: N updates of a preset's size streamed over gRPC into a real `mjpfl coordinator`
//! child process and folded into one round; GB/s beside an in-memory fold of the same updates
//! (the reference), and the coordinator's peak RSS beside the target 3 x model + 100 MB.
//!
//! `attack`: Inverting Gradients iterations per second beside a PyTorch double-backward
//! reference.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use mjp::train::{Batch, ObjectiveConfig, OptimizerKind, Trainer};
use mjp::{DeviceSpec, PeMode, Seed, Vit};
use rand::Rng;

use crate::bail;
use crate::error::{Context, LabError, Result};
use crate::stats::mean_std;

/// `bench train-step`.
#[derive(Clone, Debug)]
pub struct TrainStepBench {
    /// Architecture preset.
    pub preset: String,
    /// Position-embedding mode of our model (the reference takes MJP's step for `mjp`, a
    /// learned-PE ViT's for every other mode).
    pub pe: PeMode,
    /// Batch size.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Start from this checkpoint instead of a fresh model.
    pub init: Option<PathBuf>,
    /// Our device.
    pub device: DeviceSpec,
    /// Python with torch for the reference ("none" skips it).
    pub python: String,
    /// Device of the reference (cpu, cuda:0); `None` matches `device`.
    pub reference_device: Option<String>,
    /// Also time the step with the fused kernels off (burn's own operations).
    pub compare_unfused: bool,
}

/// `bench aggregate`.
#[derive(Clone, Debug)]
pub struct AggregateBench {
    /// Architecture preset whose size the updates have.
    pub preset: String,
    /// Updates folded into the round (one client each).
    pub updates: usize,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// The `mjpfl` binary to start the coordinator child from.
    pub coordinator_exe: PathBuf,
}

/// `bench attack`.
#[derive(Clone, Debug)]
pub struct AttackBench {
    /// Architecture preset (learned PE, batch 1).
    pub preset: String,
    /// Timed iterations.
    pub iterations: usize,
    /// Python with torch for the reference ("none" skips it).
    pub python: String,
}

/// Milliseconds per training step, and the reference's in the same run.
pub fn train_step(args: &TrainStepBench) -> Result<()> {
    let device = args.device.device()?.autodiff();
    let (config, model) = match &args.init {
        Some(path) => {
            let ck = mjp::checkpoint::Checkpoint::read(path)?;
            (ck.config.clone(), ck.into_model(&device)?)
        }
        None => {
            let config = mjp::VitConfig::preset(&args.preset)?.with_pe(args.pe);
            let model = Vit::new(&config, Seed(0), &device);
            (config, model)
        }
    };
    let objective = ObjectiveConfig {
        jigsaw: mjp::JigsawConfig {
            probability: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut rng = Seed(1).rng();
    let n = args.batch * config.channels * config.image_size * config.image_size;
    let pixels: Vec<f32> = (0..n).map(|_| rng.random()).collect();
    let labels: Vec<u32> = (0..args.batch)
        .map(|_| rng.random_range(0..config.num_classes as u32))
        .collect();
    let batch = Batch::new(pixels, labels, &config, &device);
    let time_steps = |model: Vit| -> Result<(f64, f64)> {
        let mut trainer = Trainer::new(
            model,
            &OptimizerKind::AdamW { weight_decay: 0.05 },
            objective.clone(),
        );
        let mut rng = Seed(2).rng();
        let mut times = Vec::new();
        for i in 0..args.warmup + args.steps {
            let t = Instant::now();
            trainer.step(&batch, 1e-3, 0.5, &mut rng);
            device
                .sync()
                .map_err(|e| LabError::Message(format!("device sync: {e:?}")))?;
            if i >= args.warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(mean_std(&times))
    };
    // Steps run on a worker of the pool their kernels split work over, as a simulated client's
    // do (`TrainingWorkers`).
    let time_steps = |model: Vit| mjp::kernels::on_pool(|| time_steps(model));
    let fused_available = mjp::kernels::fused_on(&device, mjp::burn::tensor::DType::F32);
    let (mean, std) = time_steps(model.clone())?;
    println!(
        "mjpfl  {} pe={} batch={} device={}{}: {mean:.1} ms/step (std {std:.1}, {} steps)",
        args.init
            .as_ref()
            .map_or(args.preset.clone(), |p| p.display().to_string()),
        config.pe,
        args.batch,
        args.device,
        if fused_available { " fused" } else { "" },
        args.steps
    );
    if fused_available && args.compare_unfused {
        // The same steps with burn's own LayerNorm, attention, GELU and AdamW.
        mjp::kernels::set_enabled(false);
        let unfused = time_steps(model);
        mjp::kernels::set_enabled(true);
        let (u, ustd) = unfused?;
        println!("mjpfl  unfused (burn's ops): {u:.1} ms/step (std {ustd:.1})");
        println!("ratio fused/unfused = {:.2}x", mean / u);
    }
    if args.python == "none" {
        return Ok(());
    }
    let reference_device = args
        .reference_device
        .clone()
        .unwrap_or_else(|| match args.device {
            mjp::DeviceSpec::TchCuda(n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        });
    match reference(args, &objective, &reference_device) {
        Ok((ms, pe)) => {
            println!(
                "torch  {} pe={pe} batch={} device={reference_device}: {ms:.1} ms/step",
                args.preset, args.batch
            );
            println!("ratio mjpfl/torch = {:.2}x", mean / ms);
        }
        Err(e) => println!("reference skipped: {e:#}"),
    }
    Ok(())
}

/// The reference's step: MJP's (shuffle, unk rows, DAL loss at the objective's ratio and weight)
/// for an MJP model, a learned-PE ViT's for every other mode. Returns the milliseconds and the
/// reference's PE mode.
fn reference(
    args: &TrainStepBench,
    objective: &ObjectiveConfig,
    device: &str,
) -> Result<(f64, &'static str)> {
    let pe = if args.pe == PeMode::Mjp {
        "mjp"
    } else {
        "learned"
    };
    let dal_weight = match objective.dal_lambda {
        mjp::LambdaSchedule::Constant { value } => value,
        _ => bail!("the reference takes a constant DAL weight"),
    };
    let out = run_reference(
        &args.python,
        "reference_train_step.py",
        &[
            "--preset",
            &args.preset,
            "--batch",
            &args.batch.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
            "--device",
            device,
            "--pe",
            pe,
            "--ratio",
            &objective.jigsaw.ratio.to_string(),
            "--dal-weight",
            &dal_weight.to_string(),
        ],
    )?;
    let ms = out["ms_per_step"]
        .as_f64()
        .context("reference output lacks ms_per_step")?;
    Ok((ms, pe))
}

/// `bench parity`: the gradient of the cross-entropy of a fresh learned-PE model on a random
/// batch, computed with the fused kernels and with burn's unfused operations, each compared with
/// an independent PyTorch implementation in float64 (`bench/reference_parity.py`; float32
/// PyTorch is reported beside them as the yardstick).
pub fn parity(preset: &str, batch: usize, python: &str) -> Result<()> {
    use mjp::NamedTensors;
    use mjp::train::compute_gradients_with_threads;
    use std::collections::HashMap;

    let config = mjp::VitConfig::preset(preset)?.with_pe(PeMode::Learned);
    let device = DeviceSpec::Flex.device()?.autodiff();
    let model = Vit::new(&config, Seed(0), &device);
    let mut rng = Seed(3).rng();
    let n = batch * config.channels * config.image_size * config.image_size;
    let pixels: Vec<f32> = (0..n).map(|_| rng.random()).collect();
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.random_range(0..config.num_classes as u32))
        .collect();
    let dir = tempfile::tempdir().context("making a temporary directory")?;
    NamedTensors::from_module(&model)
        .save(&dir.path().join("params.safetensors"), HashMap::new())?;
    let side = config.image_size;
    let batch_tensors = NamedTensors::new(vec![
        mjp::NamedTensor {
            name: "pixels".into(),
            shape: vec![batch, config.channels, side, side],
            data: pixels.clone(),
        },
        mjp::NamedTensor {
            name: "labels".into(),
            shape: vec![batch],
            data: labels.iter().map(|&l| l as f32).collect(),
        },
    ]);
    batch_tensors.save(&dir.path().join("batch.safetensors"), HashMap::new())?;
    let input = Batch::new(pixels, labels, &config, &device);
    for (name, fused) in [("fused", true), ("unfused", false)] {
        mjp::kernels::set_enabled(fused);
        let grads = compute_gradients_with_threads(&model, &input, None, 0.0, false, 1);
        let values = NamedTensors::gradients_of(&model, &grads.grads);
        values.save(
            &dir.path().join(format!("grads-{name}.safetensors")),
            HashMap::new(),
        )?;
    }
    mjp::kernels::set_enabled(true);
    let settings = serde_json::json!({
        "heads": config.heads,
        "patch": config.patch_size,
        "mean": config.mean,
        "std": config.std,
    });
    std::fs::write(dir.path().join("config.json"), settings.to_string())
        .context("writing config.json")?;
    let out = run_reference(
        python,
        "reference_parity.py",
        &[dir.path().to_str().context("temporary path is not UTF-8")?],
    )?;
    println!(
        "parity {preset} batch={batch} learned PE, relative L2 error of the parameter gradient \
         against PyTorch float64:"
    );
    for name in ["fused", "unfused", "torch-float32"] {
        let r = &out[name];
        println!(
            "  {name:<14} overall {:.2e}, worst tensor {:.2e} ({})",
            r["overall"].as_f64().unwrap_or(f64::NAN),
            r["worst"].as_f64().unwrap_or(f64::NAN),
            r["worst_tensor"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// Runs `bench/<script>` with `python` and parses the JSON object on its last stdout line.
fn run_reference(python: &str, script: &str, args: &[&str]) -> Result<serde_json::Value> {
    let script = reference_script(script)?;
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !output.status.success() {
        bail!(
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
    serde_json::from_str(line).with_context(|| format!("reference printed {line:?}"))
}

fn reference_script(name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("bench").join(name),
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("bench/{name} not found (run from the repository root)"))
}

/// Inverting Gradients with the PE-gradient term, batch 1, learned PE: iterations per second
/// (each iteration: the matching objective's parameter gradient, its input gradient through the
/// finite-difference Jacobian-vector product, TV, a signed Adam step).
pub fn attack_speed(args: &AttackBench) -> Result<()> {
    use mjp::fl::{RoundConfig, UpdateKind};
    use mjpfl_attacks::case::AttackCase;
    use mjpfl_attacks::optimise::{OptimisationConfig, optimise};
    use mjpfl_attacks::victim::Victim;

    let vit = mjp::VitConfig::preset(&args.preset)?.with_pe(PeMode::Learned);
    let device = DeviceSpec::Flex.device()?.autodiff();
    let model = Vit::new(&vit, Seed(0), &device);
    let global = mjp::NamedTensors::from_module(&model);
    let mut rng = Seed(1).rng();
    let per = vit.channels * vit.image_size * vit.image_size;
    let image: Vec<f32> = (0..per).map(|_| rng.random()).collect();
    let labels = vec![3u32];
    let victim = Victim::new(&vit, &global, 0.0, DeviceSpec::Flex)?;
    let update = victim.parameter_gradient(&image, &labels, None);
    let case = AttackCase {
        vit: vit.clone(),
        global,
        config: RoundConfig::fedsgd(1, 0.0, 0.0, 0),
        update,
        kind: UpdateKind::FedSgd,
        batch_size: 1,
        local_steps: 1,
        num_examples: 1,
        clients: 1,
        device: DeviceSpec::Flex,
    };
    let config = OptimisationConfig {
        iterations: args.iterations,
        restarts: 1,
        init_mean_image: false,
        ..OptimisationConfig::inverting_gradients(true)
    };
    // Warm-up (allocator, thread pools), then the timed run.
    optimise(
        &case,
        &labels,
        &OptimisationConfig {
            iterations: 5,
            ..config.clone()
        },
        |_, _| {},
    )?;
    let t = Instant::now();
    optimise(&case, &labels, &config, |_, _| {})?;
    let ours = args.iterations as f64 / t.elapsed().as_secs_f64();
    println!(
        "mjpfl  IG+PE {} batch 1 (flex, finite-difference HVP): {ours:.1} it/s",
        args.preset
    );
    if args.python == "none" {
        return Ok(());
    }
    match run_reference(
        &args.python,
        "reference_attack.py",
        &[
            "--preset",
            &args.preset,
            "--iterations",
            &args.iterations.to_string(),
        ],
    )
    .and_then(|v| v["its_per_sec"].as_f64().context("no its_per_sec"))
    {
        Ok(theirs) => {
            println!(
                "torch  IG+PE {} batch 1 (cpu, exact double backward): {theirs:.1} it/s",
                args.preset
            );
            println!("ratio mjpfl/torch speed = {:.2}x", ours / theirs);
        }
        Err(e) => println!("reference skipped: {e:#}"),
    }
    Ok(())
}

/// Kills the child coordinator however the benchmark ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident set size of a process in bytes (Linux `VmHWM`).
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc/<pid>/status (peak RSS needs Linux)")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/<pid>/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("unreadable VmHWM")?;
    Ok(kb * 1024)
}

/// Aggregation throughput over gRPC into a coordinator child process, and its peak RSS.
pub fn aggregate(args: &AggregateBench) -> Result<()> {
    use mjpfl_client::protocol::{JoinParams, Protocol, Task};
    use mjpfl_coordinator::CoordinatorConfig;
    use mjpfl_proto::{convert, v1};

    if args.updates == 0 {
        bail!("--updates must be at least 1");
    }
    let config_vit = mjp::VitConfig::preset(&args.preset)?;
    let dir = tempfile_dir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut config = CoordinatorConfig::default();
    config.model.preset = args.preset.clone();
    config.model.pe = PeMode::Learned;
    config.federation.rounds = 2; // round 2 keeps the coordinator alive while we read its RSS
    config.federation.min_clients = args.updates as u32;
    config.federation.clients_per_round = args.updates as u32;
    config.federation.min_fit = args.updates as u32;
    config.federation.round_deadline_secs = 3600.0;
    config.data.skip_eval = true;
    config.partition = mjp::partition::PartitionScheme::Iid {
        count: args.updates as u32,
        size: None,
    };
    config.training.update_kind = mjp::fl::UpdateKind::FedAvg;
    config.server.listen = format!("127.0.0.1:{port}");
    let config_path = dir.join("bench-aggregate.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let child = Command::new(&args.coordinator_exe)
        .arg("coordinator")
        .arg("--config")
        .arg(&config_path)
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the coordinator child process")?;
    let child = ChildGuard(child);
    let pid = child.0.id();
    let endpoint = format!("http://127.0.0.1:{port}");

    let runtime = crate::runtime::runtime()?;
    let (n, model_bytes, wire_secs, rss_idle) = runtime.block_on(async {
        let mut status = {
            let start = Instant::now();
            loop {
                match Protocol::connect(&endpoint).await {
                    Ok(c) => break c,
                    Err(_) if start.elapsed().as_secs() < 60 => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await
                    }
                    Err(e) => bail!("coordinator did not come up: {e}"),
                }
            }
        };
        let rss_idle = peak_rss(pid)?;
        let mut clients = Vec::new();
        for i in 0..args.updates {
            // One connection per client, as real clients have: uploads multiplexed on one HTTP/2
            // connection share its flow-control window, and those waiting for an upload permit
            // would stall the ones being read.
            let channel = mjpfl_client::protocol::connect(&endpoint).await?;
            let mut p = Protocol::on(channel.clone());
            let joined = p
                .join(&JoinParams {
                    name: format!("bench-{i}"),
                    secret: config.federation.join_secret.clone(),
                    device: "bench".into(),
                    num_examples: 100,
                    audit: false,
                    partition_hint: i as i32,
                    previous_token: String::new(),
                })
                .await?;
            clients.push((p, channel, joined.token));
        }
        let mut tasks = Vec::new();
        for (p, _, token) in &mut clients {
            loop {
                match p.task(token).await? {
                    Task::Train {
                        round,
                        model_version,
                        ..
                    } => {
                        tasks.push((round, model_version));
                        break;
                    }
                    Task::Wait(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                    Task::Finished(why) => bail!("the federation finished early: {why}"),
                }
            }
        }
        let (round, version) = tasks[0];
        let (p0, _, token0) = &mut clients[0];
        let mut tensors = p0.download(token0, version).await?;
        tensors.scale(0.01);
        let model_bytes = tensors.numel() * 4;
        let chunks = convert::chunk_tensors(&tensors, mjpfl_proto::MAX_CHUNK_BYTES);
        let update = mjp::fl::ModelUpdate {
            round,
            model_version: version,
            kind: mjp::fl::UpdateKind::FedAvg,
            batch_size: 32,
            num_examples: 100,
            local_steps: 1,
            metrics: Default::default(),
            tensors,
        };
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let chunks = std::sync::Arc::new(chunks);
        let start = Instant::now();
        let mut uploads = tokio::task::JoinSet::new();
        for (_, channel, token) in clients {
            let header = convert::update_header(&update, &token);
            let (chunks, permits) = (chunks.clone(), permits.clone());
            // A raw stream: chunks are cloned lazily, so the benchmark itself holds one copy.
            let mut c = mjpfl_client::protocol::federation_client(channel);
            uploads.spawn(async move {
                let _p = permits
                    .acquire_owned()
                    .await
                    .map_err(|e| LabError::Message(e.to_string()))?;
                // Chunks are cloned lazily, one at a time, as the stream is sent.
                let n = chunks.len();
                let messages = std::iter::once(v1::update_message::Kind::Header(header))
                    .chain((0..n).map(move |i| v1::update_message::Kind::Chunk(chunks[i].clone())))
                    .map(|k| v1::UpdateMessage { kind: Some(k) });
                c.submit_update(tokio_stream::iter(messages))
                    .await
                    .map_err(|s| LabError::Message(format!("SubmitUpdate: {s}")))?;
                Ok::<(), LabError>(())
            });
        }
        while let Some(r) = uploads.join_next().await {
            r.map_err(|e| LabError::Message(format!("upload task: {e}")))??;
        }
        // Accepted means folded; wait for the commit (aggregate + checkpoint) too.
        while status.status().await?.model_version < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok::<_, LabError>((args.updates, model_bytes, secs, rss_idle))
    })?;
    let rss = peak_rss(pid)?;
    drop(child);

    // Reference: the same fold in memory, no wire, no validation.
    let params = Vit::new(&config_vit, Seed(0), &DeviceSpec::Flex.device()?);
    let tensors = mjp::NamedTensors::from_module(&params);
    let start = Instant::now();
    let mut acc = mjpfl_coordinator::aggregate::Aggregator::new(
        mjpfl_coordinator::aggregate::AggregatorKind::Mean,
        &tensors.manifest(),
    );
    for _ in 0..n {
        acc.fold(&tensors, 100.0, 1.0);
    }
    let mean = acc.finish().context("empty fold")?;
    let mem_secs = start.elapsed().as_secs_f64();
    std::hint::black_box(mean);

    let gb = (n * model_bytes) as f64 / 1e9;
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let target = 3 * model_bytes as u64 + (100 << 20);
    println!(
        "aggregate {}: {n} updates of {:.1} MB ({} params) over gRPC, {} in flight",
        args.preset,
        model_bytes as f64 / 1e6,
        model_bytes / 4,
        args.concurrency
    );
    println!(
        "  wire:      {wire_secs:.2} s, {:.2} GB/s (receive, checksum, validate, fold, commit)",
        gb / wire_secs
    );
    println!(
        "  in memory: {mem_secs:.2} s, {:.2} GB/s (reference: the fold alone)",
        gb / mem_secs
    );
    println!(
        "  ratio wire/in-memory throughput = {:.2}",
        mem_secs / wire_secs
    );
    println!(
        "  coordinator peak RSS {:.1} MiB (idle {:.1} MiB); target 3 x model + 100 MiB = {:.1} MiB: {}",
        mb(rss),
        mb(rss_idle),
        mb(target),
        if rss <= target { "OK" } else { "OVER" }
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mjpfl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
