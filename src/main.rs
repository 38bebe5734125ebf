//! `mjpfl`: the thin binary that parses arguments and wires the crates together.
//!
//! Subcommands: `simulate` (the main job: coordinator + clients + adversary on loopback),
//! `coordinator`, `client`, `adversary`, `train` (centralised), `attack` (one update offline),
//! `sweep`, `report`, `bench`.

mod adversary;
mod attack;
mod bench;
mod common;
mod federate;
mod plots;
mod report;
mod sweep;
mod train;

use anyhow::Result;

// Training allocates and frees many large activation buffers per step; glibc's allocator hands
// them back to the kernel and page-faults them in again. mimalloc keeps them (measured: see
// `mjpfl bench train-step` in the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

/// Federated-learning simulator for Masked Jigsaw Puzzle ViTs under gradient-inversion attacks.
#[derive(Parser)]
#[command(name = "mjpfl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: a coordinator, N clients (and the adversary) over loopback gRPC, with a report.
    Simulate(federate::SimulateArgs),
    /// Run a coordinator (clients connect over gRPC; see docs/protocol.md).
    Coordinator(federate::CoordinatorArgs),
    /// Run one training client against a coordinator.
    Client(federate::ClientArgs),
    /// Ask a coordinator where it stands (exit status 0 when it answers).
    Status(federate::StatusArgs),
    /// Run the honest-but-curious adversary against a coordinator's observer endpoint.
    Adversary(adversary::AdversaryArgs),
    /// Attack one saved update, or updates made from real images, offline.
    Attack(attack::AttackCmdArgs),
    /// Centralised training of an MJP-ViT with per-epoch clean/jigsaw accuracy and consistency.
    Train(train::TrainArgs),
    /// A grid of federations with attacks: privacy/utility tables and plots.
    Sweep(sweep::SweepArgs),
    /// Regenerate report.md (and plots) of a run or sweep directory from what is on disk.
    Report(report::ReportArgs),
    /// Benchmarks (train-step speed against a PyTorch reference measured in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    common::init_tracing();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Simulate(args) => federate::simulate(args),
        Command::Coordinator(args) => federate::coordinator(args),
        Command::Client(args) => federate::client(args),
        Command::Status(args) => federate::status(args),
        Command::Adversary(args) => adversary::run(args),
        Command::Attack(args) => attack::run(args),
        Command::Train(args) => train::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Report(args) => report::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
