"""Teach a world model a word it has never read, with a LoRA adapter, and judge it before and after.

The world's captions never say "crimson". This renders a few hundred scenes with a red shape, captions them with
"crimson" in place of "red", adds as many ordinary scenes with their own captions (prior preservation: without
them the adapter forgets what "red" means), fine-tunes the AR model with LoRA (`glmimage finetune --target ar`),
then generates
held-out scenes from "crimson" prompts with the base model and with the adapter and judges the colour of every
shape with the world's OpenCV judge. Control: the same prompts saying "red" (what the base model does with a word
it knows). Writes <out>/lora_new_word.json and <out>/lora_new_word.png (rows: base | +LoRA, same seeds).

    python bench/lora_new_word.py --model runs/world/model --out runs/lora_new_word
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

WORD, MEANS = "crimson", "red"
KINDS = ("single", "count", "relation")


def scenes_with(color: str | None, n: int, split: str, seed: str):
    """n scenes (shapes only) with at least one shape of `color` (None: any), each with one phrasing of its
    caption."""
    from glmimage.world import caption, sample_scene

    out, i = [], 0
    while len(out) < n:
        rng = random.Random(f"{seed}-{i}")
        i += 1
        scene = sample_scene(rng, kind=KINDS[i % len(KINDS)], split=split)
        if color is None or any(s.color == color for s in scene.shapes):
            out.append((scene, caption(scene, rng)))
    return out


def rename(text: str) -> str:
    return re.sub(rf"\b{MEANS}\b", WORD, text)


def judge(pipe, prompts_scenes, seed: int) -> tuple[list, dict]:
    """-> images, {"red shape": share of images with a shape the judge calls red, "colour": the world eval's colour
    category (the colours of all shapes, as a multiset, match the prompt's)}."""
    from glmimage.world.judges import detect_objects, judge_composition

    size = pipe.cfg.sampling.height
    images = []
    for i in range(0, len(prompts_scenes), 8):
        chunk = prompts_scenes[i:i + 8]
        images += pipe([p for p, _ in chunk], height=size, width=size, seed=[seed + i + j for j in range(len(chunk))],
                       progress=False).images
    present = [any(o.color == MEANS for o in detect_objects(im)) for im in images]
    colour = [judge_composition(im, scene)["colour"] for im, (_, scene) in zip(images, prompts_scenes)]
    return images, {f"{MEANS} shape": float(np.mean(present)), "colour": float(np.mean(colour))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/world/model")
    ap.add_argument("--out", default="runs/lora_new_word")
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--retrain", action="store_true", help="train again even when <out>/run has an adapter")
    args = ap.parse_args()

    import glmimage
    from glmimage import lora
    from glmimage.finetune import grid
    from glmimage.world.render import render

    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train = [(s, rename(c)) for s, c in scenes_with(MEANS, args.n_train, "train", "lora-train")]
    train += scenes_with(None, args.n_train, "train", "lora-prior")
    for i, (scene, cap) in enumerate(train):
        render(scene, 64).save(data / f"{i:04d}.png")
        (data / f"{i:04d}.txt").write_text(cap)
    assert not any(WORD in c for _, c in scenes_with(MEANS, 200, "train", "world-check"))  # the world never says it

    cmd = [sys.executable, "-m", "glmimage", "finetune", "--model", args.model, "--data", str(data), "--out",
           str(out / "run"), "--target", "ar", "--method", "lora", "--rank", str(args.rank), "--steps",
           str(args.steps), "--batch-size", "16", "--lr", args.lr, "--threads", str(args.threads),
           "--sample-every", str(args.steps), "--ckpt-every", "50"]
    print(" ".join(cmd), flush=True)
    if args.retrain or not (out / "run" / "adapter.safetensors").is_file():
        subprocess.run(cmd, check=True)

    held = scenes_with(MEANS, args.n_eval, "heldout", "lora-eval")
    new = [(rename(c), s) for s, c in held]
    old = [(c, s) for s, c in held]
    base = glmimage.load(args.model, device="cpu")
    base_new_images, base_new = judge(base, new, 0)
    _, base_old = judge(base, old, 0)
    tuned = glmimage.load(args.model, device="cpu")
    lora.apply(tuned, [str(out / "run" / "adapter.safetensors")])
    tuned_new_images, tuned_new = judge(tuned, new, 0)
    _, tuned_old = judge(tuned, old, 0)
    report = {"word": WORD, "means": MEANS, "n_train": args.n_train, "n_prior": args.n_train, "n_eval": args.n_eval,
              "steps": args.steps, "rank": args.rank, "lr": args.lr, "judged": {
                  f"base, '{WORD}' prompts": base_new, f"base + LoRA, '{WORD}' prompts": tuned_new,
                  f"base, '{MEANS}' prompts (control)": base_old, f"base + LoRA, '{MEANS}' prompts": tuned_old}}
    (out / "lora_new_word.json").write_text(json.dumps(report, indent=2))
    k = 12
    grid([[render(s, 64) for _, s in new[:k]], base_new_images[:k], tuned_new_images[:k]], cell=96).save(
        out / "lora_new_word.png")
    print(json.dumps(report, indent=2))
    print("prompts:", "; ".join(p for p, _ in new[:k]))


if __name__ == "__main__":
    main()
