"""What fine-tuning costs: seconds per step and peak memory of LoRA vs full fine-tuning, with and without activation
checkpointing, one process each (`glmimage finetune`, bf16 autocast), on the `small` preset (about 100 M parameters
per component, random weights) and 32 captioned world renders. Writes <out>/finetune_cost.json and prints a
Markdown table with ratios to full fine-tuning.

    python bench/finetune_cost.py --target dit --resolution 256 --steps 4 --out runs/finetune_cost
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

VARIANTS = {"full": ["--method", "full"], "full + checkpointing": ["--method", "full", "--grad-checkpointing"],
            "LoRA r16": ["--method", "lora", "--rank", "16"],
            "LoRA r16 + checkpointing": ["--method", "lora", "--rank", "16", "--grad-checkpointing"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="dit", choices=["ar", "dit", "both"])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/finetune_cost")
    args = ap.parse_args()

    import glmimage
    from glmimage.checkpoint import build
    from glmimage.config import preset
    from glmimage.dit.model import fill_zero_params
    from glmimage.tokenizer.text import TextTokenizer
    from glmimage.world import caption, sample_scene
    from glmimage.world.render import render

    out = Path(args.out)
    model, data = out / "small", out / "data"
    if not (model / "config.json").is_file():
        cfg = preset("small")
        pipe = build(cfg, TextTokenizer.byte_level(cfg.vq.codebook_size), device="cpu", seed=0)
        fill_zero_params(pipe.dit, std=0.02)
        glmimage.save(pipe, model)
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(32):
        scene = sample_scene(rng)
        render(scene, args.resolution).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(caption(scene, rng))

    rows = {}
    for name, extra in VARIANTS.items():
        run = out / name.replace(" ", "_").replace("+", "")
        cmd = [sys.executable, "-m", "glmimage", "finetune", "--model", str(model), "--data", str(data), "--out",
               str(run), "--cache", str(out / "cache"), "--target", args.target, "--resolution",
               str(args.resolution), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads",
               str(args.threads), "--set", "n_samples=0", "--set", "warmup=1", "--ckpt-every", "1000", *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        s = json.loads((run / "summary.json").read_text())
        rows[name] = {"trained_M": s["trained_parameters"] / 1e6, "s_per_step": s["seconds_per_step"],
                      "peak_mib": s["peak_memory_mib"]["cpu"]}
    report = {"target": args.target, "resolution": args.resolution, "batch_size": args.batch_size,
              "threads": args.threads, "rows": rows}
    (out / "finetune_cost.json").write_text(json.dumps(report, indent=2))
    full = rows["full"]
    print(f"| {args.target}, {args.resolution}², batch {args.batch_size} | trained | s/step | × full | peak RSS | "
          f"× full |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['trained_M']:.1f} M | {r['s_per_step']:.2f} | {r['s_per_step'] / full['s_per_step']:.2f}"
              f" | {r['peak_mib']:.0f} MiB | {r['peak_mib'] / full['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
