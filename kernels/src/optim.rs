//! AdamW as one fused pass per parameter.
//!
//! burn's `AdamW` runs about a dozen tensor operations per parameter and step, each allocating a
//! new buffer; for the small models and batches of federated clients that overhead is a visible
//! part of a step. [`FusedAdamW`] is the same optimiser (the same formula, the same order of f32
//! operations, so bit-identical updates; the state type is burn's `AdamWState`, so optimiser
//! records are interchangeable) computed in one pass over the parameter, its gradient and its
//! two moments.

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};

use crate::cpu::{self, AdamWStep};

/// AdamW (decoupled weight decay, no AMSGrad, no cautious decay) in one fused pass.
#[derive(Clone, Copy, Debug)]
pub struct FusedAdamW {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl FusedAdamW {
    /// burn's AdamW defaults (betas 0.9 / 0.999) with the given epsilon and weight decay.
    pub fn new(weight_decay: f32, epsilon: f32) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            epsilon,
            weight_decay,
        }
    }

    /// A module optimiser around it.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

fn into_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_into_vec::<f32>()
        .expect("AdamW parameters are f32")
}

fn from_values<const D: usize>(
    values: Vec<f32>,
    shape: burn::tensor::Shape,
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let device = tensor.device();
        let shape = tensor.shape();
        let mut p = into_values(tensor);
        let g = into_values(grad);
        let (mut m, mut v, time) = match state {
            Some(s) => (
                into_values(s.momentum.moment_1),
                into_values(s.momentum.moment_2),
                s.momentum.time + 1,
            ),
            None => (vec![0.0; p.len()], vec![0.0; p.len()], 1),
        };
        let step = AdamWStep {
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.epsilon,
            weight_decay: self.weight_decay,
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            t: time as i32,
        };
        cpu::adamw(step, &mut p, &g, &mut m, &mut v);
        let state = AdamWState::new(AdaptiveMomentumState::new(
            time,
            from_values(m, shape.clone(), &device),
            from_values(v, shape.clone(), &device),
        ));
        (from_values(p, shape, &device), Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum.moment_1 = state.momentum.moment_1.to_device(device);
        state.momentum.moment_2 = state.momentum.moment_2.to_device(device);
        state
    }
}

/// The AdamW module optimiser for a model on `device`: fused where fused kernels run (Flex),
/// burn's own elsewhere (on LibTorch the fused pass would copy every parameter to the host).
pub fn adamw(weight_decay: f32, epsilon: f32, device: &Device) -> ModuleOptimizer {
    if crate::fused_on(device, burn::tensor::DType::F32) {
        FusedAdamW::new(weight_decay, epsilon).init()
    } else {
        burn::optim::AdamWConfig::new()
            .with_weight_decay(weight_decay)
            .with_epsilon(epsilon)
            .init()
    }
}
