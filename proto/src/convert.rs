//! Conversions between wire types and domain types, in one place: tensors to and from chunk
//! streams (with CRC-32 and bounds checks), manifests, round configs and update headers (an
//! upload header becomes a domain [`UploadHeader`] plus its checked tensor layout).

use std::collections::BTreeMap;

use mjp::fl::{
    ModelUpdate, RoundConfig as DomainRoundConfig, UpdateKind as DomainKind, UploadHeader,
};
use mjp::params::{Manifest, NamedTensor, NamedTensors};
use mjp::train::OptimizerKind;
use tonic::{Code, Status};

use crate::v1;

/// What can be wrong with a tensor stream; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    /// A declared tensor does not match the model (name, shape, dtype, sizes).
    #[error("{0}")]
    Invalid(String),
    /// A chunk or the whole update is over a limit.
    #[error("{0}")]
    TooLarge(String),
    /// Bytes lost or damaged: checksum mismatch, gap, truncated stream.
    #[error("{0}")]
    DataLoss(String),
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        let code = match e {
            WireError::Invalid(_) => Code::InvalidArgument,
            WireError::TooLarge(_) => Code::ResourceExhausted,
            WireError::DataLoss(_) => Code::DataLoss,
        };
        Status::new(code, e.to_string())
    }
}

/// Bytes per element of a wire dtype.
pub fn dtype_size(dtype: v1::Dtype) -> usize {
    match dtype {
        v1::Dtype::F32 => 4,
        v1::Dtype::F16 | v1::Dtype::Bf16 => 2,
    }
}

/// Our manifest as wire specs (f32).
pub fn manifest_to_wire(manifest: &Manifest) -> v1::ModelManifest {
    v1::ModelManifest {
        tensors: manifest
            .iter()
            .map(|(name, shape)| v1::TensorSpec {
                name: name.clone(),
                shape: shape.iter().map(|&d| d as u64).collect(),
                dtype: v1::Dtype::F32 as i32,
            })
            .collect(),
    }
}

/// Checks declared specs against the model manifest: same names in the same order, same shapes,
/// a known dtype. Returns the dtypes.
pub fn check_specs(
    specs: &[v1::TensorSpec],
    manifest: &Manifest,
) -> Result<Vec<v1::Dtype>, WireError> {
    if specs.len() != manifest.len() {
        return Err(WireError::Invalid(format!(
            "update declares {} tensors, the model has {}",
            specs.len(),
            manifest.len()
        )));
    }
    specs
        .iter()
        .zip(manifest)
        .map(|(spec, (name, shape))| {
            if &spec.name != name {
                return Err(WireError::Invalid(format!(
                    "tensor {name}: update declares `{}` in its place",
                    spec.name
                )));
            }
            let declared: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
            if &declared != shape {
                return Err(WireError::Invalid(format!(
                    "tensor {name}: shape {declared:?}, expected {shape:?}"
                )));
            }
            v1::Dtype::try_from(spec.dtype).map_err(|_| {
                WireError::Invalid(format!("tensor {name}: unknown dtype {}", spec.dtype))
            })
        })
        .collect()
}

/// Cuts tensors into chunks of at most `max_chunk` bytes (f32 little-endian).
pub fn chunk_tensors(tensors: &NamedTensors, max_chunk: usize) -> Vec<v1::TensorChunk> {
    Chunks::new(tensors, |t| t, max_chunk).collect()
}

/// The chunks of a tensor set, cut as they are consumed: a stream of them holds one chunk at a
/// time instead of a second copy of the model. `owner` is whatever keeps the tensors alive (a
/// reference, an `Arc` of the model or of an update), `get` reaches the tensors inside it.
pub struct Chunks<T> {
    owner: T,
    get: fn(&T) -> &NamedTensors,
    per_chunk: usize,
    tensor: usize,
    element: usize,
}

impl<T> Chunks<T> {
    /// Chunks of at most `max_chunk` bytes of the tensors `get(&owner)`.
    pub fn new(owner: T, get: fn(&T) -> &NamedTensors, max_chunk: usize) -> Self {
        Self {
            owner,
            get,
            per_chunk: (max_chunk / 4).max(1),
            tensor: 0,
            element: 0,
        }
    }
}

impl<T> Iterator for Chunks<T> {
    type Item = v1::TensorChunk;

    fn next(&mut self) -> Option<v1::TensorChunk> {
        let tensors = (self.get)(&self.owner).tensors();
        // Empty tensors send no chunk.
        while self.tensor < tensors.len() && self.element >= tensors[self.tensor].data.len() {
            self.tensor += 1;
            self.element = 0;
        }
        let t = tensors.get(self.tensor)?;
        let end = (self.element + self.per_chunk).min(t.data.len());
        let values = &t.data[self.element..end];
        let data: prost::bytes::Bytes = if cfg!(target_endian = "little") {
            prost::bytes::Bytes::copy_from_slice(bytemuck::cast_slice::<f32, u8>(values))
        } else {
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        let chunk = v1::TensorChunk {
            tensor_index: self.tensor as u32,
            offset: (self.element * 4) as u64,
            crc32: crc32fast::hash(&data),
            data,
        };
        self.element = end;
        Some(chunk)
    }
}

/// Total bytes the declared tensors take on the wire.
pub fn expected_bytes(specs: &[v1::TensorSpec], dtypes: &[v1::Dtype]) -> usize {
    specs
        .iter()
        .zip(dtypes)
        .map(|(s, &d)| s.shape.iter().map(|&x| x as usize).product::<usize>() * dtype_size(d))
        .sum()
}

/// Reassembles a chunk stream into tensors, checking order, bounds and checksums as bytes arrive
/// (memory: one model's worth of f32).
pub struct Assembler {
    specs: Vec<(String, Vec<usize>, v1::Dtype)>,
    values: Vec<Vec<f32>>,
    /// Bytes received per tensor.
    received: Vec<usize>,
    max_chunk: usize,
    current: usize,
}

impl Assembler {
    /// An assembler for `specs` (already checked against the model).
    pub fn new(specs: &[v1::TensorSpec], dtypes: &[v1::Dtype], max_chunk: usize) -> Self {
        Self::with_buffers(specs, dtypes, max_chunk, Vec::new())
    }

    /// Like [`Assembler::new`], decoding into `buffers` (one per tensor, from an earlier
    /// update's [`NamedTensors::into_buffers`]) where there is one per tensor: their memory is
    /// already mapped, so a receiver that reuses them does not fault a model's worth of fresh
    /// pages in for every update. Anything else in `buffers` is dropped.
    pub fn with_buffers(
        specs: &[v1::TensorSpec],
        dtypes: &[v1::Dtype],
        max_chunk: usize,
        mut buffers: Vec<Vec<f32>>,
    ) -> Self {
        let specs: Vec<(String, Vec<usize>, v1::Dtype)> = specs
            .iter()
            .zip(dtypes)
            .map(|(s, &d)| {
                (
                    s.name.clone(),
                    s.shape.iter().map(|&x| x as usize).collect(),
                    d,
                )
            })
            .collect();
        if buffers.len() != specs.len() {
            buffers.clear();
        }
        buffers.resize_with(specs.len(), Vec::new);
        let values = specs
            .iter()
            .zip(buffers)
            .map(|((_, shape, _), mut b)| {
                b.clear();
                b.reserve_exact(shape.iter().product());
                b
            })
            .collect();
        Self {
            received: vec![0; specs.len()],
            specs,
            values,
            max_chunk,
            current: 0,
        }
    }

    /// Accepts the next chunk.
    pub fn push(&mut self, chunk: &v1::TensorChunk) -> Result<(), WireError> {
        if chunk.data.len() > self.max_chunk {
            return Err(WireError::TooLarge(format!(
                "chunk of {} bytes exceeds the {} byte limit",
                chunk.data.len(),
                self.max_chunk
            )));
        }
        let index = chunk.tensor_index as usize;
        let Some((name, shape, dtype)) = self.specs.get(index) else {
            return Err(WireError::Invalid(format!(
                "chunk for tensor index {index}, only {} declared",
                self.specs.len()
            )));
        };
        // Tensors arrive in order; an earlier one must be complete before the next starts.
        while self.current < index {
            if !self.complete(self.current) {
                return Err(WireError::DataLoss(format!(
                    "tensor {} incomplete ({} of {} bytes) when tensor {name} started",
                    self.specs[self.current].0,
                    self.received[self.current],
                    self.tensor_bytes(self.current)
                )));
            }
            self.current += 1;
        }
        if index < self.current {
            return Err(WireError::Invalid(format!(
                "chunk for tensor {name} arrived out of order"
            )));
        }
        if chunk.offset as usize != self.received[index] {
            return Err(WireError::DataLoss(format!(
                "tensor {name}: chunk at byte {} but {} bytes received so far (gap or reorder)",
                chunk.offset, self.received[index]
            )));
        }
        let total = shape.iter().product::<usize>() * dtype_size(*dtype);
        if self.received[index] + chunk.data.len() > total {
            return Err(WireError::Invalid(format!(
                "tensor {name}: {} bytes sent, shape {shape:?} holds {total}",
                self.received[index] + chunk.data.len()
            )));
        }
        if crc32fast::hash(&chunk.data) != chunk.crc32 {
            return Err(WireError::DataLoss(format!(
                "tensor {name}: checksum mismatch in chunk at byte {}",
                chunk.offset
            )));
        }
        let size = dtype_size(*dtype);
        if !chunk.data.len().is_multiple_of(size) {
            return Err(WireError::Invalid(format!(
                "tensor {name}: chunk is not a whole number of elements"
            )));
        }
        let out = &mut self.values[index];
        match dtype {
            v1::Dtype::F32 => {
                // Little-endian on the wire: a plain copy into the values on little-endian hosts.
                let start = out.len();
                let n = chunk.data.len() / 4;
                // The bytes go straight into the spare capacity (reserved for the whole tensor;
                // the bounds check above keeps `start + n` within it): one pass, no zeroing first.
                out.reserve(n);
                // SAFETY: `reserve` guarantees capacity for `n` more f32 values, the source holds
                // exactly `4 n` bytes, the regions cannot overlap (one is owned by `out`), and
                // every bit pattern is a valid f32, so the first `start + n` values are
                // initialised when the length is set.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        chunk.data.as_ptr(),
                        out.as_mut_ptr().add(start).cast::<u8>(),
                        4 * n,
                    );
                    out.set_len(start + n);
                }
                let dst = &mut out[start..];
                if cfg!(target_endian = "big") {
                    dst.iter_mut()
                        .for_each(|v| *v = f32::from_bits(v.to_bits().swap_bytes()));
                }
            }
            v1::Dtype::F16 => out.extend(
                chunk
                    .data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            v1::Dtype::Bf16 => out.extend(
                chunk
                    .data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        self.received[index] += chunk.data.len();
        Ok(())
    }

    fn tensor_bytes(&self, i: usize) -> usize {
        let (_, shape, d) = &self.specs[i];
        shape.iter().product::<usize>() * dtype_size(*d)
    }

    fn complete(&self, i: usize) -> bool {
        self.received[i] == self.tensor_bytes(i)
    }

    /// Ends the stream: every tensor must be complete.
    pub fn finish(self) -> Result<NamedTensors, WireError> {
        for i in 0..self.specs.len() {
            if !self.complete(i) {
                return Err(WireError::DataLoss(format!(
                    "stream ended with tensor {} incomplete ({} of {} bytes)",
                    self.specs[i].0,
                    self.received[i],
                    self.tensor_bytes(i)
                )));
            }
        }
        Ok(NamedTensors::new(
            self.specs
                .into_iter()
                .zip(self.values)
                .map(|((name, shape, _), data)| NamedTensor { name, shape, data })
                .collect(),
        ))
    }
}

/// Domain update kind to wire.
pub fn kind_to_wire(kind: DomainKind) -> v1::UpdateKind {
    match kind {
        DomainKind::FedSgd => v1::UpdateKind::FedsgdGradient,
        DomainKind::FedAvg => v1::UpdateKind::FedavgDelta,
    }
}

/// Wire update kind to domain (`None` when unspecified or unknown).
pub fn kind_from_wire(kind: i32) -> Option<DomainKind> {
    match v1::UpdateKind::try_from(kind).ok()? {
        v1::UpdateKind::FedsgdGradient => Some(DomainKind::FedSgd),
        v1::UpdateKind::FedavgDelta => Some(DomainKind::FedAvg),
        v1::UpdateKind::Unspecified => None,
    }
}

/// Domain round config to wire.
pub fn round_config_to_wire(c: &DomainRoundConfig) -> v1::RoundConfig {
    v1::RoundConfig {
        update_kind: kind_to_wire(c.update_kind) as i32,
        local_steps: c.local_steps,
        local_epochs: c.local_epochs,
        learning_rate: c.learning_rate,
        batch_size: c.batch_size,
        shuffle_ratio: c.shuffle_ratio,
        jigsaw_probability: c.jigsaw_probability,
        per_sample_jigsaw: c.per_sample_jigsaw,
        dal_lambda: c.dal_lambda,
        fedprox_mu: c.fedprox_mu,
        seed: c.seed,
        deadline_unix_ms: c.deadline_unix_ms,
        local_optimizer: match c.local_optimizer {
            OptimizerKind::Sgd { .. } => "sgd".into(),
            OptimizerKind::AdamW { .. } => "adamw".into(),
        },
        local_momentum: match c.local_optimizer {
            OptimizerKind::Sgd { momentum } => momentum,
            OptimizerKind::AdamW { .. } => 0.0,
        },
        local_weight_decay: match c.local_optimizer {
            OptimizerKind::AdamW { weight_decay } => weight_decay,
            OptimizerKind::Sgd { .. } => 0.0,
        },
        defense: c.defense.is_active().then_some(v1::Defense {
            prune_fraction: c.defense.prune_fraction,
            clip_norm: c.defense.clip_norm,
            noise_multiplier: c.defense.noise_multiplier,
        }),
    }
}

/// Wire round config to domain.
pub fn round_config_from_wire(c: &v1::RoundConfig) -> Result<DomainRoundConfig, WireError> {
    Ok(DomainRoundConfig {
        update_kind: kind_from_wire(c.update_kind)
            .ok_or_else(|| WireError::Invalid("round config has no update kind".into()))?,
        local_steps: c.local_steps,
        local_epochs: c.local_epochs,
        learning_rate: c.learning_rate,
        batch_size: c.batch_size,
        shuffle_ratio: c.shuffle_ratio,
        jigsaw_probability: c.jigsaw_probability,
        per_sample_jigsaw: c.per_sample_jigsaw,
        dal_lambda: c.dal_lambda,
        fedprox_mu: c.fedprox_mu,
        seed: c.seed,
        deadline_unix_ms: c.deadline_unix_ms,
        local_optimizer: match c.local_optimizer.as_str() {
            "" | "sgd" => OptimizerKind::Sgd {
                momentum: c.local_momentum,
            },
            "adamw" => OptimizerKind::AdamW {
                weight_decay: c.local_weight_decay,
            },
            other => {
                return Err(WireError::Invalid(format!(
                    "unknown local optimizer `{other}` (sgd, adamw)"
                )));
            }
        },
        defense: match &c.defense {
            None => mjp::Defense::NONE,
            Some(d) => {
                let d = mjp::Defense {
                    prune_fraction: d.prune_fraction,
                    clip_norm: d.clip_norm,
                    noise_multiplier: d.noise_multiplier,
                };
                d.validate()
                    .map_err(|e| WireError::Invalid(format!("round config defense: {e}")))?;
                d
            }
        },
    })
}

/// The header a client sends before its update's chunks.
pub fn update_header(update: &ModelUpdate, session_token: &str) -> v1::UpdateHeader {
    let manifest = manifest_to_wire(&update.tensors.manifest());
    v1::UpdateHeader {
        session_token: session_token.to_string(),
        round: update.round,
        model_version: update.model_version,
        kind: kind_to_wire(update.kind) as i32,
        batch_size: update.batch_size,
        num_examples: update.num_examples,
        local_steps: update.local_steps,
        metrics: update
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        total_bytes: (update.tensors.numel() * 4) as u64,
        tensors: manifest.tensors,
    }
}

/// An upload header in one step: the domain header, and the tensor declaration it carries
/// (checked against the model by [`DeclaredTensors::check`] once the round checks passed).
pub fn upload_header_from_wire(h: v1::UpdateHeader) -> (UploadHeader, DeclaredTensors) {
    let header = UploadHeader {
        session_token: h.session_token,
        round: h.round,
        model_version: h.model_version,
        kind: kind_from_wire(h.kind),
        batch_size: h.batch_size,
        num_examples: h.num_examples,
        local_steps: h.local_steps,
        metrics: h.metrics.into_iter().collect::<BTreeMap<_, _>>(),
        total_bytes: h.total_bytes,
    };
    (header, DeclaredTensors(h.tensors))
}

/// The tensors an upload header declares, as sent: wire element types included, which is why
/// they stay in this crate.
#[derive(Clone, Debug)]
pub struct DeclaredTensors(Vec<v1::TensorSpec>);

impl DeclaredTensors {
    /// Checks the declaration against the model `manifest` and the byte count the header
    /// announced; the result decodes the update's chunks.
    pub fn check(self, manifest: &Manifest, total_bytes: u64) -> Result<TensorLayout, WireError> {
        let dtypes = check_specs(&self.0, manifest)?;
        let expected = expected_bytes(&self.0, &dtypes);
        if total_bytes != expected as u64 {
            return Err(WireError::Invalid(format!(
                "header declares {total_bytes} bytes, the declared tensors take {expected}"
            )));
        }
        Ok(TensorLayout {
            specs: self.0,
            dtypes,
        })
    }
}

/// A tensor declaration that matches the model.
#[derive(Clone, Debug)]
pub struct TensorLayout {
    specs: Vec<v1::TensorSpec>,
    dtypes: Vec<v1::Dtype>,
}

impl TensorLayout {
    /// An assembler for the chunks that follow (it reserves one model's worth of f32).
    pub fn assembler(&self, max_chunk: usize) -> Assembler {
        Assembler::new(&self.specs, &self.dtypes, max_chunk)
    }

    /// An assembler decoding into `buffers` (see [`Assembler::with_buffers`]).
    pub fn assembler_with_buffers(&self, max_chunk: usize, buffers: Vec<Vec<f32>>) -> Assembler {
        Assembler::with_buffers(&self.specs, &self.dtypes, max_chunk, buffers)
    }
}

/// A wire manifest as names and shapes (element types are a property of each stream).
pub fn manifest_from_wire(m: &v1::ModelManifest) -> Manifest {
    m.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.iter().map(|&d| d as usize).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NamedTensors {
        NamedTensors::new(vec![
            NamedTensor {
                name: "a".into(),
                shape: vec![3, 700],
                data: (0..2100).map(|i| i as f32 * 0.5).collect(),
            },
            NamedTensor {
                name: "b".into(),
                shape: vec![5],
                data: vec![1.0, -2.0, 3.5, 0.0, 9.0],
            },
        ])
    }

    #[test]
    fn chunks_round_trip() {
        let t = sample();
        let specs = manifest_to_wire(&t.manifest()).tensors;
        let dtypes = check_specs(&specs, &t.manifest()).unwrap();
        let mut a = Assembler::new(&specs, &dtypes, 1024);
        for c in chunk_tensors(&t, 1024) {
            assert!(c.data.len() <= 1024);
            a.push(&c).unwrap();
        }
        assert_eq!(a.finish().unwrap(), t);
    }

    #[test]
    fn decodes_into_reused_buffers() {
        let t = sample();
        let specs = manifest_to_wire(&t.manifest()).tensors;
        let dtypes = check_specs(&specs, &t.manifest()).unwrap();
        let decode = |buffers: Vec<Vec<f32>>| {
            let mut a = Assembler::with_buffers(&specs, &dtypes, 1024, buffers);
            for c in chunk_tensors(&t, 1024) {
                a.push(&c).unwrap();
            }
            a.finish().unwrap()
        };
        // Buffers of an earlier update, holding other values: reused in place, overwritten.
        let mut old = sample();
        old.scale(-3.0);
        let buffers = old.into_buffers();
        let pointers: Vec<*const f32> = buffers.iter().map(|b| b.as_ptr()).collect();
        let got = decode(buffers);
        assert_eq!(got, t);
        let reused: Vec<*const f32> = got.into_buffers().iter().map(|b| b.as_ptr()).collect();
        assert_eq!(reused, pointers);
        // A set that does not match the tensors is dropped, not mixed in.
        assert_eq!(decode(vec![vec![7.0; 4]]), t);
        assert_eq!(decode(Vec::new()), t);
    }

    #[test]
    fn upload_header_round_trips_and_checks_the_declared_bytes() {
        let t = sample();
        let update = ModelUpdate {
            round: 3,
            model_version: 2,
            kind: DomainKind::FedAvg,
            batch_size: 8,
            num_examples: 40,
            local_steps: 5,
            metrics: BTreeMap::from([("loss".to_string(), 0.5)]),
            tensors: t.clone(),
        };
        let wire = update_header(&update, "token");
        let (header, declared) = upload_header_from_wire(wire.clone());
        assert_eq!(header.session_token, "token");
        assert_eq!(header.kind, Some(DomainKind::FedAvg));
        let layout = declared.check(&t.manifest(), header.total_bytes).unwrap();
        let mut a = layout.assembler(1024);
        for c in chunk_tensors(&t, 1024) {
            a.push(&c).unwrap();
        }
        let kind = header.kind.unwrap();
        assert_eq!(header.into_update(kind, a.finish().unwrap()), update);
        let (header, declared) = upload_header_from_wire(wire);
        assert!(matches!(
            declared.check(&t.manifest(), header.total_bytes + 4),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn damage_is_detected() {
        let t = sample();
        let specs = manifest_to_wire(&t.manifest()).tensors;
        let dtypes = check_specs(&specs, &t.manifest()).unwrap();
        let chunks = chunk_tensors(&t, 1024);
        // corrupted byte
        let mut a = Assembler::new(&specs, &dtypes, 1024);
        let mut bad = chunks[0].clone();
        let mut data = bad.data.to_vec();
        data[3] ^= 1;
        bad.data = data.into();
        assert!(matches!(a.push(&bad), Err(WireError::DataLoss(_))));
        // oversized chunk
        let mut a = Assembler::new(&specs, &dtypes, 512);
        assert!(matches!(a.push(&chunks[0]), Err(WireError::TooLarge(_))));
        // truncated stream
        let mut a = Assembler::new(&specs, &dtypes, 1024);
        a.push(&chunks[0]).unwrap();
        assert!(matches!(a.finish(), Err(WireError::DataLoss(_))));
        // gap
        let mut a = Assembler::new(&specs, &dtypes, 1024);
        assert!(matches!(a.push(&chunks[1]), Err(WireError::DataLoss(_))));
        // wrong shape declared
        let mut specs2 = specs.clone();
        specs2[1].shape = vec![6];
        assert!(matches!(
            check_specs(&specs2, &t.manifest()),
            Err(WireError::Invalid(_))
        ));
    }
}
