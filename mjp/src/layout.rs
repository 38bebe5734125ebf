//! The one owner of every path and file name in the directories a run leaves behind: a
//! federation's run directory, a sweep directory, and a centralised training run. Every crate
//! (coordinator, clients, adversary, reports, sweeps) asks these types instead of joining names
//! itself, so a layout change is made here once and every reader and writer moves with it.
//!
//! ```text
//! <run>/config.toml                                resolved coordinator configuration
//! <run>/rounds.jsonl                               one round record per committed round
//! <run>/state.json                                 the commit point (last committed round)
//! <run>/checkpoints/round-NNNN.safetensors         global model version N
//! <run>/checkpoints/server-opt-round-NNNN.safetensors   server optimiser moments after version N
//! <run>/audit/round-NNNN/<client>.json             ground truth (simulated clients, opt-in)
//! <run>/attacks/round-NNNN/<client>.json|.png      the adversary's record and picture
//! <run>/attacks/round-NNNN/<client>.update.safetensors   a saved intercepted update
//! <run>/attacks/rounds.jsonl                       per-round attack summaries
//! <run>/report.md
//!
//! <sweep>/sweep.toml  cells/<id>/ (a run directory each, plus DONE)  summary.csv|json  plots/  report.md
//!
//! <train>/config.json  epochs.jsonl  state.json  summary.json  checkpoints/epoch-NNNN.{safetensors,optim}
//! ```

use std::path::{Path, PathBuf};

/// `round-NNNN`: the name of everything that belongs to one round (or model version).
fn round_name(round: u64) -> String {
    format!("round-{round:04}")
}

/// A federation's run directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunLayout {
    root: PathBuf,
}

impl RunLayout {
    /// The layout of the run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The resolved configuration (TOML).
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// One round record per line.
    pub fn rounds(&self) -> PathBuf {
        self.root.join("rounds.jsonl")
    }

    /// The commit point.
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The report.
    pub fn report(&self) -> PathBuf {
        self.root.join("report.md")
    }

    /// Where checkpoints live.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Global model version `version`.
    pub fn checkpoint(&self, version: u64) -> PathBuf {
        self.checkpoints()
            .join(format!("{}.safetensors", round_name(version)))
    }

    /// The server optimiser's moments after model version `version` (committed with it, so a
    /// crash between the two files can never pair a model with another step's moments).
    pub fn server_optimiser(&self, version: u64) -> PathBuf {
        self.checkpoints()
            .join(format!("server-opt-{}.safetensors", round_name(version)))
    }

    /// Where runs of earlier versions kept the moments of the last round only.
    pub fn legacy_server_optimiser(&self) -> PathBuf {
        self.checkpoints().join("server-opt.safetensors")
    }

    /// The ground truth simulated clients write when auditing is on.
    pub fn audit(&self) -> AuditLayout {
        AuditLayout::new(self.root.join("audit"))
    }

    /// What the adversary writes.
    pub fn attacks(&self) -> AttacksLayout {
        AttacksLayout::new(self.root.join("attacks"))
    }

    /// Whether `dir` holds (the start of) a run.
    pub fn is_run(&self) -> bool {
        self.rounds().exists() || self.state().exists()
    }
}

/// The audit directory: ground truth of each update, read only by the scorer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditLayout {
    dir: PathBuf,
}

impl AuditLayout {
    /// The audit directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ground truth of `client`'s update in `round`.
    pub fn record(&self, round: u32, client: &str) -> PathBuf {
        self.dir
            .join(round_name(u64::from(round)))
            .join(format!("{client}.json"))
    }
}

/// The adversary's output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttacksLayout {
    dir: PathBuf,
}

impl AttacksLayout {
    /// The attacks directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Per-round attack summaries, one per line.
    pub fn round_summaries(&self) -> PathBuf {
        self.dir.join("rounds.jsonl")
    }

    /// The records of one round.
    pub fn round_dir(&self, round: u32) -> PathBuf {
        self.dir.join(round_name(u64::from(round)))
    }

    /// The JSON record of an attacked update.
    pub fn record(&self, round: u32, client: &str) -> PathBuf {
        self.round_dir(round).join(format!("{client}.json"))
    }

    /// The picture grid of an attacked update.
    pub fn picture(&self, round: u32, client: &str) -> PathBuf {
        self.round_dir(round).join(format!("{client}.png"))
    }

    /// [`Self::picture`] relative to the run directory (for links in report.md).
    pub fn picture_link(round: u32, client: &str) -> String {
        format!("attacks/{}/{client}.png", round_name(u64::from(round)))
    }

    /// A saved intercepted update.
    pub fn saved_update(&self, round: u32, client: &str) -> PathBuf {
        self.round_dir(round)
            .join(format!("{client}{SAVED_UPDATE_SUFFIX}"))
    }

    /// Every attacked-update record, in round then client order.
    pub fn records(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let rounds = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut round_dirs: Vec<PathBuf> = rounds
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        round_dirs.sort();
        for rd in round_dirs {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&rd)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            out.extend(files);
        }
        Ok(out)
    }
}

/// File-name suffix of a saved update (`<client>.update.safetensors`).
pub const SAVED_UPDATE_SUFFIX: &str = ".update.safetensors";

/// The client a saved update's file name names.
pub fn saved_update_client(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(SAVED_UPDATE_SUFFIX).map(str::to_string)
}

/// A sweep directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepLayout {
    root: PathBuf,
}

impl SweepLayout {
    /// The layout of the sweep directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The copy of the sweep file.
    pub fn sweep_file(&self) -> PathBuf {
        self.root.join("sweep.toml")
    }

    /// Where the cells' run directories live.
    pub fn cells(&self) -> PathBuf {
        self.root.join("cells")
    }

    /// The run directory of cell `id`.
    pub fn cell(&self, id: &str) -> RunLayout {
        RunLayout::new(self.cells().join(id))
    }

    /// The marker a finished cell leaves (with what it ran).
    pub fn done_marker(&self, id: &str) -> PathBuf {
        self.cells().join(id).join("DONE")
    }

    /// Per-round rows of every cell.
    pub fn summary_csv(&self) -> PathBuf {
        self.root.join("summary.csv")
    }

    /// The same rows as JSON.
    pub fn summary_json(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    /// Plots.
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }

    /// The report.
    pub fn report(&self) -> PathBuf {
        self.root.join("report.md")
    }

    /// Whether `root` looks like a sweep directory.
    pub fn is_sweep(&self) -> bool {
        self.cells().is_dir()
    }
}

/// A centralised training run (`mjpfl train`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainLayout {
    root: PathBuf,
}

impl TrainLayout {
    /// The layout of the training run at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The run's configuration.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// One record per epoch.
    pub fn epochs(&self) -> PathBuf {
        self.root.join("epochs.jsonl")
    }

    /// What resume reads (written last after each epoch).
    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The final summary.
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    /// Where checkpoints live.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The model after `epoch`.
    pub fn model(&self, epoch: usize) -> PathBuf {
        self.checkpoints()
            .join(format!("epoch-{epoch:04}.safetensors"))
    }

    /// The optimiser state after `epoch`.
    pub fn optimiser(&self, epoch: usize) -> PathBuf {
        self.checkpoints().join(format!("epoch-{epoch:04}.optim"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones() {
        let run = RunLayout::new("r");
        assert_eq!(
            run.checkpoint(7),
            Path::new("r/checkpoints/round-0007.safetensors")
        );
        assert_eq!(
            run.audit().record(3, "c"),
            Path::new("r/audit/round-0003/c.json")
        );
        let a = run.attacks();
        assert_eq!(a.picture(12, "c"), Path::new("r/attacks/round-0012/c.png"));
        assert_eq!(
            Path::new("r").join(AttacksLayout::picture_link(12, "c")),
            a.picture(12, "c")
        );
        let saved = a.saved_update(1, "sim-03");
        assert_eq!(saved_update_client(&saved).as_deref(), Some("sim-03"));
        assert_eq!(
            SweepLayout::new("s").done_marker("x"),
            Path::new("s/cells/x/DONE")
        );
    }
}
