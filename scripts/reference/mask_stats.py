#!/usr/bin/env python3
"""Statistics of the reference block-wise jigsaw mask generator (BEiT-style, as used by the MJP
reference implementation and described in DESIGN.md), written in plain Python so the Rust
generator's statistics can be checked against it. Prints a Rust table for mjp/src/jigsaw.rs.

Per (grid, min_block, ratio): mean selected count, P(count == target), mean number of mask
rows touched.
"""
import math, random

def generate(h, w, n_target, min_block, rng):
    mask = [[0] * w for _ in range(h)]
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    count = 0
    while count < n_target:
        remaining = n_target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(lo, hi))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top = rng.randint(0, h - bh)
                left = rng.randint(0, w - bw)
                already = sum(mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                if 0 < bh * bw - already <= remaining:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if not mask[i][j]:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask

def stats(g, min_block, ratio, draws=20000, seed=0):
    rng = random.Random(seed)
    target = int(math.floor(ratio * g * g + 1e-9))
    total = hit = rows = 0
    for _ in range(draws):
        m = generate(g, g, target, min_block, rng)
        c = sum(map(sum, m))
        total += c
        hit += c == target
        rows += sum(1 for r in m if any(r))
    return total / draws, hit / draws, rows / draws

if __name__ == "__main__":
    for g, mb in ((14, 8), (7, 2)):
        for ratio in (0.1, 0.25, 0.5, 0.75, 0.9):
            mean, p_hit, rows = stats(g, mb, ratio)
            print(f"({g}, {mb}, {ratio}, {mean:.3f}, {p_hit:.4f}, {rows:.3f}),")
