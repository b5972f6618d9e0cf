"""Who loses an edit, the AR or the DiT: for the held-out edits of `glmimage eval world --seed S`, the AR's plan
(the target grid it writes from the source image and the instruction) decoded into shapes (world/canvas.py
plan_shapes) and compared with the edit's target scene and its source scene, per edit kind. A plan that equals the
target is right whatever the DiT then paints; one that equals the source is the AR copying the image unedited.
Shapes only: a background or text edit changes no shape, so its plan reads "= target" as long as the shapes stay.

    python bench/ar_edit_probe.py [--model world] [--seed 0] [--n 100]
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from tqdm import tqdm

import glmimage
from glmimage.eval.world import EvalConfig, heldout_edits
from glmimage.world.canvas import plan_shapes
from glmimage.world.render import render


def shapes(scene_or_list) -> list:
    return sorted((s.shape, s.color, tuple(s.cell)) for s in scene_or_list)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    pipe = glmimage.load(args.model, device="cpu")
    size = pipe.cfg.sampling.height
    counts: dict[str, Counter] = defaultdict(Counter)
    for i, edit in enumerate(tqdm(heldout_edits(EvalConfig(seed=args.seed, n_edits=args.n)), unit="edit")):
        # one DiT step: only the AR's plan is read
        ids = pipe(edit.instruction, images=[render(edit.source, size)], height=size, width=size,
                   seed=args.seed + i, num_inference_steps=1, progress=False).prior_ids[0]
        got = shapes(plan_shapes(ids.numpy()))
        verdict = ("= target" if got == shapes(edit.target.shapes) else
                   "= source (unedited)" if got == shapes(edit.source.shapes) else "other")
        counts[edit.kind][verdict] += 1
    columns = ("= target", "= source (unedited)", "other")
    print(f"{'kind':14s}" + "".join(f"{c:>22s}" for c in columns))
    for kind in sorted(counts):
        n = sum(counts[kind].values())
        print(f"{kind:14s}" + "".join(f"{counts[kind][c] / n:>22.2f}" for c in columns) + f"   (n={n})")
    total = Counter()
    for c in counts.values():
        total.update(c)
    n = sum(total.values())
    print(f"{'all':14s}" + "".join(f"{total[c] / n:>22.2f}" for c in columns) + f"   (n={n})")


if __name__ == "__main__":
    main()
