//! The one tensor (de)serialisation path: a model's parameters (or their gradients, or an update)
//! as an ordered list of named f32 tensors. Checkpoints, the wire format, aggregation and the
//! attacks all go through [`NamedTensors`].
//!
//! Names are the module paths (`blocks.0.attn.qkv.weight`), which are timm's ViT names. Linear
//! weights are stored `[in, out]` (burn's layout); `timm` documents the mapping from PyTorch.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{MjpError, Result};

/// One named, shaped f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Module path, e.g. `blocks.0.mlp.fc1.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl NamedTensor {
    /// Number of values the shape implies.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor's name and a borrowed safetensors view of its bytes.
type NamedView<'a> = (&'a str, TensorView<'a>);

/// What [`NamedTensors::value_stats`] measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValueStats {
    /// Sum of the squares of every value (f64).
    pub sum_sq: f64,
    /// The largest magnitude (NaN when a value is NaN).
    pub max_abs: f64,
    /// Every value is finite.
    pub finite: bool,
}

/// A model-shaped set of named tensors, in the model's visiting order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamedTensors {
    tensors: Vec<NamedTensor>,
}

/// Metadata key recording the tensors' order.
const ORDER_KEY: &str = "mjpfl.tensor_order";

/// A tensor name and shape, without values: what peers agree on before exchanging data.
pub type Manifest = Vec<(String, Vec<usize>)>;

impl NamedTensors {
    /// Wraps tensors as given (order is kept).
    pub fn new(tensors: Vec<NamedTensor>) -> Self {
        Self { tensors }
    }

    /// The parameters of `module`, by path.
    pub fn from_module<M: Module>(module: &M) -> Self {
        let mut collector = Collector::default();
        module.visit(&mut collector);
        Self {
            tensors: collector
                .params
                .into_iter()
                .map(|(name, _, shape, data)| NamedTensor { name, shape, data })
                .collect(),
        }
    }

    /// The gradients of `module`'s parameters; parameters without a gradient get zeros.
    pub fn gradients_of<M: Module>(module: &M, grads: &GradientsParams) -> Self {
        let mut collector = GradCollector {
            path: Vec::new(),
            grads,
            out: Vec::new(),
        };
        module.visit(&mut collector);
        Self {
            tensors: collector.out,
        }
    }

    /// Parameter ids of `module` by path (persisted in checkpoints so optimizer state resumes).
    pub fn param_ids<M: Module>(module: &M) -> HashMap<String, u64> {
        let mut collector = Collector::default();
        module.visit(&mut collector);
        collector
            .params
            .into_iter()
            .map(|(name, id, _, _)| (name, id.val()))
            .collect()
    }

    /// Loads these values into `module`, checking that every parameter is present with the right
    /// shape and finite values. `ids` optionally restores parameter ids by path.
    pub fn load_into<M: Module>(&self, module: M, ids: Option<&HashMap<String, u64>>) -> Result<M> {
        self.check_finite()?;
        let expected = NamedTensors::manifest_of(&module);
        self.check_manifest(&expected)?;
        let by_name: HashMap<&str, &NamedTensor> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut loader = Loader {
            path: Vec::new(),
            by_name,
            ids,
        };
        Ok(module.map(&mut loader))
    }

    /// The names and shapes of `module`'s parameters.
    pub fn manifest_of<M: Module>(module: &M) -> Manifest {
        let mut collector = ShapeCollector::default();
        module.visit(&mut collector);
        collector.out
    }

    /// Names and shapes of these tensors.
    pub fn manifest(&self) -> Manifest {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }

    /// Checks names and shapes against `expected` (same set, same shapes; order may differ).
    pub fn check_manifest(&self, expected: &Manifest) -> Result<()> {
        let mine: HashMap<&str, &NamedTensor> =
            self.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for (name, shape) in expected {
            match mine.get(name.as_str()) {
                None => {
                    return Err(MjpError::Tensor {
                        name: name.clone(),
                        reason: "missing".into(),
                    });
                }
                Some(t) if &t.shape != shape => {
                    return Err(MjpError::Tensor {
                        name: name.clone(),
                        reason: format!("shape {:?}, expected {:?}", t.shape, shape),
                    });
                }
                Some(t) if t.data.len() != t.numel() => {
                    return Err(MjpError::Tensor {
                        name: name.clone(),
                        reason: format!("{} values for shape {:?}", t.data.len(), t.shape),
                    });
                }
                _ => {}
            }
        }
        if self.tensors.len() != expected.len() {
            let known: std::collections::HashSet<&str> =
                expected.iter().map(|(n, _)| n.as_str()).collect();
            let extra = self
                .tensors
                .iter()
                .find(|t| !known.contains(t.name.as_str()))
                .map(|t| t.name.clone())
                .unwrap_or_else(|| "<duplicate>".into());
            return Err(MjpError::Tensor {
                name: extra,
                reason: "not a parameter of this model".into(),
            });
        }
        Ok(())
    }

    /// The sum of squares and the largest magnitude of every value, in one vectorised pass (8
    /// lanes, the same result on every run). A NaN or infinity makes the sum non-finite.
    pub fn value_stats(&self) -> ValueStats {
        // Magnitudes compared as bits (|v| as u32 orders like |v|, and NaN/inf are the largest):
        // integer max vectorises where float max with NaN semantics does not. AVX2 where the
        // CPU has it (the same lanes, so the same sums).
        let (mut sq, mut max) = ([0f64; 8], [0u32; 8]);
        for t in &self.tensors {
            mjpfl_kernels::cpu::squares_and_max_bits(&t.data, &mut sq, &mut max);
        }
        let max = max.into_iter().max().unwrap_or(0);
        ValueStats {
            sum_sq: sq.iter().sum(),
            max_abs: f64::from(f32::from_bits(max)),
            finite: max < f32::INFINITY.to_bits(),
        }
    }

    /// Errors on the first NaN or infinity.
    pub fn check_finite(&self) -> Result<()> {
        // One vectorised pass in the common case; the slow scan only finds what to report.
        if self.value_stats().finite {
            return Ok(());
        }
        for t in &self.tensors {
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(MjpError::Tensor {
                    name: t.name.clone(),
                    reason: format!("non-finite value {} at index {i}", t.data[i]),
                });
            }
        }
        Ok(())
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    /// Mutable access to the tensors.
    pub fn tensors_mut(&mut self) -> &mut [NamedTensor] {
        &mut self.tensors
    }

    /// Consumes into the tensors.
    pub fn into_tensors(self) -> Vec<NamedTensor> {
        self.tensors
    }

    /// Consumes into the tensors' value buffers, in order (for a decoder to reuse).
    pub fn into_buffers(self) -> Vec<Vec<f32>> {
        self.tensors.into_iter().map(|t| t.data).collect()
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// `self - other`, tensor by tensor (same manifest required).
    pub fn sub(&self, other: &NamedTensors) -> Result<NamedTensors> {
        self.zip_with(other, |a, b| a - b)
    }

    /// `self + other`, tensor by tensor.
    pub fn add(&self, other: &NamedTensors) -> Result<NamedTensors> {
        self.zip_with(other, |a, b| a + b)
    }

    /// Multiplies every value by `k`.
    pub fn scale(&mut self, k: f32) {
        for t in &mut self.tensors {
            t.data.iter_mut().for_each(|v| *v *= k);
        }
    }

    /// L2 norm over all values.
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|t| &t.data)
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt()
    }

    fn zip_with(&self, other: &NamedTensors, f: impl Fn(f32, f32) -> f32) -> Result<NamedTensors> {
        other.check_manifest(&self.manifest())?;
        let tensors = self
            .tensors
            .iter()
            .map(|a| {
                let b = other.get(&a.name).expect("manifest checked");
                NamedTensor {
                    name: a.name.clone(),
                    shape: a.shape.clone(),
                    data: a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect(),
                }
            })
            .collect();
        Ok(NamedTensors { tensors })
    }

    /// Serialises to safetensors bytes (f32, little-endian) with string metadata. safetensors
    /// stores tensors sorted by name; the model's order is kept in the `mjpfl.tensor_order`
    /// metadata so that loading gives back the same order.
    pub fn to_safetensors(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        let (views, metadata) = self.safetensors_views(metadata)?;
        let mut bytes = safetensors::serialize(views, Some(metadata)).map_err(safetensors_error)?;
        let n = header_len(&bytes).ok_or_else(|| header_error("shorter than its header"))?;
        canonical_header(&mut bytes[8..8 + n])?;
        Ok(bytes)
    }

    /// Views of the tensors' bytes (borrowed, no copy) and the metadata with the tensor order.
    fn safetensors_views(
        &self,
        mut metadata: HashMap<String, String>,
    ) -> Result<(Vec<NamedView<'_>>, HashMap<String, String>)> {
        let order: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        metadata.insert(
            ORDER_KEY.into(),
            serde_json::to_string(&order).expect("names serialise"),
        );
        // safetensors is little-endian; so is every target this crate builds for.
        const _: () = assert!(cfg!(target_endian = "little"));
        let views = self
            .tensors
            .iter()
            .map(|t| {
                TensorView::new(
                    Dtype::F32,
                    t.shape.clone(),
                    bytemuck::cast_slice::<f32, u8>(&t.data),
                )
                .map(|v| (t.name.as_str(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(safetensors_error)?;
        Ok((views, metadata))
    }

    /// Parses safetensors bytes (f32, f16 and bf16 are read as f32), in the order recorded by
    /// [`NamedTensors::to_safetensors`] (file order for other files).
    pub fn from_safetensors(
        bytes: &[u8],
    ) -> std::result::Result<(Self, HashMap<String, String>), String> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let mut metadata = header.metadata().clone().unwrap_or_default();
        let order: Option<Vec<String>> = metadata
            .remove(ORDER_KEY)
            .and_then(|o| serde_json::from_str(&o).ok());
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let mut tensors = Vec::new();
        for name in header.offset_keys() {
            let view = st.tensor(&name).map_err(|e| e.to_string())?;
            let data = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
            };
            tensors.push(NamedTensor {
                name,
                shape: view.shape().to_vec(),
                data,
            });
        }
        if let Some(order) = order {
            let rank: HashMap<&str, usize> = order
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i))
                .collect();
            tensors.sort_by_key(|t| rank.get(t.name.as_str()).copied().unwrap_or(usize::MAX));
        }
        Ok((Self { tensors }, metadata))
    }

    /// Writes a safetensors file atomically (temporary file, then rename).
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> Result<()> {
        // Streamed from the tensors to the file: saving costs no second copy of the model.
        let (views, metadata) = self.safetensors_views(metadata)?;
        let failed = |reason: String| MjpError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        crate::fsutil::replace_atomic(path, |tmp| {
            safetensors::serialize_to_file(views, Some(metadata), tmp)
                .map_err(|e| failed(format!("writing: {e}")))?;
            // The header is rewritten in place with its keys sorted (same length).
            use std::io::{Read, Seek, SeekFrom, Write};
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(tmp)
                .map_err(|e| MjpError::io(tmp, e))?;
            let mut head = [0u8; 8];
            file.read_exact(&mut head)
                .map_err(|e| MjpError::io(tmp, e))?;
            let n = header_len(&head).ok_or_else(|| failed("no header written".into()))?;
            let mut header = vec![0u8; n];
            file.read_exact(&mut header)
                .map_err(|e| MjpError::io(tmp, e))?;
            canonical_header(&mut header)?;
            file.seek(SeekFrom::Start(8))
                .and_then(|_| file.write_all(&header))
                .map_err(|e| MjpError::io(tmp, e))
        })
    }

    /// Reads a safetensors file.
    pub fn load(path: &Path) -> Result<(Self, HashMap<String, String>)> {
        let bytes = std::fs::read(path).map_err(|e| MjpError::io(path, e))?;
        Self::from_safetensors(&bytes).map_err(|reason| MjpError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        })
    }
}

/// The header length a safetensors buffer starts with (the header itself may be cut off).
fn header_len(bytes: &[u8]) -> Option<usize> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    usize::try_from(n).ok()
}

fn header_error(reason: &str) -> MjpError {
    MjpError::Tensor {
        name: "<safetensors header>".into(),
        reason: reason.into(),
    }
}

/// safetensors writes the metadata in the iteration order of a `HashMap`, which differs from
/// one map to the next, so the same tensors and metadata gave different bytes (checkpoints and
/// saved updates of one seed did not compare equal). This rewrites a header with the keys of
/// every object sorted: the same content, so the same length and data offsets.
fn canonical_header(header: &mut [u8]) -> Result<()> {
    let mut value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| header_error(&e.to_string()))?;
    value.sort_all_objects();
    let sorted = serde_json::to_vec(&value).map_err(|e| header_error(&e.to_string()))?;
    if sorted.len() > header.len() {
        return Err(header_error(
            "a sorted header came out longer than the original",
        ));
    }
    let (text, pad) = header.split_at_mut(sorted.len());
    text.copy_from_slice(&sorted);
    pad.fill(b' ');
    Ok(())
}

fn safetensors_error(e: safetensors::SafeTensorError) -> MjpError {
    MjpError::Tensor {
        name: "<safetensors>".into(),
        reason: e.to_string(),
    }
}

/// A float tensor's values as f32 on the host.
pub fn tensor_values<const D: usize>(tensor: &Tensor<D>) -> Vec<f32> {
    tensor
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("float tensor converts to f32")
}

#[derive(Default)]
struct Collector {
    path: Vec<String>,
    params: Vec<(String, ParamId, Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        self.params.push((
            self.path.join("."),
            param.id,
            value.dims().to_vec(),
            tensor_values(&value),
        ));
    }
}

#[derive(Default)]
struct ShapeCollector {
    path: Vec<String>,
    out: Manifest,
}

impl ModuleVisitor for ShapeCollector {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out
            .push((self.path.join("."), param.lazy_shape().to_vec()));
    }
}

struct GradCollector<'a> {
    path: Vec<String>,
    grads: &'a GradientsParams,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape().to_vec();
        let data = match self.grads.get::<D>(param.id) {
            Some(g) => tensor_values(&g),
            None => vec![0.0; shape.iter().product()],
        };
        self.out.push(NamedTensor {
            name: self.path.join("."),
            shape,
            data,
        });
    }
}

struct Loader<'a> {
    path: Vec<String>,
    by_name: HashMap<&'a str, &'a NamedTensor>,
    ids: Option<&'a HashMap<String, u64>>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let Some(t) = self.by_name.get(name.as_str()) else {
            return param;
        };
        let id = self
            .ids
            .and_then(|ids| ids.get(&name))
            .map(|&id| ParamId::from(id))
            .unwrap_or(param.id);
        let device = param.lazy_device();
        let tensor =
            Tensor::<D>::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &device);
        param.transform_for_load(tensor, id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{NamedTensor, NamedTensors};

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let tensors = NamedTensors {
            tensors: vec![
                NamedTensor {
                    name: "b.weight".into(),
                    shape: vec![2],
                    data: vec![1.0, -2.0],
                },
                NamedTensor {
                    name: "a.bias".into(),
                    shape: vec![1],
                    data: vec![0.5],
                },
            ],
        };
        // Two maps with the same entries, filled in opposite orders (each map has its own
        // random iteration order, so without sorting the bytes differ almost always).
        let keys: Vec<(String, String)> = (0..12)
            .map(|i| (format!("key.{i}"), format!("value {i}")))
            .collect();
        let one: HashMap<_, _> = keys.iter().cloned().collect();
        let other: HashMap<_, _> = keys.iter().rev().cloned().collect();
        let (a, b) = (
            tensors.to_safetensors(one.clone()).unwrap(),
            tensors.to_safetensors(other).unwrap(),
        );
        assert_eq!(a, b);
        // The file path writes the same bytes, and both read back as written.
        let dir = std::env::temp_dir().join(format!("mjp-st-{}", std::process::id()));
        let path = dir.join("t.safetensors");
        tensors.save(&path, one.clone()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), a);
        let (back, meta) = NamedTensors::from_safetensors(&a).unwrap();
        assert_eq!(back.tensors, tensors.tensors);
        assert_eq!(meta, one);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
