"""Where a shape is lost: the composition judge on the same held-out scenes rendered clean, passed through the
model's VAE (encode → decode: the ceiling of anything the DiT paints), painted by the DiT from the scenes' true
semantic ids (no AR), and drawn by the whole pipeline from their captions; each judged on what its caption asks
(`glmimage eval world`'s rule: a cell only when the caption names one). With `--from-sigma`, also the DiT from the
true ids started from each scene's own clean latents noised to σ (SDEdit): how much noise the DiT can take and
still give the shape back, i.e. where in the trajectory shapes are lost. Writes a sheet of the rows.

    python bench/stage_ceilings.py [--model world] [--n 60] [--out runs/ceilings]
"""
from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import glmimage
import glmimage.dit.sample as dsample
from glmimage.eval.world import stated
from glmimage.train.data import token_codes
from glmimage.world import caption, sample_scene
from glmimage.world.judges import composition_accuracy, judge_composition
from glmimage.world.render import contact_sheet, render


@contextlib.contextmanager
def start_from(z0: torch.Tensor, sigma0: float):
    """Within: the DiT's sampler skips its steps above sigma0 and starts from (1 − σ)·z0 + σ·noise."""
    plain = dsample.sample

    def sample(model_fn, noise, ts, sigmas, progress=None):
        i = next(i for i in range(len(ts)) if float(sigmas[i]) <= sigma0)
        x = (1 - float(sigmas[i])) * z0.to(noise.device) + float(sigmas[i]) * noise.float()
        return plain(model_fn, x, ts[i:], sigmas[i:], progress)

    dsample.sample = sample
    try:
        yield
    finally:
        dsample.sample = plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world")
    ap.add_argument("--n", type=int, default=60, help="held-out scenes per kind (single, count, relation)")
    ap.add_argument("--out", default="runs/ceilings")
    ap.add_argument("--from-sigma", type=float, nargs="*", default=[], metavar="SIGMA",
                    help="also start the DiT at these noise levels from the clean latents, e.g. 0.2 0.4 0.6 0.8")
    args = ap.parse_args()
    pipe = glmimage.load(args.model, device="cpu")
    scenes, prompts = [], []
    for kind in ("single", "count", "relation"):
        for i in range(args.n):
            rng = random.Random(f"ceiling-{kind}-{i}")
            scenes.append(sample_scene(rng, kind=kind, split="heldout"))
            prompts.append(caption(scenes[-1], rng))
    size = pipe.cfg.sampling.height
    clean = [render(s, size) for s in scenes]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in clean])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = pipe.vae.encode(x.to(pipe.vae.model.dtype))
    rec = pipe.vae.decode(z0).float().clamp(-1, 1)
    vae = [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for r in rec]
    (th, tw), _ = pipe.cfg.grids(size, size)
    prior = torch.from_numpy(np.stack([token_codes(s, th) for s in scenes]).astype(np.int64)).view(-1, th, tw)
    dit, full = [], []
    for i in range(0, len(scenes), 30):
        dit += pipe(prompts[i:i + 30], prior_ids=prior[i:i + 30], seed=i, progress=False).images
        full += pipe(prompts[i:i + 30], seed=i, progress=False).images
    rows = {"clean render": clean, "VAE reconstruction": vae, "DiT from the true ids": dit, "whole pipeline": full}
    for s0 in args.from_sigma:
        images = []
        for i in range(0, len(scenes), 30):
            with start_from(z0[i:i + 30].float(), s0):
                images += pipe(prompts[i:i + 30], prior_ids=prior[i:i + 30], seed=i, progress=False).images
        rows[f"DiT from sigma {s0:g}"] = images
    print(f"{'':24} " + " ".join(f"{k:>8}" for k in ("object", "colour", "count", "position", "relation")))
    judged = {name: [judge_composition(im, s) for s, im in zip(scenes, images)] for name, images in rows.items()}
    for name, results in judged.items():
        acc = composition_accuracy([stated(p, r) for p, r in zip(prompts, results)])
        print(f"{name:24} " + " ".join(f"{acc.get(k, float('nan')):8.3f}"
                                       for k in ("object", "colour", "count", "position", "relation")))
    singles = [(s, r) for s, r in zip(scenes, judged["DiT from the true ids"]) if len(s.shapes) == 1]
    for factor in ("shape", "size"):
        groups = {}
        for s, r in singles:
            groups.setdefault(getattr(s.shapes[0], factor), []).append(r["object"])
        print(f"DiT from the true ids, one-shape scenes, object by {factor}: "
              + ", ".join(f"{k} {np.mean(v):.2f} ({len(v)})" for k, v in sorted(groups.items())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pick = list(range(0, len(scenes), max(1, len(scenes) // 12)))[:12]
    sheet = [rows[k][i] for k in rows for i in pick]
    contact_sheet(sheet, [f"{k}" if j == 0 else "" for k in rows for j in range(len(pick))], columns=len(pick)
                  ).save(out / "ceilings.png")
    print(f"wrote {out / 'ceilings.png'}")


if __name__ == "__main__":
    main()
