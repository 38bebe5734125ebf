//! Model architecture and MJP configuration: the presets, the position-embedding modes the paper
//! compares, and the jigsaw and DAL knobs with the reference implementation's defaults.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{MjpError, Result};

/// How positions are encoded; the four settings the MJP paper compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PeMode {
    /// Standard learned absolute position embedding (leaks under gradient inversion).
    Learned,
    /// No position embedding at all.
    None,
    /// Every patch shuffled, position embedding kept, no unk embedding.
    NaiveShuffle,
    /// Masked Jigsaw Puzzle: a block-wise subset shuffled, their positions get the shared unk PE,
    /// and a DAL regressor keeps the visible PEs spatially meaningful.
    #[default]
    Mjp,
}

impl PeMode {
    /// All modes, in the order reports list them.
    pub const ALL: [PeMode; 4] = [Self::Learned, Self::None, Self::NaiveShuffle, Self::Mjp];

    /// Whether the model carries a position-embedding table.
    pub fn has_pe(self) -> bool {
        !matches!(self, Self::None)
    }

    /// Whether the PE table has the extra shared `unk` row.
    pub fn has_unk(self) -> bool {
        matches!(self, Self::Mjp)
    }
}

impl fmt::Display for PeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Learned => "learned",
            Self::None => "none",
            Self::NaiveShuffle => "naive-shuffle",
            Self::Mjp => "mjp",
        })
    }
}

impl FromStr for PeMode {
    type Err = MjpError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "learned" => Ok(Self::Learned),
            "none" => Ok(Self::None),
            "naive-shuffle" | "naive" => Ok(Self::NaiveShuffle),
            "mjp" => Ok(Self::Mjp),
            _ => Err(MjpError::Config(format!(
                "unknown position-embedding mode `{s}` (learned, none, naive-shuffle, mjp)"
            ))),
        }
    }
}

/// The dense absolute localization regressor's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DalKind {
    /// No DAL head.
    Off,
    /// One linear layer from a PE vector to (row, col).
    Linear,
    /// Linear-ReLU-Linear, the reference training script's default.
    #[default]
    Nonlinear,
}

impl FromStr for DalKind {
    type Err = MjpError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "linear" => Ok(Self::Linear),
            "nonlinear" => Ok(Self::Nonlinear),
            _ => Err(MjpError::Config(format!(
                "unknown DAL kind `{s}` (off, linear, nonlinear)"
            ))),
        }
    }
}

/// A Vision Transformer's architecture (the parts that decide parameter shapes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Side of the square input image in pixels.
    pub image_size: usize,
    /// Input channels (1 grey, 3 RGB).
    pub channels: usize,
    /// Side of a square patch in pixels.
    pub patch_size: usize,
    /// Token width.
    pub dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// MLP hidden width as a multiple of `dim`.
    pub mlp_ratio: f64,
    /// Output classes.
    pub num_classes: usize,
    /// Position-embedding mode.
    pub pe: PeMode,
    /// DAL head (used only with `pe = mjp`).
    pub dal: DalKind,
    /// Per-channel mean subtracted inside the model (inputs are pixels in [0, 1]).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation the model divides by.
    pub std: Vec<f32>,
}

impl VitConfig {
    /// The built-in presets, by name.
    pub const PRESETS: [&'static str; 3] = ["vit-micro-28", "vit-tiny-32", "deit-s-224"];

    /// A named preset: `vit-micro-28`, `vit-tiny-32` or `deit-s-224`.
    pub fn preset(name: &str) -> Result<Self> {
        let (image_size, channels, patch_size, dim, depth, heads, classes) = match name {
            "vit-micro-28" => (28, 1, 4, 64, 4, 4, 10),
            "vit-tiny-32" => (32, 3, 4, 192, 12, 3, 10),
            "deit-s-224" => (224, 3, 16, 384, 12, 6, 1000),
            _ => {
                return Err(MjpError::Config(format!(
                    "unknown model preset `{name}` (one of {})",
                    Self::PRESETS.join(", ")
                )));
            }
        };
        let (mean, std) = if channels == 1 {
            (vec![0.2860], vec![0.3530])
        } else {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        };
        Ok(Self {
            image_size,
            channels,
            patch_size,
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            num_classes: classes,
            pe: PeMode::Mjp,
            dal: DalKind::Nonlinear,
            mean,
            std,
        })
    }

    /// The same architecture with another position-embedding mode.
    pub fn with_pe(mut self, pe: PeMode) -> Self {
        self.pe = pe;
        self
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of patches N.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Values in one flattened patch (C * p * p).
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }

    /// Rows of the PE table: cls + N patches (+ unk for MJP).
    pub fn pe_rows(&self) -> usize {
        1 + self.num_patches() + usize::from(self.pe.has_unk())
    }

    /// Index of the shared unk row in the PE table (MJP only).
    pub fn unk_row(&self) -> usize {
        1 + self.num_patches()
    }

    /// Whether a DAL head is part of the model.
    pub fn has_dal(&self) -> bool {
        self.pe == PeMode::Mjp && self.dal != DalKind::Off
    }

    /// Hidden width of the MLP blocks.
    pub fn mlp_hidden(&self) -> usize {
        (self.dim as f64 * self.mlp_ratio).round() as usize
    }

    /// Checks the architecture is buildable.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MjpError::Config(m));
        if self.patch_size == 0
            || self.image_size == 0
            || !self.image_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "image size {} must be a positive multiple of patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return bad(format!(
                "dim {} must be divisible by heads {}",
                self.dim, self.heads
            ));
        }
        if self.channels == 0 || self.mean.len() != self.channels || self.std.len() != self.channels
        {
            return bad(format!(
                "mean/std need one value per channel ({} channels)",
                self.channels
            ));
        }
        if self.std.iter().any(|s| *s <= 0.0) {
            return bad("std values must be positive".into());
        }
        if self.depth == 0 || self.num_classes < 2 || self.mlp_ratio <= 0.0 {
            return bad("depth >= 1, classes >= 2 and mlp_ratio > 0 are required".into());
        }
        Ok(())
    }
}

/// How a batch's jigsaw is drawn: the MJP knobs that change per step or per round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JigsawConfig {
    /// Fraction of patches selected for shuffling (MJP; reference default 0.1).
    pub ratio: f64,
    /// Probability that a training step uses the jigsaw (reference 0.5 centralised; FL clients
    /// use 1.0 so that every gradient leaving a client is protected).
    pub probability: f64,
    /// One mask and permutation per sample instead of one per batch (reference: per batch).
    pub per_sample: bool,
    /// Minimum block area of the mask generator; `None` scales the reference's 8 (on 14x14) to
    /// the grid.
    pub min_block: Option<usize>,
}

impl Default for JigsawConfig {
    fn default() -> Self {
        Self {
            ratio: 0.1,
            probability: 0.5,
            per_sample: false,
            min_block: None,
        }
    }
}

impl JigsawConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(MjpError::Config(format!(
                "shuffle ratio {} is outside [0, 1]",
                self.ratio
            )));
        }
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(MjpError::Config(format!(
                "jigsaw probability {} is outside [0, 1]",
                self.probability
            )));
        }
        Ok(())
    }
}

/// How the DAL weight lambda evolves over training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LambdaSchedule {
    /// A fixed weight.
    Constant {
        /// The weight.
        value: f64,
    },
    /// The reference schedule: linear warm-up from 0 to `peak`, then cosine down to `end`.
    WarmupCosine {
        /// Weight reached at the end of warm-up.
        peak: f64,
        /// Weight at the end of training.
        end: f64,
        /// Fraction of training spent warming up.
        warmup_fraction: f64,
    },
}

impl Default for LambdaSchedule {
    fn default() -> Self {
        Self::Constant { value: 0.01 }
    }
}

impl LambdaSchedule {
    /// The reference warm-up/cosine schedule (0 -> 0.01, then cosine to 0.005).
    pub fn reference() -> Self {
        Self::WarmupCosine {
            peak: 0.01,
            end: 0.005,
            warmup_fraction: 0.05,
        }
    }

    /// Lambda at training progress `t` in [0, 1].
    pub fn at(&self, t: f64) -> f64 {
        match *self {
            Self::Constant { value } => value,
            Self::WarmupCosine {
                peak,
                end,
                warmup_fraction,
            } => {
                let t = t.clamp(0.0, 1.0);
                if t < warmup_fraction {
                    peak * t / warmup_fraction
                } else {
                    let u = (t - warmup_fraction) / (1.0 - warmup_fraction).max(1e-12);
                    end + 0.5 * (peak - end) * (1.0 + (std::f64::consts::PI * u).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in VitConfig::PRESETS {
            let c = VitConfig::preset(name).unwrap();
            c.validate().unwrap();
        }
        let micro = VitConfig::preset("vit-micro-28").unwrap();
        assert_eq!(micro.num_patches(), 49);
        assert_eq!(micro.pe_rows(), 51);
        assert_eq!(VitConfig::preset("deit-s-224").unwrap().num_patches(), 196);
        assert!(VitConfig::preset("vit-huge").is_err());
    }

    #[test]
    fn lambda_schedule_shape() {
        let s = LambdaSchedule::reference();
        assert_eq!(s.at(0.0), 0.0);
        assert!((s.at(0.05) - 0.01).abs() < 1e-12);
        assert!((s.at(1.0) - 0.005).abs() < 1e-12);
        assert!(s.at(0.5) < 0.01 && s.at(0.5) > 0.005);
    }
}
