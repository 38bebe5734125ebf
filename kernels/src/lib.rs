//! Fused forward and backward kernels for the MJP-ViT on burn's pure-Rust CPU backend.
//!
//! burn 0.22.1's autodiff records Linear as a matmul plus a broadcast add (with transposed
//! copies in its backward pass), LayerNorm, softmax attention and GELU as chains of elementwise
//! nodes (each allocating, each walked again backwards), and its AdamW as a dozen tensor ops per
//! parameter. Here each of them is one operation with a hand-written backward pass, registered
//! through burn's backend-extension mechanism ([`FusedOps`], implemented for `Flex` and
//! `Autodiff<Flex>`), plus a fused AdamW ([`FusedAdamW`]).
//!
//! The public functions ([`linear`], [`layer_norm`], [`attention`], [`gelu`]) take the fused path on the
//! Flex backend for f32 tensors and fall back to burn's own composition ([`reference`])
//! everywhere else (LibTorch, other dtypes), or when fused kernels are switched off with
//! [`set_enabled`] or `MJPFL_FUSED=0` (used by the benchmarks and tests to compare both paths).

#![warn(missing_docs)]
// Without a backend that implements the extension, its macro's dispatch leaves the operations'
// arguments unread.
#![cfg_attr(not(feature = "flex"), allow(unused_variables))]

use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::{DType, Device, Tensor};

pub mod cpu;
#[cfg(feature = "flex")]
mod flex;
mod optim;

pub use optim::{FusedAdamW, adamw};

/// Runs `f` on a worker thread of the current rayon pool (the global pool when called from
/// outside any), blocking the caller until it returns.
///
/// The kernels split their work over the pool of the thread that calls them. Called from a
/// thread outside that pool, a training step's serial parts run on one more thread than the pool
/// has, which competes for the cores with the pool's workers spinning between kernels (on 2 cores,
/// vit-micro-28 batch 10 took 12.2-13.8 ms per step from the main thread and 8.7-9.3 ms on a
/// worker). Long loops (training, evaluation, attacks) run their whole body through this.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Operations with a fused kernel and a hand-written backward pass.
#[backend_extension(Flex: cfg(feature = "flex"), Autodiff: cfg(feature = "flex"))]
pub trait FusedOps: Backend {
    /// `x W + b` over the last axis of `x`, `W` `[d_in, d_out]` (burn's layout).
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last axis with scale and shift (biased variance).
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// Multi-head self-attention core on a packed projection: `[B, T, 3D] -> [B, T, D]`,
    /// `softmax(q k^T * scale) v` per head, heads merged back in order.
    fn fused_attention(qkv: FloatTensor<Self>, heads: usize, scale: f32) -> FloatTensor<Self>;

    /// Exact GELU, `x Phi(x)`.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// 0: not read yet, 1: on, 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether fused kernels are used where available (default on; `MJPFL_FUSED=0` turns them off).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("MJPFL_FUSED").map_or(true, |v| v != "0" && v != "false");
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns fused kernels on or off for the whole process (benchmarks and tests compare both).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether tensors on `device` with `dtype` take the fused path.
pub fn fused_on(device: &Device, dtype: DType) -> bool {
    #[cfg(feature = "flex")]
    {
        dtype == DType::F32
            && enabled()
            && matches!(
                device.clone().without_autodiff().as_dispatch(),
                burn::backend::DispatchDevice::Flex(_)
            )
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (device, dtype);
        false
    }
}

/// `x W + b` over the last axis (`W` `[d_in, d_out]`); without a bias, burn's `linear`.
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(bias) = &bias
        && fused_on(&x.device(), x.dtype())
    {
        use burn::backend::Dispatch;
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.clone().into_dispatch(),
        ));
    }
    reference::linear(x, weight, bias)
}

/// LayerNorm over the last axis (timm's `eps = 1e-6` is the caller's choice).
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if fused_on(&x.device(), x.dtype()) {
        use burn::backend::Dispatch;
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
            x.into_dispatch(),
            weight.into_dispatch(),
            bias.into_dispatch(),
            eps as f32,
        ));
    }
    reference::layer_norm(x, weight, bias, eps)
}

/// Self-attention core on the packed qkv projection (`[B, T, 3D]`, timm's q/k/v block layout)
/// with `heads` heads and scale `head_dim^-1/2`: returns the merged heads, `[B, T, D]`.
pub fn attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if fused_on(&qkv.device(), qkv.dtype()) {
        use burn::backend::Dispatch;
        let hd = qkv.dims()[2] / 3 / heads;
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
            qkv.into_dispatch(),
            heads,
            (hd as f32).powf(-0.5),
        ));
    }
    reference::attention(qkv, heads)
}

/// Exact (erf) GELU.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if fused_on(&x.device(), x.dtype()) {
        use burn::backend::Dispatch;
        return Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()));
    }
    reference::gelu(x)
}

/// burn's own compositions of the same operations: the path on every other backend, and the
/// reference the fused kernels are tested against.
pub mod reference {
    use burn::tensor::Tensor;
    use burn::tensor::activation::softmax;

    /// burn's `linear`.
    pub fn linear<const D: usize>(
        x: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        burn::tensor::module::linear(x, weight, bias)
    }

    /// burn's `layer_norm`.
    pub fn layer_norm<const D: usize>(
        x: Tensor<D>,
        weight: Tensor<1>,
        bias: Tensor<1>,
        eps: f64,
    ) -> Tensor<D> {
        burn::tensor::module::layer_norm(x, weight, Some(bias), eps)
    }

    /// Heads split by narrow/reshape/swap, batched matmuls and burn's softmax.
    pub fn attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        let [b, t, d3] = qkv.dims();
        let d = d3 / 3;
        let hd = d / heads;
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, t, heads, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((hd as f64).powf(-0.5));
        softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b, t, d])
    }

    /// burn's `gelu`.
    pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        burn::tensor::activation::gelu(x)
    }
}
