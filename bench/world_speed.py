"""Seconds per image of the embedded world model on this machine (README "Embedded model" table).

    python bench/world_speed.py [--n 20] [--threads N] [--model world] [--json bench/world_speed.json]

Times single-prompt text-to-image calls (64×64, the model's default steps and guidance) after one warm-up call,
and reports the median of each stage (AR, DiT, VAE, total) and the mean.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

import glmimage

PROMPTS = ["a green triangle to the left of a yellow star", 'a sign that says "OPEN"', "two blue squares",
           'a purple star above the word "MOON" on an orange background', "a red circle"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", default="world")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = glmimage.load(args.model, device="cpu")
    pipe(PROMPTS[0], progress=False)  # warm-up
    runs = [pipe(PROMPTS[i % len(PROMPTS)], seed=i, progress=False).timings for i in range(args.n)]
    report = {k: statistics.median(r[k] for r in runs) for k in ("ar", "dit", "vae", "total")}
    report["mean_total"] = statistics.fmean(r["total"] for r in runs)
    seconds = set(report)
    report.update(n=args.n, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                  torch=torch.__version__, steps=pipe.cfg.sampling.num_inference_steps,
                  guidance=pipe.cfg.sampling.guidance_scale)
    print(" ".join(f"{k} {v:.3f}s" if k in seconds else f"{k} {v}" for k, v in report.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
