//! The fused operations on burn's Flex backend, and their autodiff nodes: each fused operation is
//! one node of the autodiff graph whose backward pass is one fused kernel (instead of the dozen
//! elementwise nodes burn's composition records).

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape, TensorData};
use burn_autodiff::Autodiff;
use burn_autodiff::NodeId;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, unary};
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

fn linear_forward(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let mut dims = shape(x);
    let last = dims.num_dims() - 1;
    dims[last] = b.layout().num_elements();
    tensor(cpu::linear(&values(x), &values(w), &values(b)), dims)
}

impl FusedOps for Flex {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        linear_forward(&x, &weight, &bias)
    }

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
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBackward;

        impl Backward<Flex, 3> for LinearBackward {
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x, w) = ops.state;
                let w_shape = shape(&w);
                let n = w_shape[1];
                let need = cpu::LinearGrads {
                    x: node_x.is_some(),
                    weight: node_w.is_some(),
                    bias: node_b.is_some(),
                };
                let [dx, dw, db] =
                    cpu::linear_backward(&values(&x), &values(&w), &values(&grad), n, need);
                let out = [
                    dx.map(|v| tensor(v, shape(&x))),
                    dw.map(|v| tensor(v, w_shape)),
                    db.map(|v| tensor(v, Shape::from([n]))),
                ];
                register(
                    [node_x, node_w, node_b].map(|n| n.map(|n| n.id)),
                    out,
                    grads,
                );
            }
        }

        ternary_node::<C, _>(LinearBackward, [x, weight, bias], |[x, w, b]| {
            (linear_forward(x, w, b), (x.clone(), w.clone()))
        })
    }

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
                let out = [
                    Some(tensor(dx, shape(&x))),
                    Some(tensor(dw, Shape::from([d]))),
                    Some(tensor(db, Shape::from([d]))),
                ];
                register(
                    [node_x, node_w, node_b].map(|n| n.map(|n| n.id)),
                    out,
                    grads,
                );
            }
        }

        ternary_node::<C, _>(LayerNormBackward, [x, weight, bias], |[x, w, b]| {
            let (y, stats) = layer_norm_forward(x, w, b, eps);
            (y, (x.clone(), w.clone(), stats))
        })
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
                let (qkv, probs, heads, scale) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                    let s = attention_shape(&qkv, heads);
                    let (qkv_v, probs, grad) = (values(&qkv), values(&probs), values(&grad));
                    let dqkv = cpu::attention_backward(&qkv_v, &probs, &grad, s, scale);
                    tensor(dqkv, shape(&qkv))
                });
            }
        }

        unary_node::<C, _>(AttentionBackward, qkv, |qkv| {
            let (out, probs) = attention_forward(qkv, heads, scale);
            (out, (qkv.clone(), probs, heads, scale))
        })
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
                let derivative = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                    let dx = cpu::mul(&values(&grad), &values(&derivative));
                    tensor(dx, shape(&derivative))
                });
            }
        }

        unary_node::<C, _>(GeluBackward, x, |x| {
            let (y, d) = cpu::gelu_with_derivative(&values(x));
            (tensor(y, shape(x)), tensor(d, shape(x)))
        })
    }
}

/// Registers the gradients of the tracked parents.
fn register(parents: [Option<NodeId>; 3], out: [Option<FlexTensor>; 3], grads: &mut Gradients) {
    for (id, grad) in parents.into_iter().zip(out) {
        if let (Some(id), Some(grad)) = (id, grad) {
            grads.register::<Flex>(id, grad);
        }
    }
}

/// Records a three-input fused operation (see [`unary_node`]).
fn ternary_node<C, B>(
    backward: B,
    inputs: [FloatTensor<Autodiff<Flex, C>>; 3],
    forward: impl FnOnce([&FlexTensor; 3]) -> (FlexTensor, B::State),
) -> FloatTensor<Autodiff<Flex, C>>
where
    C: CheckpointStrategy,
    B: Backward<Flex, 3>,
{
    let guards = inputs.each_ref().map(|t| t.node());
    let [a, b, c] = inputs.map(|t| t.into_primitive());
    let (out, state) = forward([&a, &b, &c]);
    match backward.prepare::<C>(guards).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Records a one-input fused operation: `forward` computes the output and what `backward` keeps
/// (kept only when the input is tracked).
fn unary_node<C, B>(
    backward: B,
    input: FloatTensor<Autodiff<Flex, C>>,
    forward: impl FnOnce(&FlexTensor) -> (FlexTensor, B::State),
) -> FloatTensor<Autodiff<Flex, C>>
where
    C: CheckpointStrategy,
    B: Backward<Flex, 1>,
{
    let guards = [input.node()];
    let (out, state) = forward(&input.into_primitive());
    match backward.prepare::<C>(guards).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
