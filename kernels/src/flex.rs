//! The fused operations on burn's Flex backend, and their autodiff nodes: each fused operation is
//! one node of the autodiff graph whose backward pass is one fused kernel (instead of the dozen
//! elementwise nodes burn's composition records).

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, TensorData};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;

use crate::FusedOps;
use crate::cpu::{self, AttentionShape};

/// A contiguous f32 view of a Flex tensor (copied only when it is a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "fused kernels take f32 tensors");
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

fn attention_shape(qkv: &FlexTensor, heads: usize) -> AttentionShape {
    let dims = shape(qkv);
    assert_eq!(
        dims.num_dims(),
        3,
        "packed attention takes [batch, tokens, 3 * dim]"
    );
    assert!(
        dims[2].is_multiple_of(3 * heads),
        "3 * dim must be divisible by 3 * heads"
    );
    AttentionShape {
        batch: dims[0],
        tokens: dims[1],
        dim: dims[2] / 3,
        heads,
    }
}

fn layer_norm_forward(
    x: &FlexTensor,
    w: &FlexTensor,
    b: &FlexTensor,
    eps: f32,
) -> (FlexTensor, FlexTensor) {
    let (y, stats) = cpu::layer_norm(&values(x), &values(w), &values(b), eps);
    let rows = stats.len() / 2;
    (tensor(y, shape(x)), tensor(stats, Shape::from([rows, 2])))
}

fn attention_forward(qkv: &FlexTensor, heads: usize, scale: f32) -> (FlexTensor, FlexTensor) {
    let s = attention_shape(qkv, heads);
    let (out, probs) = cpu::attention(&values(qkv), s, scale);
    (
        tensor(out, Shape::from([s.batch, s.tokens, s.dim])),
        tensor(probs, Shape::from([s.batch, s.heads, s.tokens, s.tokens])),
    )
}

impl FusedOps for Flex {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        layer_norm_forward(&x, &weight, &bias, eps).0
    }

    fn fused_attention(qkv: FloatTensor<Self>, heads: usize, scale: f32) -> FloatTensor<Self> {
        attention_forward(&qkv, heads, scale).0
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor(cpu::gelu(&values(&x)), shape(&x))
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<Flex, 3> for LayerNormBackward {
            type State = (FlexTensor, FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x, w, stats) = ops.state;
                let d = w.layout().num_elements();
                let (dx, dw, db) = cpu::layer_norm_backward(
                    &values(&x),
                    &values(&w),
                    &values(&stats),
                    &values(&grad),
                );
                if let Some(node) = node_x {
                    grads.register::<Flex>(node.id, tensor(dx, shape(&x)));
                }
                if let Some(node) = node_w {
                    grads.register::<Flex>(node.id, tensor(dw, Shape::from([d])));
                }
                if let Some(node) = node_b {
                    grads.register::<Flex>(node.id, tensor(db, Shape::from([d])));
                }
            }
        }

        let guards = [x.node(), weight.node(), bias.node()];
        let (x, w, b) = (
            x.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        );
        let (y, stats) = layer_norm_forward(&x, &w, &b, eps);
        match LayerNormBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, w, stats), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_attention(qkv: FloatTensor<Self>, heads: usize, scale: f32) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl Backward<Flex, 1> for AttentionBackward {
            type State = (FlexTensor, FlexTensor, usize, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let Some(node) = node else { return };
                let (qkv, probs, heads, scale) = ops.state;
                let s = attention_shape(&qkv, heads);
                let dqkv = cpu::attention_backward(
                    &values(&qkv),
                    &values(&probs),
                    &values(&grad),
                    s,
                    scale,
                );
                grads.register::<Flex>(node.id, tensor(dqkv, shape(&qkv)));
            }
        }

        let guards = [qkv.node()];
        let qkv = qkv.into_primitive();
        let (out, probs) = attention_forward(&qkv, heads, scale);
        match AttentionBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((qkv, probs, heads, scale), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl Backward<Flex, 1> for GeluBackward {
            type State = FlexTensor;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let Some(node) = node else { return };
                let x = ops.state;
                let dx = cpu::gelu_backward(&values(&x), &values(&grad));
                grads.register::<Flex>(node.id, tensor(dx, shape(&x)));
            }
        }

        let guards = [x.node()];
        let x = x.into_primitive();
        let y = tensor(cpu::gelu(&values(&x)), shape(&x));
        match GeluBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(x, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}
