//! The optimisation loop of gradient-inversion attacks (Inverting Gradients, DLG, with an optional
//! PE-gradient term): find inputs whose parameter gradient matches the intercepted one.
//!
//! burn has first-order autodiff only, and the loop needs `d/dx f(grad_theta L(x))`. By the chain
//! rule that is `J^T v` with `v = df/dg` and `J = d grad_theta L / dx`, and
//! `J^T v = grad_x <v, grad_theta L(x, theta)> = d/de grad_x L(x, theta + e v)` at e = 0, taken
//! here by a central difference in parameter space (two extra backward passes), with
//! `e = fd_scale / |v|` (DESIGN.md: relative error ~6e-5 at 0.001 in f32). A test checks it
//! against finite differences in input space.

use std::time::Instant;

use mjp::VitConfig;
use mjp::jigsaw::{JigsawPlan, SamplePlan};
use mjp::params::NamedTensors;
use rand::Rng;

use crate::attack::{Attack, Knowledge, Reconstruction, Registration};
use crate::case::AttackCase;
use crate::error::Result;
use crate::objective::{Matching, Objective, PE};
use crate::regulariser::total_variation;
use crate::settings::AdversarySettings;
use crate::victim::Victim;

/// An optimisation attack's hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OptimisationConfig {
    /// Matching objective.
    pub objective: Objective,
    /// Total-variation weight.
    pub tv_weight: f64,
    /// Weight of the Gaussian prior `w mean_k (x_k - start_k)^2` towards the starting image
    /// (0 disables; without a starting image it does nothing).
    #[serde(default)]
    pub prior_weight: f64,
    /// Iterations per restart.
    pub iterations: usize,
    /// Adam learning rate (decayed x0.1 at 3/8, 5/8 and 7/8 of the iterations).
    pub lr: f64,
    /// Use the sign of the input gradient (Inverting Gradients' signed Adam).
    pub signed: bool,
    /// Independent restarts; the best by final objective is kept.
    pub restarts: usize,
    /// Fuse the restarts instead of keeping the best: every restart's images are matched to the
    /// best restart's by the best assignment (pixel MSE) and averaged, the fusion step of
    /// Yin et al.'s group consistency ("See through Gradients", CVPR 2021). Details that all
    /// restarts agree on stay; what each invents differently is averaged away.
    #[serde(default)]
    pub fuse_restarts: bool,
    /// Seed of the initialisations.
    pub seed: u64,
    /// MJP-aware: give the positions whose PE rows carry no gradient the unk PE in the
    /// attacker's forward pass (reconstructs what the model saw).
    pub adaptive: bool,
    /// Finite-difference scale in parameter space (`e = fd_scale / |v|`).
    pub fd_scale: f64,
    /// Start from the public dataset-mean image (plus noise) instead of pure noise.
    #[serde(default)]
    pub init_mean_image: bool,
    /// Passes of patch-owner refinement after the descent ([`swap_patches`]; 0 = none).
    #[serde(default)]
    pub patch_swap_passes: usize,
}

impl Default for OptimisationConfig {
    fn default() -> Self {
        Self::inverting_gradients(true)
    }
}

impl OptimisationConfig {
    /// Inverting Gradients (cosine + TV, signed Adam), with or without the PE-gradient term.
    pub fn inverting_gradients(pe_term: bool) -> Self {
        Self {
            objective: Objective {
                matching: Matching::Cosine,
                pe_weight: if pe_term { 30.0 } else { 0.0 },
                embed_weight: 0.0,
            },
            tv_weight: 1e-4,
            prior_weight: 0.0,
            iterations: 1000,
            lr: 0.035,
            signed: true,
            restarts: 1,
            fuse_restarts: false,
            seed: 0,
            adaptive: false,
            fd_scale: 1e-3,
            init_mean_image: true,
            patch_swap_passes: 0,
        }
    }

    /// DLG (squared L2, plain Adam), with or without the PE-gradient term.
    pub fn dlg(pe_term: bool) -> Self {
        Self {
            objective: Objective {
                matching: Matching::L2,
                pe_weight: if pe_term { 10.0 } else { 0.0 },
                embed_weight: 0.0,
            },
            tv_weight: 0.0,
            lr: 0.05,
            signed: false,
            ..Self::inverting_gradients(false)
        }
    }
}

/// What an optimisation attack produced.
#[derive(Clone, Debug)]
pub struct Optimised {
    /// Best images (B x C x H x W, in [0, 1]).
    pub images: Vec<f32>,
    /// Their matching objective (without TV).
    pub objective: f64,
    /// Objective of each restart's best.
    pub restart_objectives: Vec<f64>,
    /// Whether `images` fuse every restart (then `objective` is the best restart's).
    pub fused: bool,
    /// Iterations run in total.
    pub iterations: usize,
    /// Wall time.
    pub seconds: f64,
}

/// `J^T v = grad_x <v, grad_theta L(x)>` by a central difference in parameter space.
pub fn jacobian_transpose_vector(
    victim: &Victim,
    images: &[f32],
    labels: &[u32],
    plan: Option<&JigsawPlan>,
    v: &NamedTensors,
    fd_scale: f64,
) -> Result<Vec<f32>> {
    let norm = v.l2_norm();
    if norm == 0.0 {
        return Ok(vec![0.0; images.len()]);
    }
    let e = fd_scale / norm;
    let (_, plus) = victim.at(v, e as f32)?.input_gradient(images, labels, plan);
    let (_, minus) = victim
        .at(v, -e as f32)?
        .input_gradient(images, labels, plan);
    Ok(plus
        .iter()
        .zip(&minus)
        .map(|(a, b)| ((f64::from(*a) - f64::from(*b)) / (2.0 * e)) as f32)
        .collect())
}

/// The attacker's forward plan: none, or (adaptive) unk at positions whose PE rows are silent.
pub fn attacker_plan(case: &AttackCase, adaptive: bool) -> Option<JigsawPlan> {
    if !adaptive || !case.vit.pe.has_unk() {
        return None;
    }
    let g = case.target_gradient();
    let pe = g.get(PE)?;
    let (n, d) = (case.vit.num_patches(), case.vit.dim);
    let norms: Vec<f64> = (1..=n)
        .map(|i| {
            pe.data[i * d..(i + 1) * d]
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let max = norms.iter().copied().fold(0.0, f64::max);
    let occluded: Vec<bool> = norms.iter().map(|&x| x <= 1e-7 * max).collect();
    occluded.iter().any(|&o| o).then(|| {
        JigsawPlan::shared(SamplePlan {
            sources: (0..n).collect(),
            occluded,
        })
    })
}

/// Runs one optimisation attack with the given (recovered) labels.
pub fn optimise(
    case: &AttackCase,
    labels: &[u32],
    config: &OptimisationConfig,
    progress: impl FnMut(usize, f64),
) -> Result<Optimised> {
    optimise_from(case, labels, config, None, progress)
}

/// [`optimise`] from a given starting image (every restart starts there plus fresh noise of the
/// normal initialisation scaled by 0.1), or from breaching's initialisation when `None`.
pub fn optimise_from(
    case: &AttackCase,
    labels: &[u32],
    config: &OptimisationConfig,
    start: Option<&[f32]>,
    progress: impl FnMut(usize, f64),
) -> Result<Optimised> {
    let vit = &case.vit;
    let victim = Victim::new(vit, &case.global, case.config.dal_lambda, case.device)?;
    let target = case.target_gradient();
    let plan = attacker_plan(case, config.adaptive);
    let patch_rows = 1..1 + vit.num_patches();
    let mut optimised = descend(
        vit,
        labels.len(),
        config,
        start,
        |x| {
            let g = victim.parameter_gradient(x, labels, plan.as_ref());
            let (matching, dg) = config.objective.evaluate(&g, &target, patch_rows.clone());
            let grad =
                jacobian_transpose_vector(&victim, x, labels, plan.as_ref(), &dg, config.fd_scale)?;
            Ok((matching, grad))
        },
        progress,
    )?;
    // One batch: a patch may move between any two of its images.
    let groups = [(0..labels.len()).collect::<Vec<_>>()];
    refine_patches(vit, &mut optimised, &groups, config, |x| {
        let g = victim.parameter_gradient(x, labels, plan.as_ref());
        Ok(config.objective.evaluate(&g, &target, patch_rows.clone()).0)
    })?;
    Ok(optimised)
}

/// Patch-owner refinement. With learned PE the PE-gradient term pins *where* each patch
/// goes, but a batch's gradient is a sum over its images, so a descent can settle with the
/// patch of one position put in the wrong image of the batch (measured on an 8-image FedAvg
/// client: giving every position's patches their true owners would raise the mean PSNR by
/// 1.2 dB). For each patch position and each pair of images of a group (images that share
/// every batch they are in), this swaps the two patches and keeps the swap where it lowers the
/// descent's loss (matching objective + TV), which judges a swap both by the update and by
/// the edges it makes; up to `passes` passes, stopping at one without a swap. Returns the
/// swaps kept.
pub fn swap_patches(
    vit: &VitConfig,
    x: &mut [f32],
    groups: &[Vec<usize>],
    tv_weight: f64,
    passes: usize,
    mut matching: impl FnMut(&[f32]) -> Result<f64>,
) -> Result<usize> {
    let (c, s, p) = (vit.channels, vit.image_size, vit.patch_size);
    let per = c * s * s;
    let grid = s / p.max(1);
    let mut loss =
        |x: &[f32]| -> Result<f64> { Ok(matching(x)? + tv_weight * total_variation(x, c, s).0) };
    let swap = |x: &mut [f32], i: usize, j: usize, pos: usize| {
        let (py, px) = (pos / grid * p, pos % grid * p);
        for ch in 0..c {
            for y in py..py + p {
                for xx in px..px + p {
                    let k = ch * s * s + y * s + xx;
                    x.swap(i * per + k, j * per + k);
                }
            }
        }
    };
    let mut best = loss(x)?;
    let mut kept = 0;
    for _ in 0..passes {
        let before = kept;
        for pos in 0..grid * grid {
            for g in groups {
                for a in 0..g.len() {
                    for b in a + 1..g.len() {
                        swap(x, g[a], g[b], pos);
                        let v = loss(x)?;
                        if v < best {
                            (best, kept) = (v, kept + 1);
                        } else {
                            swap(x, g[a], g[b], pos);
                        }
                    }
                }
            }
        }
        if kept == before {
            break;
        }
    }
    Ok(kept)
}

/// [`swap_patches`] on what a descent produced, when `config` asks for it; the objective is
/// then the refined images' matching objective.
pub fn refine_patches(
    vit: &VitConfig,
    optimised: &mut Optimised,
    groups: &[Vec<usize>],
    config: &OptimisationConfig,
    mut matching: impl FnMut(&[f32]) -> Result<f64>,
) -> Result<()> {
    if config.patch_swap_passes == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let kept = swap_patches(
        vit,
        &mut optimised.images,
        groups,
        config.tv_weight,
        config.patch_swap_passes,
        &mut matching,
    )?;
    optimised.objective = matching(&optimised.images)?;
    optimised.seconds += started.elapsed().as_secs_f64();
    tracing::debug!("patch-owner refinement kept {kept} swaps");
    Ok(())
}

/// The descent every optimisation attack shares: `b` images in [0, 1] from `start` (plus noise)
/// or breaching's initialisation, `evaluate(x) -> (matching objective, its input gradient)`
/// plus total variation, (signed) Adam with the step decay of Inverting Gradients, restarts; the
/// best images by matching objective are kept.
pub fn descend(
    vit: &VitConfig,
    b: usize,
    config: &OptimisationConfig,
    start: Option<&[f32]>,
    mut evaluate: impl FnMut(&[f32]) -> Result<(f64, Vec<f32>)>,
    mut progress: impl FnMut(usize, f64),
) -> Result<Optimised> {
    let started = Instant::now();
    let (c, s) = (vit.channels, vit.image_size);
    let per = c * s * s;
    let mut rng = mjp::Seed(config.seed).child("attack-init", 0).rng();
    let mut restart_images: Vec<Vec<f32>> = Vec::new();
    let mut restart_objectives = Vec::new();
    let iters = config.iterations.max(1);
    let milestones = [iters * 3 / 8, iters * 5 / 8, iters * 7 / 8];
    for _restart in 0..config.restarts.max(1) {
        // breaching's initialisation: standard normal in the model's normalised input space.
        let mut x: Vec<f32> = (0..b * per)
            .map(|k| {
                let ch = (k % per) / (s * s);
                let (m, sd) = (f64::from(vit.mean[ch]), f64::from(vit.std[ch]));
                let noise = sd * gaussian(&mut rng);
                match start {
                    Some(x0) => (f64::from(x0[k]) + 0.1 * noise).clamp(0.0, 1.0) as f32,
                    None => (m + noise).clamp(0.0, 1.0) as f32,
                }
            })
            .collect();
        let (mut m, mut v2) = (vec![0f64; x.len()], vec![0f64; x.len()]);
        let mut restart_best: Option<(f64, Vec<f32>)> = None;
        for it in 0..=iters {
            let (matching, mut grad) = evaluate(&x)?;
            if restart_best.as_ref().is_none_or(|(f, _)| matching < *f) {
                restart_best = Some((matching, x.clone()));
            }
            if it == iters {
                break;
            }
            if config.tv_weight > 0.0 {
                let (_, dtv) = total_variation(&x, c, s);
                for (gx, t) in grad.iter_mut().zip(dtv) {
                    *gx += (config.tv_weight as f32) * t;
                }
            }
            if let Some(x0) = start.filter(|_| config.prior_weight > 0.0) {
                let w = 2.0 * config.prior_weight / x.len() as f64;
                for ((gx, a), b) in grad.iter_mut().zip(&x).zip(x0) {
                    *gx += (w * (f64::from(*a) - f64::from(*b))) as f32;
                }
            }
            let lr =
                config.lr * 0.1f64.powi(milestones.iter().filter(|&&ms| it >= ms).count() as i32);
            let t = (it + 1) as i32;
            for k in 0..x.len() {
                let gk = if config.signed {
                    f64::from(grad[k].signum()) * f64::from(u8::from(grad[k] != 0.0))
                } else {
                    f64::from(grad[k])
                };
                m[k] = 0.9 * m[k] + 0.1 * gk;
                v2[k] = 0.999 * v2[k] + 0.001 * gk * gk;
                let mh = m[k] / (1.0 - 0.9f64.powi(t));
                let vh = v2[k] / (1.0 - 0.999f64.powi(t));
                x[k] = ((f64::from(x[k]) - lr * mh / (vh.sqrt() + 1e-8)).clamp(0.0, 1.0)) as f32;
            }
            if it % 50 == 0 {
                tracing::debug!("attack iteration {it}: matching objective {matching:.6}, lr {lr}");
            }
            progress(it, matching);
        }
        let (f, xb) = restart_best.expect("at least one iteration");
        restart_objectives.push(f);
        restart_images.push(xb);
    }
    let best = (0..restart_objectives.len())
        .min_by(|&a, &b| restart_objectives[a].total_cmp(&restart_objectives[b]))
        .expect("at least one restart");
    let fused = config.fuse_restarts && restart_images.len() > 1;
    let images = if fused {
        fuse(&restart_images, best, per)
    } else {
        restart_images.swap_remove(best)
    };
    Ok(Optimised {
        images,
        objective: restart_objectives[best],
        fused,
        restart_objectives,
        iterations: iters * config.restarts.max(1),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The mean of every restart's images, each restart's matched to `reference`'s by the best
/// assignment on pixel MSE (images of `per` values).
pub fn fuse(restarts: &[Vec<f32>], reference: usize, per: usize) -> Vec<f32> {
    let anchor = &restarts[reference];
    let b = anchor.len() / per;
    let mut sum = vec![0f64; anchor.len()];
    for images in restarts {
        let cost: Vec<Vec<f64>> = (0..b)
            .map(|i| {
                (0..b)
                    .map(|j| {
                        crate::metrics::mse(
                            &images[i * per..(i + 1) * per],
                            &anchor[j * per..(j + 1) * per],
                        )
                    })
                    .collect()
            })
            .collect();
        for (i, j) in crate::metrics::best_assignment(&cost)
            .into_iter()
            .enumerate()
        {
            let dst = &mut sum[j * per..(j + 1) * per];
            for (d, x) in dst.iter_mut().zip(&images[i * per..(i + 1) * per]) {
                *d += f64::from(*x);
            }
        }
    }
    let k = restarts.len() as f64;
    sum.into_iter().map(|x| (x / k) as f32).collect()
}

/// `ig`: Inverting Gradients (cosine + TV, signed Adam).
pub const IG: Registration = Registration {
    name: "ig",
    about: "Inverting Gradients: cosine matching + TV, signed Adam",
    build: |s| {
        OptimisationAttack::boxed(IG.name, OptimisationConfig::inverting_gradients(false), s)
    },
};

/// `ig-pe`: Inverting Gradients with the PE-gradient term (APRIL-optimisation).
pub const IG_PE: Registration = Registration {
    name: "ig-pe",
    about: "Inverting Gradients with an extra term on the PE gradient",
    build: |s| {
        OptimisationAttack::boxed(IG_PE.name, OptimisationConfig::inverting_gradients(true), s)
    },
};

/// `ig-pe-adaptive`: [`IG_PE`] whose forward pass gives occluded positions the unk PE.
pub const IG_PE_ADAPTIVE: Registration = Registration {
    name: "ig-pe-adaptive",
    about: "MJP-aware ig-pe: occluded positions get the unk PE in the attacker's forward pass",
    build: |s| {
        OptimisationAttack::boxed(
            IG_PE_ADAPTIVE.name,
            OptimisationConfig {
                adaptive: true,
                ..OptimisationConfig::inverting_gradients(true)
            },
            s,
        )
    },
};

/// `dlg`: Deep Leakage from Gradients (L2, plain Adam).
pub const DLG: Registration = Registration {
    name: "dlg",
    about: "DLG: squared-L2 matching, plain Adam",
    build: |s| OptimisationAttack::boxed(DLG.name, OptimisationConfig::dlg(false), s),
};

/// `dlg-pe`: DLG with the PE-gradient term.
pub const DLG_PE: Registration = Registration {
    name: "dlg-pe",
    about: "DLG with an extra term on the PE gradient",
    build: |s| OptimisationAttack::boxed(DLG_PE.name, OptimisationConfig::dlg(true), s),
};

impl OptimisationConfig {
    /// Where the descent starts: the public mean image for every sample when this
    /// configuration starts there and the adversary has it (else breaching's initialisation).
    pub fn start(&self, case: &AttackCase, knowledge: &Knowledge<'_>) -> Option<Vec<f32>> {
        let vit = &case.vit;
        let per = vit.channels * vit.image_size * vit.image_size;
        knowledge
            .mean_image
            .filter(|m| self.init_mean_image && m.len() == per)
            .map(|m| m.repeat(knowledge.labels.len()))
    }

    /// This configuration with the adversary's overrides applied (the PE and embedding weights
    /// only where the attack has a PE term).
    pub fn with_settings(mut self, s: &AdversarySettings) -> Self {
        self.iterations = s.iterations;
        if let Some(v) = s.lr {
            self.lr = v;
        }
        if let Some(v) = s.tv {
            self.tv_weight = v;
        }
        if let Some(v) = s.pe_weight
            && self.objective.pe_weight > 0.0
        {
            self.objective.pe_weight = v;
        }
        if let Some(v) = s.embed_weight
            && self.objective.pe_weight > 0.0
        {
            self.objective.embed_weight = v;
        }
        if let Some(v) = s.prior_weight {
            self.prior_weight = v;
        }
        if let Some(v) = s.restarts {
            self.restarts = v;
        }
        if s.fuse_restarts {
            self.fuse_restarts = true;
        }
        if s.unsigned {
            self.signed = false;
        }
        if s.init_noise {
            self.init_mean_image = false;
        }
        if let Some(v) = s.patch_swaps {
            self.patch_swap_passes = v;
        }
        self
    }
}

/// An optimisation attack as an [`Attack`].
pub struct OptimisationAttack {
    name: &'static str,
    /// Its hyper-parameters.
    pub config: OptimisationConfig,
}

impl OptimisationAttack {
    /// The attack `config` (with the adversary's overrides), shown as `name`.
    pub fn boxed(
        name: &'static str,
        config: OptimisationConfig,
        settings: &AdversarySettings,
    ) -> Box<dyn Attack> {
        Box::new(Self {
            name,
            config: config.with_settings(settings),
        })
    }
}

impl Attack for OptimisationAttack {
    fn name(&self) -> &str {
        self.name
    }

    fn reconstruct(&self, case: &AttackCase, knowledge: &Knowledge<'_>) -> Result<Reconstruction> {
        let start = self.config.start(case, knowledge);
        optimise_from(
            case,
            knowledge.labels,
            &self.config,
            start.as_deref(),
            |_, _| {},
        )
        .map(|o| Reconstruction {
            images: o.images,
            objective: Some(o.objective),
        })
    }
}

fn gaussian(rng: &mut impl Rng) -> f64 {
    mjp::defense::standard_normal(rng)
}

#[cfg(test)]
mod tests {
    use super::{fuse, swap_patches};

    #[test]
    fn patch_swaps_give_patches_back_to_their_images() {
        let vit = mjp::VitConfig::preset("vit-micro-28").unwrap();
        let per = 28 * 28;
        // Two images and a third in another group; patches of two positions misplaced.
        let truth: Vec<f32> = (0..3 * per)
            .map(|k| [0.1, 0.9, 0.5][k / per] + 0.05 * ((k % 7) as f32 / 7.0))
            .collect();
        let mut x = truth.clone();
        let patch = |pos: usize| {
            let (py, px) = (pos / 7 * 4, pos % 7 * 4);
            (py..py + 4).flat_map(move |y| (px..px + 4).map(move |xx| y * 28 + xx))
        };
        for pos in [3, 40] {
            for k in patch(pos) {
                x.swap(k, per + k);
            }
        }
        let mse = |x: &[f32]| -> crate::error::Result<f64> { Ok(crate::metrics::mse(x, &truth)) };
        let groups = [vec![0, 1], vec![2]];
        let kept = swap_patches(&vit, &mut x, &groups, 0.0, 3, mse).unwrap();
        assert_eq!(kept, 2);
        assert_eq!(x, truth);
        // Nothing to gain: nothing moves, and one image alone in its group never swaps.
        assert_eq!(swap_patches(&vit, &mut x, &groups, 0.0, 3, mse).unwrap(), 0);
    }

    #[test]
    fn fusion_matches_restarts_before_averaging() {
        // Two images of 2 pixels; the second restart found them in the other order and noisier.
        let best = vec![0.0, 0.0, 1.0, 1.0];
        let other = vec![0.8, 0.8, 0.2, 0.2];
        let fused = fuse(&[best.clone(), other], 0, 2);
        assert_eq!(fused, vec![0.1, 0.1, 0.9, 0.9]);
        // A single restart is itself.
        assert_eq!(fuse(std::slice::from_ref(&best), 0, 2), best);
    }
}
