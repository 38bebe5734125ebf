//! Model checkpoints: safetensors files whose metadata carries the architecture, so a checkpoint
//! alone rebuilds its model; and import of timm-style ViT weights where shapes match.
//!
//! timm name mapping (PyTorch `VisionTransformer.state_dict()` -> ours):
//! - `patch_embed.proj.weight` `[D, C, p, p]` -> `[C*p*p, D]` (flatten, transpose)
//! - `cls_token` `[1, 1, D]` -> `[1, D]`; `pos_embed` `[1, 1+N, D]` -> rows 0..=N of our table
//!   (the MJP unk row keeps its initial value)
//! - every other 2-D `*.weight` (qkv, proj, fc1, fc2, head) `[out, in]` -> `[in, out]`
//! - biases and LayerNorm `weight`/`bias` unchanged; names are otherwise identical.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;

use crate::config::VitConfig;
use crate::error::{MjpError, Result};
use crate::model::Vit;
use crate::params::{NamedTensor, NamedTensors};

/// Metadata key holding the architecture as JSON.
pub const CONFIG_KEY: &str = "mjpfl.vit_config";
/// Metadata key holding parameter ids by name (lets optimiser state resume).
pub const PARAM_IDS_KEY: &str = "mjpfl.param_ids";

/// Saves `model` with its architecture and any extra metadata.
pub fn save(model: &Vit, path: &Path, extra: HashMap<String, String>) -> Result<()> {
    save_params(
        &NamedTensors::from_module(model),
        model.config(),
        Some(&NamedTensors::param_ids(model)),
        path,
        extra,
    )
}

/// Saves a parameter set with its architecture.
pub fn save_params(
    params: &NamedTensors,
    config: &VitConfig,
    ids: Option<&HashMap<String, u64>>,
    path: &Path,
    mut extra: HashMap<String, String>,
) -> Result<()> {
    extra.insert(
        CONFIG_KEY.into(),
        serde_json::to_string(config).expect("config serialises"),
    );
    if let Some(ids) = ids {
        extra.insert(
            PARAM_IDS_KEY.into(),
            serde_json::to_string(ids).expect("ids serialise"),
        );
    }
    params.save(path, extra)
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// The architecture.
    pub config: VitConfig,
    /// The values.
    pub params: NamedTensors,
    /// Parameter ids by name, when recorded.
    pub param_ids: Option<HashMap<String, u64>>,
    /// All metadata.
    pub metadata: HashMap<String, String>,
}

impl Checkpoint {
    /// Reads a checkpoint written by [`save`].
    pub fn read(path: &Path) -> Result<Self> {
        let (params, metadata) = NamedTensors::load(path)?;
        let bad = |reason: String| MjpError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let config: VitConfig = metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata: not an mjpfl checkpoint (for timm weights use --init-timm)")))
            .and_then(|s| serde_json::from_str(s).map_err(|e| bad(format!("bad architecture metadata: {e}"))))?;
        let param_ids = metadata
            .get(PARAM_IDS_KEY)
            .and_then(|s| serde_json::from_str(s).ok());
        Ok(Self {
            config,
            params,
            param_ids,
            metadata,
        })
    }

    /// Builds the model on `device`.
    pub fn into_model(self, device: &Device) -> Result<Vit> {
        let model = Vit::skeleton(&self.config, device);
        self.params.load_into(model, self.param_ids.as_ref())
    }
}

/// Builds a model of `config` holding `params`.
pub fn model_from_params(
    config: &VitConfig,
    params: &NamedTensors,
    device: &Device,
) -> Result<Vit> {
    params.load_into(Vit::skeleton(config, device), None)
}

/// Result of a timm import: which of our tensors were loaded and which were left as initialised.
#[derive(Debug, Default)]
pub struct TimmImport {
    /// Names loaded from the file.
    pub loaded: Vec<String>,
    /// Our tensors with no matching timm tensor (or a shape mismatch), with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Loads timm ViT weights from a safetensors file into `model` where names and shapes match.
pub fn load_timm(model: Vit, path: &Path) -> Result<(Vit, TimmImport)> {
    let (timm, _) = NamedTensors::load(path)?;
    let config = model.config().clone();
    let mut ours = NamedTensors::from_module(&model);
    let by_name: HashMap<&str, &NamedTensor> = timm
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut report = TimmImport::default();
    for t in ours.tensors_mut() {
        match convert_timm(&config, &t.name, &t.shape, &by_name) {
            Ok(values) => {
                t.data = values;
                report.loaded.push(t.name.clone());
            }
            Err(reason) => report.skipped.push((t.name.clone(), reason)),
        }
    }
    let ids = NamedTensors::param_ids(&model);
    let model = ours.load_into(model, Some(&ids))?;
    Ok((model, report))
}

fn convert_timm(
    config: &VitConfig,
    name: &str,
    shape: &[usize],
    timm: &HashMap<&str, &NamedTensor>,
) -> std::result::Result<Vec<f32>, String> {
    let src = timm.get(name).ok_or_else(|| "not in file".to_string())?;
    let mismatch = || format!("file shape {:?} does not fit {:?}", src.shape, shape);
    match name {
        "patch_embed.proj.weight" => {
            let [d, c, p, q] = src.shape[..] else {
                return Err(mismatch());
            };
            if shape != [c * p * q, d] {
                return Err(mismatch());
            }
            Ok(transpose(&src.data, d, c * p * q))
        }
        "cls_token" => {
            if src.shape.iter().product::<usize>() != shape.iter().product::<usize>() {
                return Err(mismatch());
            }
            Ok(src.data.clone())
        }
        "pos_embed" => {
            let rows = 1 + config.num_patches();
            if src.shape.iter().product::<usize>() != rows * config.dim {
                return Err(mismatch());
            }
            // Keep our extra unk row (if any) as zeros: it has no timm counterpart.
            let mut values = src.data.clone();
            values.resize(shape.iter().product(), 0.0);
            Ok(values)
        }
        _ if shape.len() == 2 && name.ends_with(".weight") => {
            if src.shape != [shape[1], shape[0]] {
                return Err(mismatch());
            }
            Ok(transpose(&src.data, shape[1], shape[0]))
        }
        _ => {
            if src.shape != shape {
                return Err(mismatch());
            }
            Ok(src.data.clone())
        }
    }
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
