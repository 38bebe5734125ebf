//! The fused kernels on plain f32 slices: LayerNorm, multi-head self-attention on a packed qkv
//! projection, and exact (erf) GELU, each with its backward pass.
//!
//! Every kernel is written as straight loops over contiguous rows so that the compiler
//! vectorises them; [`multiversion!`] compiles each one twice (portable SSE2 and AVX2 + FMA) and
//! picks at run time, so a binary built for any x86-64 uses the wide units where they exist.
//!
//! Work is split into chunks whose boundaries depend only on the shapes (never on the number of
//! threads), and partial sums are combined in chunk order: the results are bit-identical whatever
//! rayon pool runs them. That is what lets simulated clients train on any number of workers with
//! identical updates.

use rayon::prelude::*;

/// Compiles `fn name(args) -> ret { body }` twice, portable and with AVX2 + FMA enabled, and
/// dispatches at run time on the detected CPU features. Helpers called from the body should be
/// `#[inline(always)]` so they are compiled with the caller's features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for (checked above).
                    return unsafe { wide($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            portable($($arg),*)
        }
    };
}

/// Rows per parallel task of the row-wise kernels (fixed, so results never depend on threads).
const ROWS_PER_TASK: usize = 64;
/// Elements per parallel task of the elementwise kernels.
const ELEMS_PER_TASK: usize = 16 * 1024;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators: vectorisable without reassociating a single sum.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l];
        }
    }
    let mut tail = 0.0f32;
    for &v in &a[chunks * 8..] {
        tail += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(a[c * 8 + l]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for &v in &a[chunks * 8..] {
        m = m.max(v);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

multiversion! {
    fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], stats: &mut [f32]) {
        let d = w.len();
        for ((x, y), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats.chunks_exact_mut(2)) {
            let mean = sum(x) / d as f32;
            let mut acc = [0.0f32; 8];
            let chunks = d / 8;
            for c in 0..chunks {
                for l in 0..8 {
                    let v = x[c * 8 + l] - mean;
                    acc[l] += v * v;
                }
            }
            let mut tail = 0.0f32;
            for &v in &x[chunks * 8..] {
                tail += (v - mean) * (v - mean);
            }
            let var = (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
            st[0] = mean;
            st[1] = rstd;
        }
    }
}

/// LayerNorm over the last axis of `x` (`rows x d`, `d = w.len()`): returns `y` and per row
/// `(mean, 1/sqrt(var + eps))` (biased variance, as PyTorch).
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rows = x.len() / d;
    let mut y = vec![0.0f32; x.len()];
    let mut stats = vec![0.0f32; rows * 2];
    y.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(stats.par_chunks_mut(ROWS_PER_TASK * 2))
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|((y, st), x)| layer_norm_rows(x, w, b, eps, y, st));
    (y, stats)
}

multiversion! {
    fn layer_norm_backward_rows(
        x: &[f32], w: &[f32], stats: &[f32], g: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32],
    ) {
        let d = w.len();
        let mut gw = vec![0.0f32; d];
        let mut xhat = vec![0.0f32; d];
        for (((x, g), dx), st) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(stats.chunks_exact(2)) {
            let (mean, rstd) = (st[0], st[1]);
            for i in 0..d {
                xhat[i] = (x[i] - mean) * rstd;
                gw[i] = g[i] * w[i];
                dw[i] += g[i] * xhat[i];
                db[i] += g[i];
            }
            let a = sum(&gw) / d as f32;
            let c = dot(&gw, &xhat) / d as f32;
            for i in 0..d {
                dx[i] = rstd * (gw[i] - a - xhat[i] * c);
            }
        }
    }
}

/// Backward of [`layer_norm`]: `(dx, dw, db)` from the upstream gradient `g`.
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    stats: &[f32],
    g: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0.0f32; x.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .zip(g.par_chunks(ROWS_PER_TASK * d))
        .zip(stats.par_chunks(ROWS_PER_TASK * 2))
        .map(|(((dx, x), g), st)| {
            let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
            layer_norm_backward_rows(x, w, st, g, dx, &mut dw, &mut db);
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pw, pb) in &partials {
        for i in 0..d {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
    (dx, dw, db)
}

// ---------------------------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------------------------

/// Rows of one parallel task of the Linear kernels (fixed, so results never depend on threads).
const GEMM_ROWS: usize = 128;
/// Output columns of one parallel task of the weight gradient.
const GEMM_COLS: usize = 64;

/// A row-major operand for [`gemm`]: its base pointer and (row, column) strides.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

// SAFETY: a `View` is only read, by `gemm`, while the slice it was made from is borrowed.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn rows(m: &[f32], cols: usize) -> Self {
        Self {
            ptr: m.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[rows x cols]` matrix.
    fn transposed(m: &[f32], cols: usize) -> Self {
        Self {
            ptr: m.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }

    /// The view starting `rows` rows and `cols` columns further.
    fn offset(self, rows: usize, cols: usize) -> Self {
        // SAFETY: callers stay inside the matrix the view was made from.
        let ptr = unsafe {
            self.ptr
                .offset(rows as isize * self.rs + cols as isize * self.cs)
        };
        Self { ptr, ..self }
    }
}

/// `dst (+)= a[m x k] b[k x n]` on one thread through the `gemm` crate; `dst` is row-major with
/// row stride `ldd` (accumulates onto it when `accumulate`).
fn gemm(
    dst: &mut [f32],
    ldd: usize,
    (m, k, n): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * ldd + n, "gemm output size");
    // SAFETY: `dst` covers m rows of stride `ldd` and n columns (asserted); the callers build `a`
    // and `b` from slices of at least m x k and k x n values with these strides, which outlive
    // the call.
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm_crate::Parallelism::None,
        );
    }
}

/// `dst[m x n] (+)= a[m x k] b[k x n]`, row blocks of [`GEMM_ROWS`] in parallel.
fn gemm_rows(
    dst: &mut [f32],
    (_m, k, n): (usize, usize, usize),
    a: View,
    b: View,
    accumulate: bool,
) {
    dst.par_chunks_mut(GEMM_ROWS * n)
        .enumerate()
        .for_each(|(i, block)| {
            let rows = block.len() / n;
            gemm(
                block,
                n,
                (rows, k, n),
                a.offset(i * GEMM_ROWS, 0),
                b,
                accumulate,
            );
        });
}

/// `y = x W + b` for `x` `[m x k]`, `W` `[k x n]` (burn's and timm-import layout), `b` `[n]`: the
/// bias rows are written first and the product accumulated onto them, one pass fewer than a
/// matmul followed by a broadcast add.
pub fn linear(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let k = w.len() / n;
    let m = x.len() / k;
    assert_eq!(x.len(), m * k, "linear input is not a whole number of rows");
    let mut y = Vec::with_capacity(m * n);
    for _ in 0..m {
        y.extend_from_slice(b);
    }
    gemm_rows(&mut y, (m, k, n), View::rows(x, k), View::rows(w, n), true);
    y
}

/// Which gradients of [`linear`] to compute.
#[derive(Clone, Copy, Debug)]
pub struct LinearGrads {
    /// `dx = g W^T`.
    pub x: bool,
    /// `dW = x^T g`.
    pub weight: bool,
    /// `db = sum over rows of g`.
    pub bias: bool,
}

/// Backward of [`linear`] for the upstream gradient `g` (`[m x n]`).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    n: usize,
    need: LinearGrads,
) -> [Option<Vec<f32>>; 3] {
    let k = w.len() / n;
    let m = x.len() / k;
    let dx = need.x.then(|| {
        let mut dx = vec![0.0f32; m * k];
        gemm_rows(
            &mut dx,
            (m, n, k),
            View::rows(g, n),
            View::transposed(w, n),
            false,
        );
        dx
    });
    let dw = need.weight.then(|| {
        // Column blocks of dW = x^T g in parallel: each is a whole reduction over the m rows.
        let (xt, gv) = (View::transposed(x, k), View::rows(g, n));
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(GEMM_COLS))
            .into_par_iter()
            .map(|j| {
                let cols = GEMM_COLS.min(n - j * GEMM_COLS);
                let mut block = vec![0.0f32; k * cols];
                gemm(
                    &mut block,
                    cols,
                    (k, m, cols),
                    xt,
                    gv.offset(0, j * GEMM_COLS),
                    false,
                );
                block
            })
            .collect();
        let mut dw = vec![0.0f32; k * n];
        for (j, block) in blocks.iter().enumerate() {
            let cols = block.len() / k;
            for (row, src) in dw.chunks_exact_mut(n).zip(block.chunks_exact(cols)) {
                row[j * GEMM_COLS..j * GEMM_COLS + cols].copy_from_slice(src);
            }
        }
        dw
    });
    let db = need.bias.then(|| {
        let partials: Vec<Vec<f32>> = g
            .par_chunks(ROWS_PER_TASK * n)
            .map(|rows| column_sums(rows, n))
            .collect();
        let mut db = vec![0.0f32; n];
        for p in &partials {
            for (d, v) in db.iter_mut().zip(p) {
                *d += v;
            }
        }
        db
    });
    [dx, dw, db]
}

multiversion! {
    fn column_sums(rows: &[f32], n: usize) -> Vec<f32> {
        let mut acc = vec![0.0f32; n];
        for row in rows.chunks_exact(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Shape of a packed multi-head self-attention: `qkv` is `[batch, tokens, 3 * dim]` with the
/// query, key and value blocks of `dim` each (timm's layout), heads of `dim / heads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Sequence length.
    pub tokens: usize,
    /// Model width.
    pub dim: usize,
    /// Number of heads.
    pub heads: usize,
}

impl AttentionShape {
    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

/// Rows of the register tile of [`tile_matmul`].
const MR: usize = 4;
/// Columns of the register tile of [`tile_matmul`].
const NR: usize = 16;

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// `out[m x n] = a[m x k] b[k x n]` for row-major operands with leading dimensions `lda`, `ldb`,
/// `ldo`; `m` a multiple of [`MR`], `n` of [`NR`] (callers zero-pad). A 4 x 16 register tile
/// (eight 8-lane accumulators) over the whole `k`: the operands of one head fit in L1, so this is
/// all the blocking needed. Plain multiply and add (no FMA contraction), so every CPU gives the
/// same bits.
#[inline(always)]
fn tile_matmul(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    ldo: usize,
    (m, k, n): (usize, usize, usize),
) {
    debug_assert!(m % MR == 0 && n % NR == 0);
    for i in (0..m).step_by(MR) {
        for j in (0..n).step_by(NR) {
            let mut acc = [[0.0f32; NR]; MR];
            for kk in 0..k {
                let brow: &[f32; NR] = b[kk * ldb + j..kk * ldb + j + NR].try_into().unwrap();
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = a[(i + r) * lda + kk];
                    for l in 0..NR {
                        acc[l] += av * brow[l];
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                out[(i + r) * ldo + j..(i + r) * ldo + j + NR].copy_from_slice(acc);
            }
        }
    }
}

/// `dst[cols x rows] = src[rows x cols]^T` (leading dimensions `lds`, `ldd`).
#[inline(always)]
fn transpose(src: &[f32], lds: usize, dst: &mut [f32], ldd: usize, rows: usize, cols: usize) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * ldd + r] = src[r * lds + c];
        }
    }
}

/// Per-sample scratch of the attention kernels: every operand of one head, zero-padded to the
/// tile sizes (`tm` rows a multiple of [`MR`], `tn` and `hp` multiples of [`NR`]).
struct Scratch {
    t: usize,
    hd: usize,
    tm: usize,
    tn: usize,
    hp: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    p: Vec<f32>,
    pt: Vec<f32>,
    o: Vec<f32>,
}

impl Scratch {
    fn new(s: AttentionShape) -> Self {
        let (t, hd) = (s.tokens, s.head_dim());
        let (tm, tn, hp) = (round_up(t, MR), round_up(t, NR), round_up(hd, NR));
        let z = |n: usize| vec![0.0f32; n];
        Self {
            t,
            hd,
            tm,
            tn,
            hp,
            q: z(tn * hp),
            k: z(tn * hp),
            v: z(tn * hp),
            kt: z(hp * tn),
            vt: z(hp * tn),
            p: z(tn * tn),
            pt: z(tn * tm),
            o: z(tn * hp),
        }
    }

    /// Copies head `h` of block `block` (0 q, 1 k, 2 v) of one sample's `[T, 3D]` rows into
    /// `out` (`[T x hp]`, padding left at zero).
    #[inline(always)]
    fn gather(
        qkv: &[f32],
        dim: usize,
        hd: usize,
        hp: usize,
        block: usize,
        h: usize,
        out: &mut [f32],
    ) {
        let off = block * dim + h * hd;
        for (t, row) in qkv.chunks_exact(3 * dim).enumerate() {
            out[t * hp..t * hp + hd].copy_from_slice(&row[off..off + hd]);
        }
    }

    fn load(&mut self, qkv: &[f32], dim: usize, h: usize) {
        let (hd, hp, t, tn) = (self.hd, self.hp, self.t, self.tn);
        Self::gather(qkv, dim, hd, hp, 0, h, &mut self.q);
        Self::gather(qkv, dim, hd, hp, 1, h, &mut self.k);
        Self::gather(qkv, dim, hd, hp, 2, h, &mut self.v);
        transpose(&self.k, hp, &mut self.kt, tn, t, hd);
        transpose(&self.v, hp, &mut self.vt, tn, t, hd);
    }
}

multiversion! {
    fn attention_sample(qkv: &[f32], s: AttentionShape, scale: f32, out: &mut [f32], probs: &mut [f32]) {
        let mut w = Scratch::new(s);
        let (t, hd, tm, tn, hp) = (w.t, w.hd, w.tm, w.tn, w.hp);
        for h in 0..s.heads {
            w.load(qkv, s.dim, h);
            // Scores S = Q K^T, then a row softmax in place (padding columns left at zero).
            tile_matmul(&w.q, hp, &w.kt, tn, &mut w.p, tn, (tm, hp, tn));
            for i in 0..t {
                let row = &mut w.p[i * tn..i * tn + tn];
                // Separate passes, so that each one vectorises (no loop-carried reduction
                // around the exponential).
                for x in row[..t].iter_mut() {
                    *x *= scale;
                }
                let max = max(&row[..t]);
                for x in row[..t].iter_mut() {
                    *x = exp(*x - max);
                }
                let inv = 1.0 / sum(&row[..t]);
                for x in row[..t].iter_mut() {
                    *x *= inv;
                }
                row[t..].fill(0.0);
                probs[(h * t + i) * t..(h * t + i + 1) * t].copy_from_slice(&row[..t]);
            }
            for row in w.p[t * tn..tm * tn].chunks_exact_mut(tn) {
                row.fill(0.0);
            }
            // O = P V.
            tile_matmul(&w.p, tn, &w.v, hp, &mut w.o, hp, (tm, tn, hp));
            for i in 0..t {
                out[i * s.dim + h * hd..i * s.dim + (h + 1) * hd].copy_from_slice(&w.o[i * hp..i * hp + hd]);
            }
        }
    }
}

/// `softmax(q k^T * scale) v` per head on packed `qkv` (`[B, T, 3D]`): returns the merged output
/// `[B, T, D]` and the attention probabilities `[B, H, T, T]` (kept for the backward pass).
pub fn attention(qkv: &[f32], s: AttentionShape, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let (t, d) = (s.tokens, s.dim);
    let mut out = vec![0.0f32; s.batch * t * d];
    let mut probs = vec![0.0f32; s.batch * s.heads * t * t];
    out.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(s.heads * t * t))
        .zip(qkv.par_chunks(t * 3 * d))
        .for_each(|((out, probs), qkv)| attention_sample(qkv, s, scale, out, probs));
    (out, probs)
}

multiversion! {
    fn attention_backward_sample(
        qkv: &[f32], probs: &[f32], g: &[f32], s: AttentionShape, scale: f32, dqkv: &mut [f32],
    ) {
        let mut w = Scratch::new(s);
        let (t, hd, tm, tn, hp, d) = (w.t, w.hd, w.tm, w.tn, w.hp, s.dim);
        let mut go = vec![0.0f32; tn * hp];
        let mut dp = vec![0.0f32; tn * tn];
        let mut dst = vec![0.0f32; tn * tm];
        let mut dq = vec![0.0f32; tn * hp];
        let mut dk = vec![0.0f32; tn * hp];
        let mut dv = vec![0.0f32; tn * hp];
        for h in 0..s.heads {
            w.load(qkv, d, h);
            for i in 0..t {
                w.p[i * tn..i * tn + t].copy_from_slice(&probs[(h * t + i) * t..(h * t + i + 1) * t]);
                go[i * hp..i * hp + hd].copy_from_slice(&g[i * d + h * hd..i * d + (h + 1) * hd]);
            }
            // dP = dO V^T; dS = P (dP - rowsum(P dP)) * scale.
            tile_matmul(&go, hp, &w.vt, tn, &mut dp, tn, (tm, hp, tn));
            for i in 0..t {
                let (pi, dpi) = (&w.p[i * tn..i * tn + t], &mut dp[i * tn..i * tn + tn]);
                let inner = dot(pi, &dpi[..t]);
                for j in 0..t {
                    dpi[j] = pi[j] * (dpi[j] - inner) * scale;
                }
                dpi[t..].fill(0.0);
            }
            for row in dp[t * tn..tm * tn].chunks_exact_mut(tn) {
                row.fill(0.0);
            }
            // dQ = dS K, dK = dS^T Q, dV = P^T dO.
            tile_matmul(&dp, tn, &w.k, hp, &mut dq, hp, (tm, tn, hp));
            transpose(&dp, tn, &mut dst, tm, tm, tn);
            tile_matmul(&dst, tm, &w.q, hp, &mut dk, hp, (tn, tm, hp));
            transpose(&w.p, tn, &mut w.pt, tm, tm, tn);
            tile_matmul(&w.pt, tm, &go, hp, &mut dv, hp, (tn, tm, hp));
            for i in 0..t {
                let row = &mut dqkv[i * 3 * d..(i + 1) * 3 * d];
                row[h * hd..(h + 1) * hd].copy_from_slice(&dq[i * hp..i * hp + hd]);
                row[d + h * hd..d + (h + 1) * hd].copy_from_slice(&dk[i * hp..i * hp + hd]);
                row[2 * d + h * hd..2 * d + (h + 1) * hd].copy_from_slice(&dv[i * hp..i * hp + hd]);
            }
        }
    }
}

/// Backward of [`attention`]: the gradient with respect to the packed `qkv`, from the upstream
/// gradient `g` of the merged output.
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    g: &[f32],
    s: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    let (t, d) = (s.tokens, s.dim);
    let mut dqkv = vec![0.0f32; qkv.len()];
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(qkv.par_chunks(t * 3 * d))
        .zip(probs.par_chunks(s.heads * t * t))
        .zip(g.par_chunks(t * d))
        .for_each(|(((dqkv, qkv), probs), g)| {
            attention_backward_sample(qkv, probs, g, s, scale, dqkv)
        });
    dqkv
}

// ---------------------------------------------------------------------------------------------
// GELU
// ---------------------------------------------------------------------------------------------

/// `e^x` in f32 without a libm call (so loops over it vectorise): Cody-Waite range reduction to
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, and Cephes' degree-7 polynomial for `e^r`; relative error
/// about 1 ulp on the range used here. Inputs below -87 flush to 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `(Phi(x), phi(x))` of the standard normal: `erf` by Abramowitz and Stegun 7.1.26 (absolute
/// error below 1.5e-7, the formula PyTorch's vectorised CPU GELU uses).
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = exp(-a * a);
    let erf_abs = 1.0 - poly * e;
    let erf = if z < 0.0 { -erf_abs } else { erf_abs };
    // phi(x) = exp(-x^2/2) / sqrt(2 pi) = e / sqrt(2 pi).
    (0.5 * (1.0 + erf), e * 0.398_942_3)
}

multiversion! {
    fn gelu_chunk(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * normal_cdf_pdf(x).0;
        }
    }
}

multiversion! {
    fn gelu_with_derivative_chunk(x: &[f32], y: &mut [f32], d: &mut [f32]) {
        for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            let (cdf, pdf) = normal_cdf_pdf(x);
            *y = x * cdf;
            *d = cdf + x * pdf;
        }
    }
}

multiversion! {
    fn mul_chunk(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = a * b;
        }
    }
}

/// Exact GELU, `x Phi(x)`.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(y, x)| gelu_chunk(x, y));
    y
}

/// [`gelu`] and its derivative `Phi(x) + x phi(x)` in one pass (the derivative is what the
/// backward pass needs, so it is kept instead of `x`).
pub fn gelu_with_derivative(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0f32; x.len()];
    let mut d = vec![0.0f32; x.len()];
    y.par_chunks_mut(ELEMS_PER_TASK)
        .zip(d.par_chunks_mut(ELEMS_PER_TASK))
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|((y, d), x)| gelu_with_derivative_chunk(x, y, d));
    (y, d)
}

/// Elementwise `a * b` (the GELU backward pass: upstream gradient times the kept derivative).
pub fn mul(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(a.par_chunks(ELEMS_PER_TASK))
        .zip(b.par_chunks(ELEMS_PER_TASK))
        .for_each(|((o, a), b)| mul_chunk(a, b, o));
    out
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// One decoupled-weight-decay Adam step, the same f32 operations in the same order as burn's
/// `AdamW` (so the result is bit-identical to it):
/// `m = m b1 + g (1-b1); v = v b2 + g^2 (1-b2);
/// p = p decay - ((m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)) lr`, with `decay = 1 - lr wd`.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (informational: `decay` carries it).
    pub weight_decay: f32,
    /// `1 - lr * weight_decay`, rounded once from f64 as burn does.
    pub decay: f32,
    /// Step number, from 1.
    pub t: i32,
}

multiversion! {
    fn adamw_chunk(step: AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (f1, f2) = (1.0 - step.beta1, 1.0 - step.beta2);
        let c1 = 1.0 - step.beta1.powi(step.t);
        let c2 = 1.0 - step.beta2.powi(step.t);
        for i in 0..p.len() {
            let gi = g[i];
            let mi = m[i] * step.beta1 + gi * f1;
            let vi = v[i] * step.beta2 + (gi * gi) * f2;
            m[i] = mi;
            v[i] = vi;
            let delta = (mi / c1) / ((vi / c2).sqrt() + step.eps);
            p[i] = p[i] * step.decay - delta * step.lr;
        }
    }
}

/// Applies [`AdamWStep`] in place to a parameter, its gradient and its two moments.
pub fn adamw(step: AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    p.par_chunks_mut(ELEMS_PER_TASK)
        .zip(g.par_chunks(ELEMS_PER_TASK))
        .zip(m.par_chunks_mut(ELEMS_PER_TASK))
        .zip(v.par_chunks_mut(ELEMS_PER_TASK))
        .for_each(|(((p, g), m), v)| adamw_chunk(step, p, g, m, v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_and_value_stats_match_scalar_loops_bit_for_bit() {
        // Odd lengths, so the tails are exercised; values of every magnitude.
        let v: Vec<f32> = (0..1003)
            .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 9 - 4))
            .collect();
        let mut acc: Vec<f32> = v.iter().map(|x| x * 0.5 + 1.0).collect();
        let mut expected = acc.clone();
        for (a, x) in expected.iter_mut().zip(&v) {
            *a += 0.3 * *x;
        }
        scaled_add(&mut acc, &v, 0.3);
        assert!(
            acc.iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );

        let (mut sq, mut max) = ([0f64; 8], [0u32; 8]);
        squares_and_max_bits(&v, &mut sq, &mut max);
        let (mut esq, mut emax) = ([0f64; 8], [0u32; 8]);
        for (i, &x) in v.iter().enumerate() {
            let lane = if i < v.len() / 8 * 8 { i % 8 } else { 0 };
            esq[lane] += f64::from(x) * f64::from(x);
            emax[lane] = emax[lane].max(x.to_bits() & 0x7fff_ffff);
        }
        assert_eq!(sq.map(f64::to_bits), esq.map(f64::to_bits));
        assert_eq!(max, emax);
        // A NaN anywhere is the largest magnitude (non-finite).
        let mut bad = v.clone();
        bad[517] = f32::NAN;
        let (mut sq, mut max) = ([0f64; 8], [0u32; 8]);
        squares_and_max_bits(&bad, &mut sq, &mut max);
        assert!(max.into_iter().max().unwrap() > f32::INFINITY.to_bits());
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f32;
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn cdf_matches_erf_reference() {
        // Phi at a few points (values from the standard normal table, 9 digits).
        for (x, phi) in [
            (0.0f32, 0.5f64),
            (1.0, 0.841_344_746),
            (-1.0, 0.158_655_254),
            (2.5, 0.993_790_335),
            (-3.0, 0.001_349_898),
        ] {
            let got = normal_cdf_pdf(x).0 as f64;
            assert!((got - phi).abs() < 2e-7, "Phi({x}) = {got}, expected {phi}");
        }
    }
}

multiversion! {
    /// `acc[i] += w * v[i]`: a multiply then an add (no FMA), so the same bits on every CPU.
    /// The coordinator's FedAvg fold.
    pub fn scaled_add(acc: &mut [f32], v: &[f32], w: f32) {
        for (a, x) in acc.iter_mut().zip(v) {
            *a += w * *x;
        }
    }
}

multiversion! {
    /// Adds `data`'s squares (in f64) to eight lanes and keeps each lane's largest magnitude as
    /// bits (`|v|`'s bits order like `|v|`; NaN and infinity are the largest), value `i` of
    /// every eight to lane `i`, the tail to lane 0: the same result on every CPU.
    pub fn squares_and_max_bits(data: &[f32], sq: &mut [f64; 8], max: &mut [u32; 8]) {
        let lanes = data.chunks_exact(8);
        let tail = lanes.remainder();
        for c in lanes {
            for i in 0..8 {
                let v = f64::from(c[i]);
                sq[i] += v * v;
                max[i] = max[i].max(c[i].to_bits() & 0x7fff_ffff);
            }
        }
        for &v in tail {
            sq[0] += f64::from(v) * f64::from(v);
            max[0] = max[0].max(v.to_bits() & 0x7fff_ffff);
        }
    }
}
