"""The embedded world model: ships in the package, is every command's default, and draws what it is asked.

Judged by the world's independent judges (OpenCV shapes, tesseract OCR) on prompts fixed here; a blank, noisy or
wrong image fails. The full held-out evaluation is `glmimage eval world` (README); this is its small, fast cousin.
The thresholds guard what the shipped model does (measured 2026-12-03 with its defaults, guidance 3 and AR
temperature 0.15, since the canvas's shape channel: composition 0.96 / 0.95 / 0.95 on these prompts at seeds 0–2,
object 0.83 / 0.79 / 0.79, where a change of the AR's random draws alone moves it by 0.03; OCR reads 8/8 held-out
words whole; 6/6 recolour edits that keep the image and change the object), with a margin for another machine's
arithmetic; composition's is the issue's target. Edits do not meet theirs yet (README); raise them as the model
improves.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

import glmimage
from glmimage.checkpoint import EMBEDDED
from glmimage.eval.world import HEADLINE, stated
from glmimage.cli import main as cli
from glmimage.world import caption, sample_edit, sample_scene
from glmimage.world.judges import composition_accuracy, edit_success, judge_composition, judge_text
from glmimage.world.render import render

pytestmark = pytest.mark.skipif(not (EMBEDDED / "config.json").is_file(), reason="embedded model not built")


@pytest.fixture(scope="module")
def pipe():
    return glmimage.load("world", device="cpu")


def test_ships_small_and_half_precision():
    size = sum(f.stat().st_size for f in EMBEDDED.iterdir())
    assert size <= 30_000_000, f"embedded model is {size / 1e6:.1f} MB"
    from safetensors import safe_open

    with safe_open(str(EMBEDDED / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}


def _scenes(kind: str, n: int, split: str) -> list:
    out = []
    for i in range(n):
        rng = random.Random(f"test-embedded-{kind}-{i}")
        scene = sample_scene(rng, kind=kind, split=split)
        out.append((caption(scene, rng), scene))
    return out


def test_draws_shapes_where_and_as_asked(pipe):
    items = _scenes("single", 12, "train") + _scenes("relation", 12, "heldout")
    images = pipe([p for p, _ in items], seed=0, progress=False).images
    results = [stated(p, judge_composition(im, scene)) for (p, scene), im in zip(items, images)]
    acc = composition_accuracy(results)
    headline = np.mean([acc[k] for k in HEADLINE])
    assert headline >= 0.85 and acc["object"] >= 0.65, (acc, [p for p, _ in items])


def test_writes_text_where_asked(pipe):
    """Held-out words OCR reads back whole, in the quoted word's band (a blank band reads "" and scores edit
    distance 1): the canvas's text channel (world/canvas.py)."""
    items = _scenes("text", 8, "heldout")
    images = pipe([p for p, _ in items], seed=0, progress=False).images
    reads = [r for (_, scene), im in zip(items, images) for r in judge_text(im, scene)]
    assert sum(r["ned"] == 0 for r in reads) >= 7, reads  # read whole (measured 2026-12-03: see the docstring)
    assert np.mean([r["ned"] for r in reads]) <= 0.1, reads


def test_edits_an_image(pipe):
    edits = [sample_edit(random.Random(f"test-embedded-edit-{i}"), kind="recolor") for i in range(6)]
    results = []
    for i, e in enumerate(edits):
        src = render(e.source, 64)
        got = pipe(e.instruction, images=[src], seed=i, progress=False).images[0]
        results.append(edit_success(src, got, e))
    assert sum(r["preserved"] for r in results) >= 5 and sum(r["changed"] for r in results) >= 5, results


def test_a_new_background_keeps_the_letters(pipe):
    """Background edits of scenes with text quote no word: the canvas traces the source's letters (world/canvas.py
    traced_text) and OCR reads them back whole on the new background (measured 2026-12-03: 18 of 20, mean edit
    distance 0.08; 13 of 20 and 0.31 with the trace off, the DiT repainting the letters from the source latents)."""
    edits = [e for e in (sample_edit(random.Random(f"test-embedded-keep-{i}"), kind="background")
                         for i in range(200)) if e.source.texts][:20]
    reads = []
    for i, e in enumerate(edits):
        got = pipe(e.instruction, images=[render(e.source, 64)], seed=i, progress=False).images[0]
        reads += judge_text(got, e.target)
    assert len(reads) == 20 and sum(r["exact"] for r in reads) >= 16, reads
    assert np.mean([r["ned"] for r in reads]) <= 0.15, reads


def test_cli_draws_with_it(tmp_path):
    out = tmp_path / "x.png"
    assert cli(["generate", "a green triangle to the left of a yellow star", "--model", "world", "-o", str(out),
                "--quiet"]) == 0
    img = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert img.shape == (64, 64, 3) and img.std() > 10
