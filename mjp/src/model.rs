//! The MJP-ViT: linear patch embedding, CLS token, additive position embedding (learned, none,
//! or MJP with a shared unk row), pre-norm transformer blocks with GELU MLPs, final LayerNorm,
//! linear head, and the DAL regressor. Parameter names follow timm's ViT so that checkpoints map
//! one-to-one (see `params::timm`).
//!
//! Inputs are pixels in [0, 1]; per-channel normalisation happens inside the model so attacks
//! and metrics work in pixel space.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;

use crate::config::{DalKind, VitConfig};
use crate::jigsaw::JigsawPlan;
use crate::seed::Seed;

/// `x W + b` of a burn `Linear` (one fused operation on the CPU backend, see
/// `mjpfl_kernels::linear`).
fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    mjpfl_kernels::linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// LayerNorm with timm's parameter names (`weight`, `bias`).
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Shift.
    pub bias: Param<Tensor<1>>,
}

impl LayerNorm {
    fn new(dim: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_data(TensorData::new(vec![1.0f32; dim], [dim]), device),
            bias: Param::from_data(TensorData::new(vec![0.0f32; dim], [dim]), device),
        }
    }

    /// Normalises the last axis (one fused operation on the CPU backend, see `mjpfl_kernels`).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        mjpfl_kernels::layer_norm(x, self.weight.val(), self.bias.val(), 1e-6)
    }
}

/// Multi-head self-attention with a fused qkv projection (timm layout: q, k, v blocks of `dim`).
#[derive(Module, Debug)]
pub struct Attention {
    /// Fused query/key/value projection, `dim -> 3 dim`.
    pub qkv: Linear,
    /// Output projection.
    pub proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl Attention {
    /// `[B, T, D] -> [B, T, D]`: the packed projection, then `softmax(q k^T / sqrt(hd)) v` per
    /// head (one fused operation on the CPU backend, see `mjpfl_kernels::attention`).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let out = mjpfl_kernels::attention(linear(&self.qkv, x), self.heads);
        linear(&self.proj, out)
    }
}

/// The block's two-layer GELU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `dim -> hidden`.
    pub fc1: Linear,
    /// `hidden -> dim`.
    pub fc2: Linear,
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// The MLP.
    pub mlp: Mlp,
}

impl Block {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x));
        let h = linear(&self.mlp.fc1, self.norm2.forward(x.clone()));
        x + linear(&self.mlp.fc2, mjpfl_kernels::gelu(h))
    }
}

/// Linear patch embedding (equivalent to timm's stride-p convolution on flattened patches).
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// `C*p*p -> dim`, weight `[C*p*p, dim]` with patch values in (c, y, x) order.
    pub proj: Linear,
}

/// Dense absolute localization: regresses (row, col) from a position-embedding vector.
#[derive(Module, Debug)]
pub struct DalHead {
    /// First layer (`dim -> 2` when linear, `dim -> dim` when nonlinear).
    pub fc1: Linear,
    /// Second layer after a ReLU (`dim -> 2`), nonlinear only.
    pub fc2: Option<Linear>,
}

impl DalHead {
    /// `[N, D] -> [N, 2]`.
    pub fn forward(&self, pe: Tensor<2>) -> Tensor<2> {
        let h = linear(&self.fc1, pe);
        match &self.fc2 {
            Some(fc2) => linear(fc2, relu(h)),
            None => h,
        }
    }
}

/// The Vision Transformer with every position-embedding mode of the paper.
#[derive(Module, Debug)]
pub struct Vit {
    /// Patch embedding.
    pub patch_embed: PatchEmbed,
    /// Class token `[1, D]`.
    pub cls_token: Param<Tensor<2>>,
    /// Position-embedding table `[rows, D]`: row 0 cls, rows 1..=N patches, row N+1 unk (MJP).
    pub pos_embed: Option<Param<Tensor<2>>>,
    /// Transformer blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: LayerNorm,
    /// Classifier.
    pub head: Linear,
    /// DAL regressor (MJP only).
    pub dal: Option<DalHead>,
    #[module(skip)]
    config: VitConfig,
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Class logits `[B, K]`.
    pub logits: Tensor<2>,
    /// Final-norm CLS features `[B, D]` (used by the consistency metric).
    pub features: Tensor<2>,
}

/// Initialisation helpers: every parameter is drawn from the project's seeded generator, so a
/// model is reproducible from its seed on any backend. Without a generator every value is zero
/// (a skeleton whose values are about to be overwritten).
struct Init<'a, R: Rng> {
    rng: Option<&'a mut R>,
    device: &'a Device,
}

impl<R: Rng> Init<'_, R> {
    /// timm's `trunc_normal_(std=0.02)` (truncated at 2 std).
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let Some(rng) = self.rng.as_mut() else {
            return vec![0.0; n];
        };
        (0..n)
            .map(|_| {
                loop {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    if z.abs() <= 2.0 {
                        break (z * std) as f32;
                    }
                }
            })
            .collect()
    }

    fn param2(&mut self, rows: usize, cols: usize, std: f64) -> Param<Tensor<2>> {
        let values = self.normal(rows * cols, std);
        Param::from_data(TensorData::new(values, [rows, cols]), self.device)
    }

    fn linear(&mut self, d_in: usize, d_out: usize) -> Linear {
        Linear {
            weight: self.param2(d_in, d_out, 0.02),
            bias: Some(Param::from_data(
                TensorData::new(vec![0.0f32; d_out], [d_out]),
                self.device,
            )),
        }
    }

    /// timm leaves its patch-embedding convolution at PyTorch's default initialisation:
    /// weight and bias uniform in `±1/sqrt(fan_in)`.
    fn conv_default(&mut self, d_in: usize, d_out: usize) -> Linear {
        let bound = 1.0 / (d_in as f64).sqrt();
        let mut uniform = |n: usize| -> Vec<f32> {
            match self.rng.as_mut() {
                Some(rng) => (0..n)
                    .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                    .collect(),
                None => vec![0.0; n],
            }
        };
        let (w, b) = (uniform(d_in * d_out), uniform(d_out));
        Linear {
            weight: Param::from_data(TensorData::new(w, [d_in, d_out]), self.device),
            bias: Some(Param::from_data(TensorData::new(b, [d_out]), self.device)),
        }
    }
}

impl Vit {
    /// A freshly initialised model (timm's ViT initialisation) on `device`.
    pub fn new(config: &VitConfig, seed: Seed, device: &Device) -> Self {
        let mut rng = seed.child("init", 0).rng();
        Self::build(config, Some(&mut rng), device)
    }

    /// A model of `config` whose parameters are all zero (LayerNorm weights one): the shape to
    /// load parameters into. Drawing a random initialisation only to overwrite it took a fifth
    /// of the CPU time of a 100-client round of one-step clients, each of which builds its
    /// model from the downloaded parameters.
    pub fn skeleton(config: &VitConfig, device: &Device) -> Self {
        Self::build::<rand_chacha::ChaCha8Rng>(config, None, device)
    }

    fn build<R: Rng>(config: &VitConfig, rng: Option<&mut R>, device: &Device) -> Self {
        let mut init = Init { rng, device };
        let d = config.dim;
        let blocks = (0..config.depth)
            .map(|_| Block {
                norm1: LayerNorm::new(d, device),
                attn: Attention {
                    qkv: init.linear(d, 3 * d),
                    proj: init.linear(d, d),
                    heads: config.heads,
                },
                norm2: LayerNorm::new(d, device),
                mlp: Mlp {
                    fc1: init.linear(d, config.mlp_hidden()),
                    fc2: init.linear(config.mlp_hidden(), d),
                },
            })
            .collect();
        let dal = config.has_dal().then(|| match config.dal {
            DalKind::Linear => DalHead {
                fc1: init.linear(d, 2),
                fc2: None,
            },
            _ => DalHead {
                fc1: init.linear(d, d),
                fc2: Some(init.linear(d, 2)),
            },
        });
        Self {
            patch_embed: PatchEmbed {
                proj: init.conv_default(config.patch_dim(), d),
            },
            cls_token: init.param2(1, d, 1e-6),
            pos_embed: config
                .pe
                .has_pe()
                .then(|| init.param2(config.pe_rows(), d, 0.02)),
            blocks,
            norm: LayerNorm::new(d, device),
            head: init.linear(d, config.num_classes),
            dal,
            config: config.clone(),
        }
    }

    /// An inference copy: same values, no autodiff tracking.
    pub fn inference(&self) -> Self {
        Module::valid(self)
    }

    /// The architecture this model was built with.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.head.weight.val().device()
    }

    /// Splits normalised images `[B, C, H, W]` into flattened patches `[B, N, C*p*p]`.
    pub fn patchify(&self, images: Tensor<4>) -> Tensor<3> {
        let c = &self.config;
        let [b, ch, _, _] = images.dims();
        let (g, p) = (c.grid(), c.patch_size);
        images
            .reshape([b, ch, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, ch * p * p])
    }

    /// Applies the model's per-channel normalisation to pixels in [0, 1].
    pub fn normalize(&self, images: Tensor<4>) -> Tensor<4> {
        let c = &self.config;
        let device = images.device();
        let mean = Tensor::<1>::from_data(TensorData::new(c.mean.clone(), [c.channels]), &device)
            .reshape([1, c.channels, 1, 1]);
        let inv_std = Tensor::<1>::from_data(
            TensorData::new(c.std.iter().map(|s| 1.0 / s).collect(), [c.channels]),
            &device,
        )
        .reshape([1, c.channels, 1, 1]);
        (images - mean) * inv_std
    }

    /// Patch tokens after embedding, before position embeddings: `[B, N, D]`. With a plan, the
    /// patches are first moved to their jigsaw positions (the shuffle happens in pixel space).
    pub fn embed_patches(&self, images: Tensor<4>, plan: Option<&JigsawPlan>) -> Tensor<3> {
        let patches = self.patchify(self.normalize(images));
        let patches = match plan {
            Some(plan)
                if plan
                    .plans()
                    .iter()
                    .any(|p| p.sources.iter().enumerate().any(|(i, &s)| i != s)) =>
            {
                let [b, n, pd] = patches.dims();
                let index: Vec<i64> = (0..b)
                    .flat_map(|bi| {
                        plan.sample(bi)
                            .sources
                            .iter()
                            .map(move |&s| (bi * n + s) as i64)
                    })
                    .collect();
                let index =
                    Tensor::<1, Int>::from_data(TensorData::new(index, [b * n]), &patches.device());
                patches
                    .reshape([b * n, pd])
                    .select(0, index)
                    .reshape([b, n, pd])
            }
            _ => patches,
        };
        linear(&self.patch_embed.proj, patches)
    }

    /// The position embeddings added to the patch tokens, `[1 or B, N, D]`: each position's own
    /// row, or the shared unk row where the plan occludes it.
    pub fn patch_position_embeddings(
        &self,
        batch: usize,
        plan: Option<&JigsawPlan>,
    ) -> Option<Tensor<3>> {
        let table = self.pos_embed.as_ref()?.val();
        let n = self.config.num_patches();
        let d = self.config.dim;
        let occludes = plan.is_some_and(|p| p.plans().iter().any(|s| s.occluded_count() > 0));
        if !occludes {
            return Some(table.narrow(0, 1, n).reshape([1, n, d]));
        }
        let plan = plan.expect("checked above");
        let unk = self.config.unk_row() as i64;
        let rows = |s: &crate::jigsaw::SamplePlan| -> Vec<i64> {
            s.occluded
                .iter()
                .enumerate()
                .map(|(i, &o)| if o { unk } else { 1 + i as i64 })
                .collect()
        };
        let (index, copies): (Vec<i64>, usize) = if plan.is_shared() {
            (rows(plan.sample(0)), 1)
        } else {
            (
                (0..batch).flat_map(|b| rows(plan.sample(b))).collect(),
                batch,
            )
        };
        let device = table.device();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [copies * n]), &device);
        Some(table.select(0, index).reshape([copies, n, d]))
    }

    /// Transformer over a full token sequence `[B, 1+N, D]`; returns `(logits, cls features)`.
    pub fn encode(&self, tokens: Tensor<3>) -> Forward {
        let [b, _, d] = tokens.dims();
        let x = self.blocks.iter().fold(tokens, |x, block| block.forward(x));
        let features = self.norm.forward(x).narrow(1, 0, 1).reshape([b, d]);
        Forward {
            logits: linear(&self.head, features.clone()),
            features,
        }
    }

    /// The CLS token with its position embedding, `[1, 1, D]`.
    fn cls(&self) -> Tensor<3> {
        let d = self.config.dim;
        let cls = self.cls_token.val();
        let cls = match &self.pos_embed {
            Some(table) => cls + table.val().narrow(0, 0, 1),
            None => cls,
        };
        cls.reshape([1, 1, d])
    }

    /// Full forward pass on pixels in [0, 1], optionally through a jigsaw plan.
    pub fn forward(&self, images: Tensor<4>, plan: Option<&JigsawPlan>) -> Forward {
        self.forward_embedded(self.embed_patches(images, plan), plan)
    }

    /// The rest of the forward pass from embedded patch tokens `z = W p + b` (`[B, N, D]`): adds
    /// the position embeddings (unk where the plan occludes), prepends the CLS token, encodes.
    /// The closed-form attack relies on `dL/dE_i = dL/dz_i` here.
    pub fn forward_embedded(&self, patch_tokens: Tensor<3>, plan: Option<&JigsawPlan>) -> Forward {
        let [b, _, d] = patch_tokens.dims();
        let x = match self.patch_position_embeddings(b, plan) {
            Some(pe) => patch_tokens + pe,
            None => patch_tokens,
        };
        let tokens = Tensor::cat(vec![self.cls().expand([b, 1, d]), x], 1);
        self.encode(tokens)
    }

    /// The DAL loss: L1 between the regressor's prediction from each visible position's PE vector
    /// and its grid coordinates, averaged over the visible positions of every sample. `None` when
    /// the model has no DAL head.
    pub fn dal_loss(
        &self,
        plan: Option<&JigsawPlan>,
        normalized_targets: bool,
    ) -> Option<Tensor<1>> {
        let dal = self.dal.as_ref()?;
        let table = self.pos_embed.as_ref()?.val();
        let n = self.config.num_patches();
        let g = self.config.grid();
        let device = table.device();
        let mut weight = vec![1.0f32; n];
        if let Some(plan) = plan {
            let samples = plan.plans();
            for (i, w) in weight.iter_mut().enumerate() {
                let visible = samples.iter().filter(|s| !s.occluded[i]).count();
                *w = visible as f32 / samples.len() as f32;
            }
        }
        let total: f32 = weight.iter().sum();
        if total == 0.0 {
            return None;
        }
        let scale = if normalized_targets {
            1.0 / (g.max(2) - 1) as f32
        } else {
            1.0
        };
        let targets: Vec<f32> = (0..n)
            .flat_map(|i| [(i / g) as f32 * scale, (i % g) as f32 * scale])
            .collect();
        let targets = Tensor::<2>::from_data(TensorData::new(targets, [n, 2]), &device);
        let weight = Tensor::<2>::from_data(TensorData::new(weight, [n, 1]), &device);
        let pred = dal.forward(table.narrow(0, 1, n));
        let per_position = (pred - targets).abs().sum_dim(1) * weight;
        Some(per_position.sum().div_scalar(2.0 * total))
    }
}

/// Mean cross-entropy of `logits` `[B, K]` against integer `labels` `[B]`.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let b = labels.dims()[0];
    log_softmax(logits, 1)
        .gather(1, labels.reshape([b, 1]))
        .mean()
        .neg()
}

/// Number of correct argmax predictions.
pub fn correct(logits: &Tensor<2>, labels: &[u32]) -> usize {
    predictions(logits)
        .iter()
        .zip(labels)
        .filter(|(p, l)| *p == *l)
        .count()
}

/// Argmax class per row.
pub fn predictions(logits: &Tensor<2>) -> Vec<u32> {
    let [b, k] = logits.dims();
    let values = crate::params::tensor_values(logits);
    (0..b)
        .map(|i| {
            let row = &values[i * k..(i + 1) * k];
            row.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (j, &v)| {
                    if v > best.1 { (j, v) } else { best }
                })
                .0 as u32
        })
        .collect()
}
