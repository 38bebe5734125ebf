//! The Masked Jigsaw Puzzle: the BEiT-style block-wise mask generator, the shuffle of the masked
//! patches among themselves, and the per-batch plan the model consumes.
//!
//! The generator follows the reference implementation step by step: blocks of area
//! `U(min_block, remaining)` and aspect `exp(U(ln 0.3, ln 1/0.3))` are placed at random, a block
//! counts only if it adds between 1 and `remaining` new patches, each block gets 10 tries, and
//! generation stops early when a block adds nothing (so the count may fall short of the target).

use rand::Rng;
use rand::seq::SliceRandom;

use crate::config::{JigsawConfig, PeMode, VitConfig};

/// Block-wise random mask over a `grid_h x grid_w` patch grid.
#[derive(Clone, Debug)]
pub struct MaskGenerator {
    grid_h: usize,
    grid_w: usize,
    min_block: usize,
    log_aspect: (f64, f64),
}

impl MaskGenerator {
    /// Aspect ratios are drawn log-uniformly in [0.3, 1/0.3], as in the reference.
    pub const MIN_ASPECT: f64 = 0.3;

    /// A generator with an explicit minimum block area.
    pub fn new(grid_h: usize, grid_w: usize, min_block: usize) -> Self {
        Self {
            grid_h,
            grid_w,
            min_block: min_block.max(1),
            log_aspect: (Self::MIN_ASPECT.ln(), (1.0 / Self::MIN_ASPECT).ln()),
        }
    }

    /// The reference's minimum block (8 patches on a 14x14 grid) scaled to `n` patches.
    pub fn scaled_min_block(n: usize) -> usize {
        ((8.0 * n as f64 / 196.0).round() as usize).max(1)
    }

    /// A generator for a model's grid, using `min_block` or the scaled reference value.
    pub fn for_model(config: &VitConfig, min_block: Option<usize>) -> Self {
        let g = config.grid();
        Self::new(
            g,
            g,
            min_block.unwrap_or_else(|| Self::scaled_min_block(g * g)),
        )
    }

    /// Number of patches in the grid.
    pub fn num_patches(&self) -> usize {
        self.grid_h * self.grid_w
    }

    /// Target count for a shuffle ratio: `floor(ratio * N)`.
    pub fn target_count(&self, ratio: f64) -> usize {
        ((ratio * self.num_patches() as f64) + 1e-9).floor() as usize
    }

    /// A mask (row-major, `true` = selected) with at most `n_target` patches.
    pub fn generate<R: Rng + ?Sized>(&self, n_target: usize, rng: &mut R) -> Vec<bool> {
        let mut mask = vec![false; self.num_patches()];
        let mut count = 0;
        while count < n_target {
            let delta = self.place_block(&mut mask, n_target - count, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }

    /// One block, up to 10 tries; returns how many new patches it selected.
    fn place_block<R: Rng + ?Sized>(
        &self,
        mask: &mut [bool],
        max_patches: usize,
        rng: &mut R,
    ) -> usize {
        let mut delta = 0;
        for _ in 0..10 {
            let target_area = uniform(rng, self.min_block as f64, max_patches as f64);
            let aspect = uniform(rng, self.log_aspect.0, self.log_aspect.1).exp();
            let h = (target_area * aspect).sqrt().round() as usize;
            let w = (target_area / aspect).sqrt().round() as usize;
            if w < self.grid_w && h < self.grid_h {
                let top = rng.random_range(0..=self.grid_h - h);
                let left = rng.random_range(0..=self.grid_w - w);
                let already = (top..top + h)
                    .flat_map(|i| (left..left + w).map(move |j| (i, j)))
                    .filter(|&(i, j)| mask[i * self.grid_w + j])
                    .count();
                let new = h * w - already;
                if new > 0 && new <= max_patches {
                    for i in top..top + h {
                        for j in left..left + w {
                            let cell = &mut mask[i * self.grid_w + j];
                            if !*cell {
                                *cell = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }
}

/// Python's `random.uniform(a, b)`: `a + (b - a) * U[0, 1)`, valid for `a > b` too.
fn uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// What one sample of a batch sees: where each position's patch comes from, and which positions
/// carry the unk position embedding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplePlan {
    /// `sources[i]` = index of the original patch placed at position i.
    pub sources: Vec<usize>,
    /// `occluded[i]` = position i receives the shared unk PE.
    pub occluded: Vec<bool>,
}

impl SamplePlan {
    /// No shuffle, nothing occluded.
    pub fn identity(n: usize) -> Self {
        Self {
            sources: (0..n).collect(),
            occluded: vec![false; n],
        }
    }

    /// Shuffles the positions selected by `mask` among themselves; `with_unk` marks them occluded.
    pub fn masked_shuffle<R: Rng + ?Sized>(mask: &[bool], with_unk: bool, rng: &mut R) -> Self {
        let selected: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
        let mut permuted = selected.clone();
        permuted.shuffle(rng);
        let mut sources: Vec<usize> = (0..mask.len()).collect();
        for (&target, &source) in selected.iter().zip(&permuted) {
            sources[target] = source;
        }
        Self {
            sources,
            occluded: if with_unk {
                mask.to_vec()
            } else {
                vec![false; mask.len()]
            },
        }
    }

    /// Whether anything moved or was occluded.
    pub fn is_identity(&self) -> bool {
        self.sources.iter().enumerate().all(|(i, &s)| i == s) && !self.occluded.iter().any(|&o| o)
    }

    /// Number of occluded positions.
    pub fn occluded_count(&self) -> usize {
        self.occluded.iter().filter(|&&o| o).count()
    }

    /// Applies the shuffle to one image in pixel space (`[C, H, W]`, row-major), returning what
    /// the model sees.
    pub fn shuffle_image(
        &self,
        image: &[f32],
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Vec<f32> {
        let grid = size / patch;
        let mut out = image.to_vec();
        for (target, &source) in self.sources.iter().enumerate() {
            if target == source {
                continue;
            }
            let (tr, tc) = (target / grid, target % grid);
            let (sr, sc) = (source / grid, source % grid);
            for c in 0..channels {
                for y in 0..patch {
                    let dst = c * size * size + (tr * patch + y) * size + tc * patch;
                    let src = c * size * size + (sr * patch + y) * size + sc * patch;
                    out[dst..dst + patch].copy_from_slice(&image[src..src + patch]);
                }
            }
        }
        out
    }
}

/// The jigsaw of one batch: one plan shared by every sample (the reference) or one per sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JigsawPlan {
    plans: Vec<SamplePlan>,
}

impl JigsawPlan {
    /// A single plan applied to every sample of the batch.
    pub fn shared(plan: SamplePlan) -> Self {
        Self { plans: vec![plan] }
    }

    /// One plan per sample.
    pub fn per_sample(plans: Vec<SamplePlan>) -> Self {
        assert!(!plans.is_empty(), "a jigsaw plan needs at least one sample");
        Self { plans }
    }

    /// The identity plan (clean forward).
    pub fn identity(n: usize) -> Self {
        Self::shared(SamplePlan::identity(n))
    }

    /// Draws a plan for a batch of `batch` samples following the model's PE mode:
    /// `mjp` shuffles a block mask and occludes it, `naive-shuffle` shuffles every patch,
    /// `learned`/`none` shuffle a block mask without unk (used to evaluate "on the jigsaw").
    pub fn draw(
        config: &VitConfig,
        jigsaw: &JigsawConfig,
        ratio: f64,
        batch: usize,
        rng: &mut impl Rng,
    ) -> Self {
        let generator = MaskGenerator::for_model(config, jigsaw.min_block);
        let n = config.num_patches();
        let one = |rng: &mut dyn rand::RngCore| match config.pe {
            PeMode::NaiveShuffle => SamplePlan::masked_shuffle(&vec![true; n], false, rng),
            pe => {
                let mask = generator.generate(generator.target_count(ratio), rng);
                SamplePlan::masked_shuffle(&mask, pe.has_unk(), rng)
            }
        };
        if jigsaw.per_sample {
            Self::per_sample((0..batch).map(|_| one(rng)).collect())
        } else {
            Self::shared(one(rng))
        }
    }

    /// The plan of sample `i`.
    pub fn sample(&self, i: usize) -> &SamplePlan {
        &self.plans[if self.plans.len() == 1 { 0 } else { i }]
    }

    /// Whether one plan is shared by the batch.
    pub fn is_shared(&self) -> bool {
        self.plans.len() == 1
    }

    /// The plans (one, or one per sample).
    pub fn plans(&self) -> &[SamplePlan] {
        &self.plans
    }

    /// The plan of samples `start..end` (a shared plan stays shared).
    pub fn slice(&self, start: usize, end: usize) -> JigsawPlan {
        if self.is_shared() {
            self.clone()
        } else {
            Self::per_sample(self.plans[start..end].to_vec())
        }
    }

    /// Whether this plan changes nothing.
    pub fn is_identity(&self) -> bool {
        self.plans.iter().all(SamplePlan::is_identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::Seed;

    #[test]
    fn mask_never_exceeds_target_and_is_deterministic() {
        let g = MaskGenerator::new(14, 14, 8);
        for (i, ratio) in [0.05, 0.1, 0.25, 0.5, 0.75, 0.9].into_iter().enumerate() {
            let target = g.target_count(ratio);
            for k in 0..200 {
                let mut rng = Seed(k).child("mask", i as u64).rng();
                let m = g.generate(target, &mut rng);
                let count = m.iter().filter(|&&b| b).count();
                assert!(count <= target, "ratio {ratio}: {count} > {target}");
                let mut rng2 = Seed(k).child("mask", i as u64).rng();
                assert_eq!(m, g.generate(target, &mut rng2));
            }
        }
    }

    #[test]
    fn single_block_is_a_rectangle_inside_the_grid() {
        // With an empty mask and a target that one block can satisfy, the first block's cells
        // must form exactly one axis-aligned rectangle strictly smaller than the grid.
        let g = MaskGenerator::new(14, 14, 8);
        for k in 0..300 {
            let mut rng = Seed(k).rng();
            let mut mask = vec![false; 196];
            let delta = g.place_block(&mut mask, 40, &mut rng);
            let cells: Vec<(usize, usize)> = (0..196)
                .filter(|&i| mask[i])
                .map(|i| (i / 14, i % 14))
                .collect();
            assert_eq!(cells.len(), delta);
            if delta == 0 {
                continue;
            }
            let (r0, r1) = (
                cells.iter().map(|c| c.0).min().unwrap(),
                cells.iter().map(|c| c.0).max().unwrap(),
            );
            let (c0, c1) = (
                cells.iter().map(|c| c.1).min().unwrap(),
                cells.iter().map(|c| c.1).max().unwrap(),
            );
            let (h, w) = (r1 - r0 + 1, c1 - c0 + 1);
            assert_eq!(h * w, delta, "selected cells are not a full rectangle");
            assert!(h < 14 && w < 14);
            assert!(delta <= 40);
        }
    }

    #[test]
    fn shuffle_is_a_permutation_of_the_masked_positions() {
        let g = MaskGenerator::new(7, 7, 2);
        for k in 0..100 {
            let mut rng = Seed(k).rng();
            let mask = g.generate(g.target_count(0.5), &mut rng);
            let plan = SamplePlan::masked_shuffle(&mask, true, &mut rng);
            let mut seen = [false; 49];
            for (target, &source) in plan.sources.iter().enumerate() {
                assert!(!seen[source], "source used twice");
                seen[source] = true;
                if mask[target] {
                    assert!(mask[source], "a masked position took an unmasked patch");
                } else {
                    assert_eq!(source, target, "an unmasked patch moved");
                }
            }
            assert_eq!(plan.occluded, mask);
        }
    }

    #[test]
    fn shuffle_image_moves_whole_patches() {
        let mut rng = Seed(1).rng();
        let plan = SamplePlan::masked_shuffle(&[true, true, true, true], false, &mut rng);
        let image: Vec<f32> = (0..16).map(|v| v as f32).collect(); // 1x4x4, patch 2
        let out = plan.shuffle_image(&image, 1, 4, 2);
        for (t, &s) in plan.sources.iter().enumerate() {
            let (tr, tc, sr, sc) = (t / 2, t % 2, s / 2, s % 2);
            for y in 0..2 {
                for x in 0..2 {
                    assert_eq!(
                        out[(tr * 2 + y) * 4 + tc * 2 + x],
                        image[(sr * 2 + y) * 4 + sc * 2 + x]
                    );
                }
            }
        }
    }
    /// (grid, min_block, ratio, mean count, P(count == target), mean rows touched) from
    /// `scripts/reference/mask_stats.py` (the reference algorithm in Python, 20000 draws each).
    const REFERENCE_STATS: [(usize, usize, f64, f64, f64, f64); 10] = [
        (14, 8, 0.1, 18.607, 0.6905, 5.729),
        (14, 8, 0.25, 48.729, 0.7727, 9.273),
        (14, 8, 0.5, 97.767, 0.8186, 12.229),
        (14, 8, 0.75, 146.469, 0.7186, 13.627),
        (14, 8, 0.9, 172.457, 0.3724, 13.929),
        (7, 2, 0.1, 3.997, 0.9973, 2.571),
        (7, 2, 0.25, 11.997, 0.9970, 4.596),
        (7, 2, 0.5, 23.991, 0.9908, 6.152),
        (7, 2, 0.75, 35.918, 0.9386, 6.858),
        (7, 2, 0.9, 43.150, 0.6256, 6.983),
    ];

    #[test]
    fn statistics_match_the_reference_algorithm() {
        let draws = 4000;
        for (k, &(grid, min_block, ratio, mean_ref, hit_ref, rows_ref)) in
            REFERENCE_STATS.iter().enumerate()
        {
            let g = MaskGenerator::new(grid, grid, min_block);
            let target = g.target_count(ratio);
            let mut rng = Seed(7).child("stats", k as u64).rng();
            let (mut total, mut hits, mut rows) = (0usize, 0usize, 0usize);
            for _ in 0..draws {
                let m = g.generate(target, &mut rng);
                let c = m.iter().filter(|&&b| b).count();
                total += c;
                hits += usize::from(c == target);
                rows += (0..grid)
                    .filter(|&r| m[r * grid..(r + 1) * grid].iter().any(|&b| b))
                    .count();
            }
            let n = draws as f64;
            let (mean, hit, rows) = (total as f64 / n, hits as f64 / n, rows as f64 / n);
            // Tolerances: a few standard errors of 4000 draws.
            assert!(
                (mean - mean_ref).abs() < 0.02 * mean_ref + 0.3,
                "{grid}x{grid} r={ratio}: mean {mean} vs {mean_ref}"
            );
            assert!(
                (hit - hit_ref).abs() < 0.04,
                "{grid}x{grid} r={ratio}: P(hit) {hit} vs {hit_ref}"
            );
            assert!(
                (rows - rows_ref).abs() < 0.03 * rows_ref + 0.1,
                "{grid}x{grid} r={ratio}: rows {rows} vs {rows_ref}"
            );
        }
    }
}
