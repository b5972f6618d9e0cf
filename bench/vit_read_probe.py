"""How well a model's visual tokenizer reads the held-out edit sources (`glmimage eval world`'s edits, whose shape–
colour pairs never occur in training), exactly as the pipeline reads a condition image: token accuracy against the
scene graph's ids (all tokens, and those that show a shape), and the share of sources whose every shape decodes right
(world/canvas.py plan_shapes), per edit seed and overall. Takes seconds: no AR, no DiT.

    python bench/vit_read_probe.py [--model world] [--seeds 0 1 2] [--n 100]
"""
from __future__ import annotations

import argparse

import numpy as np

import glmimage
from glmimage.eval.world import EvalConfig, heldout_edits
from glmimage.train.data import N_BG, N_SHAPE, token_codes
from glmimage.world.canvas import plan_shapes
from glmimage.world.render import render


def shapes(items) -> list:
    return sorted((s.shape, s.color, tuple(s.cell)) for s in items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    pipe = glmimage.load(args.model, device="cpu")
    size = pipe.cfg.sampling.height
    (grid, _), _ = pipe.cfg.grids(size, size)
    total = {"tokens": [], "shape tokens": [], "sources": []}
    for seed in args.seeds:
        tok, shp, src = [], [], []
        for edit in heldout_edits(EvalConfig(seed=seed, n_edits=args.n)):
            read = pipe.condition_tokens(render(edit.source, size))[1].flatten().numpy()
            true = token_codes(edit.source, grid)
            on_shape = (true >= N_BG) & (true < N_BG + N_SHAPE)
            tok.extend(read == true)
            shp.extend(read[on_shape] == true[on_shape])
            src.append(shapes(plan_shapes(read)) == shapes(edit.source.shapes))
        for k, v in zip(total, (tok, shp, src)):
            total[k].extend(v)
        print(f"seed {seed}: tokens {np.mean(tok):.3f}  shape tokens {np.mean(shp):.3f}  "
              f"sources with every shape right {np.mean(src):.3f}  (n={len(src)})")
    print("all:    " + "  ".join(f"{k} {np.mean(v):.3f}" for k, v in total.items()))


if __name__ == "__main__":
    main()
