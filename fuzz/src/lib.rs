//! Helpers shared by the mjpfl fuzz targets: the default model's manifest (built once), the
//! upload input format (gRPC message framing of `UpdateMessage`s) and its decoder, which follows
//! the coordinator's `SubmitUpdate` path step by step, and the seed writers.
//!
//! # upload_decoder input format
//!
//! ```text
//! byte 0          max_chunk selector: MAX_CHUNKS[byte % 4]
//! then, repeated  gRPC length-prefixed message, as tonic reads it from the HTTP/2 body:
//!                 1 byte compressed flag (0), 4 bytes big-endian length, prost UpdateMessage
//! ```
//!
//! The first message must be the header, every later one a chunk; the input's end is the end of
//! the client's stream.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mjp::data::DataSource;
use mjp::fl::{ModelUpdate, UpdateKind, UploadHeader};
use mjp::params::{Manifest, NamedTensors};
use mjpfl_coordinator::CoordinatorConfig;
use mjpfl_coordinator::admission::{Admission, AdmissionSection};
use mjpfl_proto::{MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, convert, v1};
use prost::Message;

/// The `max_chunk` values the first input byte chooses from: the coordinator's default (and
/// largest allowed) value, the smallest `validate()` allows, and two in between.
pub const MAX_CHUNKS: [usize; 4] = [MAX_CHUNK_BYTES, 1024, 4096, 64 << 10];

/// The default model of a coordinator (`CoordinatorConfig::default()`, vit-micro-28 with the
/// MJP position embedding and the nonlinear DAL head), initialised as `Federation::open` does.
pub struct Model {
    /// The global model's values (the seeds send them back as an update).
    pub global: NamedTensors,
    /// What `Federation::manifest()` returns for it.
    pub manifest: Manifest,
    /// The admission rules of the default configuration (partition sizes unknown).
    pub admission: Admission,
    /// The default norm bound for updates computed from `global`.
    pub norm_bound: f64,
}

/// The default model, built once per process.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let config = CoordinatorConfig::default();
        let vit = config.model.vit().expect("default model config is valid");
        let device = config
            .server
            .device
            .device()
            .expect("the flex device is available");
        let vit = mjp::Vit::new(
            &vit,
            mjp::Seed(config.federation.seed).child("global-init", 0),
            &device,
        );
        let global = NamedTensors::from_module(&vit);
        let manifest = global.manifest();
        // A dataset that cannot be read: no partition sizes, nothing depends on local files.
        let missing = PathBuf::from("/nonexistent/mjpfl-fuzz");
        let admission = Admission::new(
            &AdmissionSection::default(),
            &DataSource::Idx(missing.clone()),
            &missing,
            &config.partition,
            config.federation.seed,
        );
        let norm_bound = admission.norm_bound(&global);
        Model {
            global,
            manifest,
            admission,
            norm_bound,
        }
    })
}

/// Reads gRPC length-prefixed messages as tonic's decoder does (uncompressed only: the
/// coordinator enables no compression; over `MAX_MESSAGE_BYTES`: refused).
pub struct Frames<'a> {
    rest: &'a [u8],
    broken: bool,
}

impl<'a> Frames<'a> {
    /// The messages of `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self {
            rest: body,
            broken: false,
        }
    }
}

impl Iterator for Frames<'_> {
    type Item = Result<v1::UpdateMessage, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.broken || self.rest.is_empty() {
            return None;
        }
        // After an error the stream is over, as a tonic `Streaming` is.
        self.broken = true;
        if self.rest.len() < 5 {
            return Some(Err("stream ended inside a message header".into()));
        }
        let flag = self.rest[0];
        let len = u32::from_be_bytes([self.rest[1], self.rest[2], self.rest[3], self.rest[4]]);
        let len = len as usize;
        match flag {
            0 => {}
            1 => return Some(Err("compressed message, compression not enabled".into())),
            f => return Some(Err(format!("invalid compression flag {f}"))),
        }
        if len > MAX_MESSAGE_BYTES {
            return Some(Err(format!("message of {len} bytes over the size limit")));
        }
        let Some(body) = self.rest.get(5..5 + len) else {
            return Some(Err("stream ended inside a message".into()));
        };
        self.rest = &self.rest[5 + len..];
        match v1::UpdateMessage::decode(body) {
            Ok(m) => {
                self.broken = false;
                Some(Ok(m))
            }
            Err(e) => Some(Err(format!("undecodable message: {e}"))),
        }
    }
}

/// Frames `messages` as a client's SubmitUpdate body, behind the `max_chunk` selector byte.
pub fn encode_input(selector: u8, messages: &[v1::UpdateMessage]) -> Vec<u8> {
    let mut out = vec![selector];
    for m in messages {
        let body = m.encode_to_vec();
        out.push(0);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

/// What the coordinator's `receive_update` does with an upload's bytes, minus what needs a live
/// federation (session, round and deadline checks, the aggregate): the header through
/// `upload_header_from_wire`, the declaration through `DeclaredTensors::check` against the real
/// manifest, every chunk through the assembler, `finish`. Any `Err` is a refused upload.
pub fn decode_upload(
    data: &[u8],
    manifest: &Manifest,
) -> Result<(UploadHeader, NamedTensors), String> {
    let (&selector, body) = data.split_first().ok_or("empty input")?;
    let max_chunk = MAX_CHUNKS[usize::from(selector) % MAX_CHUNKS.len()];
    let mut frames = Frames::new(body);
    let header = match frames.next() {
        Some(Ok(v1::UpdateMessage {
            kind: Some(v1::update_message::Kind::Header(h)),
        })) => h,
        Some(Ok(_)) => return Err("the first message of SubmitUpdate must be the header".into()),
        Some(Err(e)) => return Err(e),
        None => return Err("empty SubmitUpdate stream".into()),
    };
    let (header, declared) = convert::upload_header_from_wire(header);
    let layout = declared
        .check(manifest, header.total_bytes)
        .map_err(|e| e.to_string())?;
    let mut assembler = layout.assembler(max_chunk);
    for message in frames {
        match message? {
            v1::UpdateMessage {
                kind: Some(v1::update_message::Kind::Chunk(c)),
            } => assembler.push(&c).map_err(|e| e.to_string())?,
            _ => return Err("only chunks may follow the header".into()),
        }
    }
    let tensors = assembler.finish().map_err(|e| e.to_string())?;
    Ok((header, tensors))
}

/// The update the default model would send back: its own values, as FedAvg from 32 examples.
fn seed_update() -> ModelUpdate {
    ModelUpdate {
        round: 1,
        model_version: 0,
        kind: UpdateKind::FedAvg,
        batch_size: 32,
        num_examples: 32,
        local_steps: 1,
        metrics: [("loss".to_string(), 2.3), ("accuracy".to_string(), 0.1)].into(),
        tensors: model().global.clone(),
    }
}

/// Chunks of `tensors` with each tensor in the dtype `dtype_of(index)`, at most `max_chunk`
/// bytes each (whole elements), as a client that sends half precision would cut them.
fn chunks_as(
    tensors: &NamedTensors,
    dtype_of: impl Fn(usize) -> v1::Dtype,
    max_chunk: usize,
) -> Vec<v1::TensorChunk> {
    let mut out = Vec::new();
    for (i, t) in tensors.tensors().iter().enumerate() {
        let dtype = dtype_of(i);
        let bytes: Vec<u8> = t
            .data
            .iter()
            .flat_map(|&v| match dtype {
                v1::Dtype::F32 => v.to_le_bytes().to_vec(),
                v1::Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                v1::Dtype::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect();
        let size = convert::dtype_size(dtype);
        let per = (max_chunk / size).max(1) * size;
        let mut offset = 0;
        for piece in bytes.chunks(per) {
            out.push(v1::TensorChunk {
                tensor_index: i as u32,
                offset: offset as u64,
                crc32: crc32fast::hash(piece),
                data: piece.to_vec().into(),
            });
            offset += piece.len();
        }
    }
    out
}

/// Header and chunks of the seed update with per-tensor dtypes.
fn messages_as(dtype_of: impl Fn(usize) -> v1::Dtype, max_chunk: usize) -> Vec<v1::UpdateMessage> {
    use v1::update_message::Kind;
    let update = seed_update();
    let mut header = convert::update_header(&update, "fuzz-session");
    for (i, spec) in header.tensors.iter_mut().enumerate() {
        spec.dtype = dtype_of(i) as i32;
    }
    let dtypes: Vec<v1::Dtype> = (0..header.tensors.len()).map(&dtype_of).collect();
    header.total_bytes = convert::expected_bytes(&header.tensors, &dtypes) as u64;
    std::iter::once(Kind::Header(header))
        .chain(
            chunks_as(&update.tensors, dtype_of, max_chunk)
                .into_iter()
                .map(Kind::Chunk),
        )
        .map(|k| v1::UpdateMessage { kind: Some(k) })
        .collect()
}

/// Writes the upload_decoder seeds into `dir`; every one but the last two decodes in full
/// (checked here). Returns the files written.
pub fn write_upload_seeds(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use v1::Dtype::{Bf16, F16, F32};
    std::fs::create_dir_all(dir)?;
    let manifest = &model().manifest;
    let selector =
        |max_chunk: usize| MAX_CHUNKS.iter().position(|&m| m == max_chunk).unwrap() as u8;
    let update = seed_update();
    let client: Vec<v1::UpdateMessage> = {
        // Exactly what mjpfl-client's `update_messages` sends (f32, the coordinator's max chunk).
        use v1::update_message::Kind;
        std::iter::once(Kind::Header(convert::update_header(
            &update,
            "fuzz-session",
        )))
        .chain(
            convert::chunk_tensors(&update.tensors, MAX_CHUNK_BYTES)
                .into_iter()
                .map(Kind::Chunk),
        )
        .map(|k| v1::UpdateMessage { kind: Some(k) })
        .collect()
    };
    let mixed = |i: usize| [F32, F16, Bf16][i % 3];
    let half_1k = messages_as(|_| F16, 1024);
    let seeds: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "seed-client-f32-1MiB.bin",
            encode_input(selector(MAX_CHUNK_BYTES), &client),
            true,
        ),
        (
            "seed-bf16-1KiB.bin",
            encode_input(selector(1024), &messages_as(|_| Bf16, 1024)),
            true,
        ),
        (
            "seed-f16-4KiB.bin",
            encode_input(selector(4096), &messages_as(|_| F16, 4096)),
            true,
        ),
        (
            "seed-mixed-64KiB.bin",
            encode_input(selector(64 << 10), &messages_as(mixed, 64 << 10)),
            true,
        ),
        (
            "seed-header-only.bin",
            encode_input(selector(1024), &half_1k[..1]),
            false,
        ),
        (
            "seed-f16-truncated.bin",
            encode_input(selector(1024), &half_1k[..6]),
            false,
        ),
    ];
    let mut written = Vec::new();
    for (name, bytes, complete) in seeds {
        let decoded = decode_upload(&bytes, manifest);
        assert_eq!(
            decoded.is_ok(),
            complete,
            "seed {name}: {:?}",
            decoded.err()
        );
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the config_loader seed that only the code knows: the default configuration's TOML.
pub fn write_config_seeds(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("seed-default.toml");
    std::fs::write(&path, CoordinatorConfig::default().to_toml())?;
    Ok(vec![path])
}
