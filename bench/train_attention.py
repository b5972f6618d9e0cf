"""The CPU's fused (flash) attention kernel against the math one, in training: forward + backward.

Two measurements, both on one thread by default (`train all` gives each stage one):
- the attention call alone at each world stage's shapes (bf16, batch, heads, tokens, mask as the stage has them),
  the two kernels interleaved call by call and the median kept, so that the machine's drift cancels out;
- with `--run`, whole steps of each stage's own `main` on a finished run's files (its data, ids and latents, linked
  into a scratch folder), stopped after `--steps` steps and timed after the first few: batch building, forward,
  backward and optimizer included. Each stage runs once per kernel, one after the other.

`train/common.py` `forward` picks the math kernel on a CPU since 2026-12-07; the fused variant here is PyTorch's
default pick (that context without the kernel choice).

    python bench/train_attention.py [--reps 12] [--run runs/r3 [--stages ar dit tokenizer vae] [--steps 30]] \
        [--threads 1] [--recipe world]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from glmimage.train import common as C
from glmimage.train import run

WARMUP = 5  # steps left out of the timing (allocator, first-call costs)


# (batch, heads, kv heads, query tokens, key tokens, head dim, causal, masked) of the world stages' attention calls
SHAPES = {
    "ar: 64 rows, 4 heads (2 kv), ~60 tokens, causal": (64, 4, 2, 60, 60, 64, True, False),
    "dit text-to-image: 64 rows, 4 heads, 80 tokens, mask": (64, 4, 4, 80, 80, 64, False, True),
    "dit edit: 64 rows, 80 queries, 144 keys, mask": (64, 4, 4, 80, 144, 64, False, True),
    "tokenizer ViT: 128 images, 4 heads, 16 tokens": (128, 4, 4, 16, 16, 32, False, False),
    "vae mid-block: 64 crops, 1 head, 64 tokens": (64, 1, 1, 64, 64, 64, False, False),
}


def time_call(shape: tuple, reps: int) -> tuple[float, float]:
    """Median seconds of one attention forward + backward in bf16: (fused, math), interleaved call by call."""
    b, h, hkv, lq, lk, d, causal, masked = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, l, d, generator=g).bfloat16().requires_grad_()
               for n, l in ((h, lq), (hkv, lk), (hkv, lk)))
    mask = None
    if masked:
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.1
        mask[..., 0] = True  # no row fully masked
    times: dict[str, list[float]] = {"fused": [], "math": []}
    for _ in range(reps):
        for kernel in times:
            backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
            with sdpa_kernel(backends):
                t = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=h != hkv).float().sum().backward()
                times[kernel].append(time.perf_counter() - t)
    return tuple(sorted(ts)[len(ts) // 2] for ts in times.values())


class Enough(Exception):
    """Raised from the timed context once a stage has run its steps: stops it before its reading or latents."""


def time_stage(stage: str, run_dir: Path, steps: int, threads: int, fused: bool, recipe: str = "world") -> float:
    """Seconds per step of `stage` (the mean over steps WARMUP..steps), its inputs taken from `run_dir`."""
    stamps: list[float] = []
    math_forward = C.forward

    def timed(enabled, device="cpu"):
        stamps.append(time.perf_counter())
        if len(stamps) > steps:
            raise Enough
        return C.autocast(enabled, device) if fused else math_forward(enabled, device)

    with tempfile.TemporaryDirectory(dir=run_dir.parent) as tmp:
        out = Path(tmp)
        for name in ("data", "tokenizer", "vae"):  # the stage's inputs; its own folder gets the files alone
            src = run_dir / name
            if name != stage:
                os.symlink(src.resolve(), out / name)
            else:
                (out / name).mkdir()
                for f in src.glob("*.npy"):
                    os.link(f, out / name / f.name)
        C.forward = timed
        try:
            run(stage, recipe, out=str(out), threads=threads, steps=steps + 1, sample_every=10**9,
                ckpt_every=10**9)
        except Enough:
            pass
        finally:
            C.forward = math_forward
    if len(stamps) <= WARMUP + 1:
        raise RuntimeError(f"{stage} ran {len(stamps)} steps; give --steps > {WARMUP + 1}")
    return (stamps[-1] - stamps[WARMUP]) / (len(stamps) - 1 - WARMUP)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12, help="calls of each kernel per shape")
    ap.add_argument("--run", help="a finished `train all` folder (data, tokenizer, vae): also time whole steps")
    ap.add_argument("--stages", nargs="+", default=["ar", "dit", "tokenizer", "vae"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default="world", help="the stages' recipe (`quick` for a `train all --quick` run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'attention forward + backward, bf16':52s}{'fused ms':>10s}{'math ms':>10s}{'math/fused':>12s}"
          f"   ({args.threads} thread(s))")
    for name, shape in SHAPES.items():
        fused, math = time_call(shape, args.reps)
        print(f"{name:52s}{fused * 1e3:10.1f}{math * 1e3:10.1f}{math / fused:12.2f}", flush=True)
    if not args.run:
        return
    rows = []
    for stage in args.stages:
        fused = time_stage(stage, Path(args.run), args.steps, args.threads, True, args.recipe)
        math = time_stage(stage, Path(args.run), args.steps, args.threads, False, args.recipe)
        rows.append((stage, fused, math))
        print(f"{stage}: fused {fused:.3f} s/step, math {math:.3f} s/step", flush=True)
    print(f"\n{'whole step':10s}{'fused s':>10s}{'math s':>10s}{'math/fused':>12s}")
    for stage, fused, math in rows:
        print(f"{stage:10s}{fused:10.3f}{math:10.3f}{math / fused:12.2f}")


if __name__ == "__main__":
    main()
