//! `mjpfl`: the thin binary. It parses arguments, converts them into the configurations of the
//! library crates (`mjpfl_lab` runs every experiment), calls them and prints; nothing else.
//!
//! Subcommands: `simulate` (the main job: coordinator + clients + adversary on loopback),
//! `coordinator`, `client`, `adversary`, `train` (centralised), `attack` (one update offline),
//! `sweep`, `report`, `bench`.

mod adversary;
mod attack;
mod bench;
mod common;
mod federate;
mod secrets;
mod sweep;
mod train;

use anyhow::Result;

// Training allocates and frees many large activation buffers per step; glibc's allocator hands
// them back to the kernel and page-faults them in again. mimalloc keeps them (measured: see
// `mjpfl bench train-step` in the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

/// `mi_option_purge_delay` in the mimalloc.h that libmimalloc-sys 0.1.49 bundles (v3); the
/// crate exports no constant for it (a test checks the index by its default, 1000 ms).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_allow_thp` in the same header (a test checks it by its default, 1).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// How long freed memory stays with the allocator before it goes back to the OS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreedMemory {
    /// Return it at once. A coordinator wants a tight footprint: its large buffers (decoded
    /// uploads, the accumulator) are freed on one thread and allocated on another, and with a
    /// delay each thread's heap kept its own copy resident (`bench aggregate`: peak RSS
    /// 173.8 MiB with mimalloc's default 1 s delay, 137.1 MiB without, target 161.4 MiB).
    /// Transparent huge pages are off for the process as well: a 2 MiB page stays resident
    /// while any byte of it is in use, so purged memory did not leave (idle 56 -> 42 MB,
    /// `bench aggregate` peak 139-151 -> 112-120 MiB, and faster: fewer huge pages to zero).
    ReleasePromptly,
    /// Never return it: for processes that run one training loop (`train`, `client`,
    /// `attack`, `bench`). They reuse the same activation buffers every step, and mimalloc
    /// purges everything free whenever its delay (default 1 s) expires, so the kernel zeroed a
    /// step's buffers again every few steps (`clear_page` 8.5% of a flex train step): steps are
    /// 5-18% faster for 15-20% more peak RSS (docs/results, "Benchmarks"). Processes that host
    /// many clients (`simulate`, `sweep`) keep mimalloc's default: never purging made a 20-round
    /// `simulate` 9% faster but raised its peak RSS from 1.79 to 2.44 GB.
    KeepForReuse,
}

/// Sets the process's [`FreedMemory`] policy (mimalloc's purge delay: 0 or never; THP off for
/// prompt release), unless the user chose with `MIMALLOC_PURGE_DELAY` / `MIMALLOC_ALLOW_THP`.
fn set_freed_memory(policy: FreedMemory) {
    if policy == FreedMemory::ReleasePromptly && std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // mimalloc reads the option when it maps memory; the prctl covers what it mapped
        // before main (its own start-up does the same when the variable is set).
        // SAFETY: sets a numeric mimalloc option.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        #[cfg(target_os = "linux")]
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let delay = match policy {
        FreedMemory::ReleasePromptly => 0,
        FreedMemory::KeepForReuse => -1,
    };
    // SAFETY: sets a numeric mimalloc option; mimalloc reads it on each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) };
}

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
    Report(sweep::ReportArgs),
    /// Benchmarks (train-step speed against a PyTorch reference measured in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// A deployment's credentials and certificates (per-client credentials, TLS, tokens).
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
}

fn main() {
    common::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Coordinator(_) => set_freed_memory(FreedMemory::ReleasePromptly),
        Command::Train(_) | Command::Client(_) | Command::Attack(_) | Command::Bench(_) => {
            set_freed_memory(FreedMemory::KeepForReuse)
        }
        _ => {}
    }
    let result: Result<()> = match cli.command {
        Command::Simulate(args) => federate::simulate(args),
        Command::Coordinator(args) => federate::coordinator(args),
        Command::Client(args) => federate::client(args),
        Command::Status(args) => federate::status(args),
        Command::Adversary(args) => adversary::run(args),
        Command::Attack(args) => attack::run(args),
        Command::Train(args) => train::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Report(args) => sweep::report(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Secrets(cmd) => secrets::run(cmd),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    /// mimalloc's default for option `index`, unless the environment overrides it.
    fn default_of(index: libmimalloc_sys::mi_option_t, env: &str) -> Option<std::ffi::c_long> {
        // SAFETY: reads a mimalloc option.
        (std::env::var_os(env).is_none()).then(|| unsafe { libmimalloc_sys::mi_option_get(index) })
    }

    #[test]
    fn the_mimalloc_option_indices_are_right() {
        // v3's options.c: purge delay 1000 ms by default (its header still says 10).
        if let Some(d) = default_of(super::MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY") {
            assert_eq!(d, 1000, "option 15 is not mimalloc's purge delay");
        }
        // allow_thp defaults to 1 and its neighbour, the minimal purge size, to 0: a wrong index
        // would likely land on an option whose defaults are not these.
        if let Some(d) = default_of(super::MI_OPTION_ALLOW_THP, "MIMALLOC_ALLOW_THP") {
            assert_eq!(d, 1, "option 43 is not mimalloc's allow_thp");
            let next = default_of(
                super::MI_OPTION_ALLOW_THP + 1,
                "MIMALLOC_MINIMAL_PURGE_SIZE",
            );
            assert!(
                next.is_none_or(|n| n == 0),
                "option 44 is not the minimal purge size"
            );
        }
    }
}
