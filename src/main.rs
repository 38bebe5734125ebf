//! `mjpfl`: the thin binary that parses arguments and wires the crates together.
//!
//! Subcommands: `simulate` (the main job: coordinator + clients + adversary on loopback),
//! `coordinator`, `client`, `adversary`, `train` (centralised), `attack` (one update offline),
//! `sweep`, `report`, `bench`.

mod bench;
mod common;
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
    /// Centralised training of an MJP-ViT with per-epoch clean/jigsaw accuracy and consistency.
    Train(train::TrainArgs),
    /// Benchmarks (train-step speed against a PyTorch reference measured in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    common::init_tracing();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
