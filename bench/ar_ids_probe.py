"""How often the AR alone writes the right ids: for held-out (or train) prompts, does the sampled target grid hold a
shape id with each asked-for (shape, colour)? Reads a model folder (assembled, so unseen ids are completed).

    python bench/ar_ids_probe.py runs/world/model [--split heldout] [--temperature 0 0.5 1.0] [--n 20]
"""
from __future__ import annotations

import argparse
import random

import torch

import glmimage
from glmimage.ar import generate as argen
from glmimage.train.data import COLORS, N_BG, N_SHAPE, PARTS, SHAPES
from glmimage.world import caption, sample_scene


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--n", type=int, default=20, help="prompts per scene kind")
    args = ap.parse_args()
    pipe = glmimage.load(args.model, device="cpu")
    items = []
    for kind in ("single", "count", "relation", "object_text"):
        for i in range(args.n):
            rng = random.Random(f"probe-{kind}-{i}")
            scene = sample_scene(rng, kind=kind, split=args.split)
            items.append((caption(scene, rng), scene))
    target, preview = pipe.cfg.grids(pipe.cfg.sampling.height, pipe.cfg.sampling.width)
    prompts = [argen.layout_prompt(pipe.tokenizer, p, target=target, preview=preview) for p, _ in items]
    per = PARTS * PARTS
    for temp in args.temperature:
        ids = argen.generate(pipe.ar, prompts, codebook_size=pipe.cfg.vq.codebook_size, pad_id=pipe.tokenizer.pad_id,
                             temperature=temp, greedy=temp == 0, top_p=None, top_k=None,
                             generator=torch.Generator().manual_seed(0))[:, -target[0] * target[1]:]
        hit = total = 0
        for (_, scene), grid in zip(items, ids.tolist()):
            got = {(SHAPES[(c - N_BG) // (len(COLORS) * per)], COLORS[(c - N_BG) // per % len(COLORS)])
                   for c in grid if N_BG <= c < N_BG + N_SHAPE}
            hit += sum((s.shape, s.color) in got for s in scene.shapes)
            total += len(scene.shapes)
        print(f"{args.split} temperature {temp}: {hit}/{total} = {hit / total:.2f} of asked shapes have their "
              f"(shape, colour) id")


if __name__ == "__main__":
    main()
