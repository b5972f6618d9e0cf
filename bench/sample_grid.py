"""The README's sample grid: the embedded model on a fixed list of prompts (seed 0), judged, as one PNG.

    python bench/sample_grid.py [--model world] [--out docs/world_samples.png]

Prompts in the second half use only held-out items (words, shape–colour pairs, relations never seen in training).
"""
from __future__ import annotations

import argparse

import glmimage
from glmimage.world.render import contact_sheet

PROMPTS = [
    "a green triangle to the left of a yellow star",
    "two blue squares",
    'a sign that says "OPEN"',
    'a purple star above the word "MOON" on an orange background',
    "a red circle on a white background",
    "three yellow hearts",
    "a black diamond below a pink circle",
    'the word "CAFE" in red letters',
    "a gray square on the right",
    'a sign that says "HELLO"',
    "a white star on a blue background",
    "an orange heart in the top left corner",
    # held out: never in training
    'a sign that says "ZEBRA"',
    'a sign that says "PIANO"',
    "a purple circle",
    "an orange square on a white background",
    "a circle to the left of a star",
    'the word "JAZZ" in black letters',
    "a cyan triangle",
    'a green diamond above the word "LEMON"',
    "a red star on a black background",
    'a sign that says "TIGER"',
    "a blue heart",
    'a sign that says "FROG"',
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="world")
    ap.add_argument("--out", default="docs/world_samples.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = glmimage.load(args.model, device="cpu")
    images = pipe(PROMPTS, seed=args.seed, progress=False).images
    contact_sheet(images, PROMPTS, columns=6, scale=2).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
