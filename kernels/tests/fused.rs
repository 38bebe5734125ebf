//! Each fused kernel against burn's unfused composition (forward values and every input
//! gradient) and against central finite differences of its own forward pass. The relative errors
//! are printed (`cargo test -p mjpfl-kernels -- --nocapture`).

use burn::backend::Dispatch;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use mjpfl_kernels::{FusedAdamW, FusedOps, reference};

fn device() -> Device {
    Device::flex().autodiff()
}

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().try_to_vec::<f32>().unwrap()
}

/// `||a - b|| / ||b||`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Normal values from a seeded xorshift generator (not burn's global RNG, which tests running in
/// parallel would share).
fn random<const D: usize>(shape: [usize; D], seed: u64, scale: f64) -> Tensor<D> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &device())
}

fn fused_linear(x: Tensor<3>, w: Tensor<2>, b: Tensor<1>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
    ))
}

fn fused_layer_norm(x: Tensor<3>, w: Tensor<1>, b: Tensor<1>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
        1e-6,
    ))
}

fn fused_attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    let hd = qkv.dims()[2] / 3 / heads;
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        qkv.into_dispatch(),
        heads,
        (hd as f32).powf(-0.5),
    ))
}

fn fused_gelu(x: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

/// Directional finite difference of `sum(f(x) * r)` along `v` against `<grad, v>`.
fn fd_check(f: &dyn Fn(Tensor<3>) -> Tensor<3>, x: &Tensor<3>, r: &Tensor<3>, grad: &[f32]) -> f64 {
    let v = random(x.dims(), 99, 1.0).detach();
    let h = 1e-2;
    let loss = |x: Tensor<3>| -> f64 { values(&(f(x) * r.clone()).sum())[0] as f64 };
    let plus = loss(x.clone().detach() + v.clone().mul_scalar(h));
    let minus = loss(x.clone().detach() - v.clone().mul_scalar(h));
    let fd = (plus - minus) / (2.0 * h);
    let analytic: f64 = grad
        .iter()
        .zip(values(&v))
        .map(|(g, v)| (*g as f64) * (v as f64))
        .sum();
    ((fd - analytic) / analytic.abs().max(1e-12)).abs()
}

#[test]
fn linear_matches_burn_and_finite_differences() {
    // Small (single-threaded gemm) and large enough for gemm's parallel path.
    for (b, t, k, n) in [(3, 7, 20, 36), (16, 50, 64, 256)] {
        let x = random([b, t, k], 50 + t as u64, 1.0).require_grad();
        let w = random([k, n], 51, 0.2).require_grad();
        let bias = random([n], 52, 0.5).require_grad();
        let r = random([b, t, n], 53, 1.0).detach();
        let run = |fused: bool| {
            let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
            let y = if fused {
                fused_linear(x.clone(), w.clone(), bias.clone())
            } else {
                reference::linear(x.clone(), w.clone(), Some(bias.clone()))
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            (
                values(&y),
                values(&x.grad(&grads).unwrap()),
                values(&w.grad(&grads).unwrap()),
                values(&bias.grad(&grads).unwrap()),
            )
        };
        let (yf, dxf, dwf, dbf) = run(true);
        let (yr, dxr, dwr, dbr) = run(false);
        let errs = [
            rel(&yf, &yr),
            rel(&dxf, &dxr),
            rel(&dwf, &dwr),
            rel(&dbf, &dbr),
        ];
        println!(
            "linear [{b},{t},{k}]x[{k},{n}] vs burn: y {:.1e} dx {:.1e} dw {:.1e} db {:.1e}",
            errs[0], errs[1], errs[2], errs[3]
        );
        for e in errs {
            assert!(e < 1e-5, "linear differs from burn's: {errs:?}");
        }
        let fd = fd_check(
            &|x| fused_linear(x, w.clone().detach(), bias.clone().detach()),
            &x,
            &r,
            &dxf,
        );
        println!("linear vs finite differences (dx): {fd:.1e}");
        assert!(fd < 1e-2, "finite differences: {fd}");
    }
}

#[test]
fn layer_norm_matches_burn_and_finite_differences() {
    let (b, t, d) = (5, 13, 72);
    let x = random([b, t, d], 1, 2.0).add_scalar(0.7).require_grad();
    let w = random([d], 2, 1.0).add_scalar(1.0).require_grad();
    let bias = random([d], 3, 0.5).require_grad();
    let r = random([b, t, d], 4, 1.0).detach();

    let run = |fused: bool| {
        let (x, w, bias) = (x.clone(), w.clone(), bias.clone());
        let y = if fused {
            fused_layer_norm(x.clone(), w.clone(), bias.clone())
        } else {
            reference::layer_norm(x.clone(), w.clone(), bias.clone(), 1e-6)
        };
        let grads = (y.clone() * r.clone()).sum().backward();
        (
            values(&y),
            values(&x.grad(&grads).unwrap()),
            values(&w.grad(&grads).unwrap()),
            values(&bias.grad(&grads).unwrap()),
        )
    };
    let (yf, dxf, dwf, dbf) = run(true);
    let (yr, dxr, dwr, dbr) = run(false);
    let errs = [
        rel(&yf, &yr),
        rel(&dxf, &dxr),
        rel(&dwf, &dwr),
        rel(&dbf, &dbr),
    ];
    println!(
        "layer_norm vs burn: y {:.1e} dx {:.1e} dw {:.1e} db {:.1e}",
        errs[0], errs[1], errs[2], errs[3]
    );
    for e in errs {
        assert!(e < 1e-5, "layer_norm differs from burn's: {errs:?}");
    }
    let fd = fd_check(
        &|x| fused_layer_norm(x, w.clone().detach(), bias.clone().detach()),
        &x,
        &r,
        &dxf,
    );
    println!("layer_norm vs finite differences (dx): {fd:.1e}");
    assert!(fd < 1e-2, "finite differences: {fd}");
}

#[test]
fn attention_matches_burn_and_finite_differences() {
    for (b, t, d, heads) in [(3, 50, 64, 4), (2, 17, 48, 3), (1, 5, 8, 1)] {
        let qkv = random([b, t, 3 * d], 10 + t as u64, 1.0).require_grad();
        let r = random([b, t, d], 11, 1.0).detach();
        let run = |fused: bool| {
            let qkv = qkv.clone();
            let y = if fused {
                fused_attention(qkv.clone(), heads)
            } else {
                reference::attention(qkv.clone(), heads)
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            (values(&y), values(&qkv.grad(&grads).unwrap()))
        };
        let (yf, gf) = run(true);
        let (yr, gr) = run(false);
        let (ey, eg) = (rel(&yf, &yr), rel(&gf, &gr));
        println!("attention [{b},{t},{d}] x{heads} vs burn: y {ey:.1e} dqkv {eg:.1e}");
        assert!(
            ey < 1e-5 && eg < 1e-5,
            "attention differs from burn's: {ey} {eg}"
        );
        let fd = fd_check(&|q| fused_attention(q, heads), &qkv, &r, &gf);
        println!("attention vs finite differences (dqkv): {fd:.1e}");
        assert!(fd < 1e-2, "finite differences: {fd}");
    }
}

#[test]
fn gelu_matches_burn_and_finite_differences() {
    let x = random([4, 9, 300], 20, 2.5).require_grad();
    let r = random([4, 9, 300], 21, 1.0).detach();
    let run = |fused: bool| {
        let x = x.clone();
        let y = if fused {
            fused_gelu(x.clone())
        } else {
            reference::gelu(x.clone())
        };
        let grads = (y.clone() * r.clone()).sum().backward();
        (values(&y), values(&x.grad(&grads).unwrap()))
    };
    let (yf, gf) = run(true);
    let (yr, gr) = run(false);
    let (ey, eg) = (rel(&yf, &yr), rel(&gf, &gr));
    println!("gelu vs burn: y {ey:.1e} dx {eg:.1e}");
    assert!(
        ey < 1e-6 && eg < 1e-6,
        "gelu differs from burn's: {ey} {eg}"
    );
    let fd = fd_check(&fused_gelu, &x, &r, &gf);
    println!("gelu vs finite differences (dx): {fd:.1e}");
    assert!(fd < 1e-2, "finite differences: {fd}");
}

#[test]
fn strided_inputs_are_handled() {
    // A transposed view must give the same result as its contiguous copy.
    let x = random([6, 8, 5], 30, 1.0);
    let view = x.clone().swap_dims(1, 2);
    let copy = Tensor::<3>::from_data(view.to_data(), &view.device());
    let a = values(&fused_gelu(view));
    let b = values(&fused_gelu(copy));
    assert_eq!(a, b);
}

#[derive(Module, Debug)]
struct Two {
    a: Param<Tensor<2>>,
    b: Param<Tensor<1>>,
}

#[test]
fn fused_adamw_is_bit_identical_to_burns() {
    let device = device();
    let init = |seed: u64| Two {
        a: Param::from_tensor(random([7, 33], seed, 1.0).detach()),
        b: Param::from_tensor(random([33], seed + 1, 1.0).detach()),
    };
    let mut fused = init(40);
    let mut burn_model = init(40);
    let mut opt_f = FusedAdamW::new(0.05, 1e-8).init();
    let mut opt_b = AdamWConfig::new()
        .with_weight_decay(0.05)
        .with_epsilon(1e-8)
        .init();
    for step in 0..5 {
        let target = Tensor::<2>::from_data(
            TensorData::new(
                (0..7 * 33)
                    .map(|i| ((i * 7 + step) % 11) as f32 / 5.0)
                    .collect(),
                [7, 33],
            ),
            &device,
        );
        let loss = |m: &Two| {
            ((m.a.val() - target.clone()).powi_scalar(2).sum() + m.b.val().powi_scalar(3).sum())
                .mul_scalar(0.5)
        };
        let gf = GradientsParams::from_grads(loss(&fused).backward(), &fused);
        let gb = GradientsParams::from_grads(loss(&burn_model).backward(), &burn_model);
        let lr = 1e-2 * (step + 1) as f64;
        fused = opt_f.step(lr, fused, gf);
        burn_model = opt_b.step(lr, burn_model, gb);
    }
    assert_eq!(values(&fused.a.val()), values(&burn_model.a.val()));
    assert_eq!(values(&fused.b.val()), values(&burn_model.b.val()));
    let _ = FusedAdamW::new(0.0, 1e-8).step::<1>(
        1e-3,
        Tensor::zeros([3], &device.clone().without_autodiff()),
        Tensor::ones([3], &device.without_autodiff()),
        None,
    );
}
