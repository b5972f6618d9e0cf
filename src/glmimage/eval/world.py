"""`glmimage eval world`: judge a model on held-out world prompts and edit pairs with the world's independent judges.

Held-out means: prompts built only from items training never saw (words, shape–colour pairs, relations, edit
types; `glmimage.world.scene` / `edits` define the splits). Every image is judged by OpenCV (shapes, colours,
counts, positions) and tesseract (quoted text), never by the model. Scores:
- quoted-word accuracy (exact read of each quoted word, case-insensitive) and mean normalised edit distance;
- composition accuracy per category (count, object, colour, position, binding, background, relation) and their
  mean over the four headline categories (object, colour, count, position); a category is judged only when the
  prompt asks for it (a cell, a background), see `stated`;
- edit success (target scene matched, edited region changed, the rest preserved).
With `true_ids` the AR is skipped: the DiT paints each scene's true semantic ids (`train.data.token_codes`), which
separates what the DiT cannot draw from what the AR does not plan.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from glmimage.world import caption, sample_edit, sample_scene
from glmimage.world.captions import CELL_PHRASES
from glmimage.world.render import contact_sheet, render

HEADLINE = ("object", "colour", "count", "position")
TARGETS = {"word_accuracy": 0.9, "composition": 0.85, "edit_success": 0.8}
SCENE_KINDS_EVAL = ("single", "count", "relation", "text", "object_text")


@dataclass
class EvalConfig:
    n_per_kind: int = 40  # held-out text-to-image prompts per scene kind
    n_edits: int = 100
    seed: int = 0
    batch: int = 16
    steps: int | None = None
    guidance: float | None = None
    temperature: float | None = None
    ar_guidance: float | None = None
    true_ids: bool = False  # paint the scene graphs' semantic ids instead of sampling the AR (the DiT alone)
    out: str = "runs/eval"
    kinds: tuple[str, ...] = SCENE_KINDS_EVAL
    extra: dict = field(default_factory=dict)


def stated(prompt: str, judged: dict[str, bool]) -> dict[str, bool]:
    """Keep the categories the prompt asks for: absolute cells only when it names one ('in the top left corner'),
    the background only when it names one; shapes, colours, counts and relations are always in the prompt.
    (A prompt that says "a red circle" may put it anywhere, on any background.)"""
    out = dict(judged)
    if not any(phrase in prompt for phrase in CELL_PHRASES.values()):
        out.pop("position", None)
        out.pop("binding", None)  # binding includes the cell
    if "background" not in prompt:
        out.pop("background", None)
    return out


def heldout_prompts(cfg: EvalConfig) -> list[tuple[str, object]]:
    """[(caption, scene)] — held-out scenes of each kind, one phrasing each, deterministic from cfg.seed."""
    out = []
    for kind in cfg.kinds:
        for i in range(cfg.n_per_kind):
            rng = random.Random(f"eval-{cfg.seed}-{kind}-{i}")
            scene = sample_scene(rng, kind=kind, split="heldout")
            out.append((caption(scene, rng), scene))
    return out


def heldout_edits(cfg: EvalConfig) -> list:
    return [sample_edit(random.Random(f"eval-edit-{cfg.seed}-{i}"), split="heldout") for i in range(cfg.n_edits)]


def evaluate(pipe, cfg: EvalConfig) -> dict:
    """Generate and judge; writes <out>/world_eval.json and sample sheets; returns the report."""
    from glmimage.world.judges import composition_accuracy, edit_success, judge_composition, judge_text

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    size = pipe.cfg.sampling.height
    (th, tw), _ = pipe.cfg.grids(size, size)
    if cfg.true_ids:
        from glmimage.train.data import NUM_CODES, token_codes

        if pipe.cfg.vq.codebook_size < NUM_CODES or th != tw:
            raise ValueError(f"true_ids needs a model with the world's {NUM_CODES} semantic codes on a square grid "
                             f"(this one has {pipe.cfg.vq.codebook_size} codes, a {th}x{tw} grid)")

    def plan(scenes):
        if not cfg.true_ids:
            return None
        return torch.from_numpy(np.stack([token_codes(s, th) for s in scenes]).astype(np.int64)).view(-1, th, tw)

    kw = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, temperature=cfg.temperature,
              ar_guidance_scale=cfg.ar_guidance, progress=False)
    t0 = time.perf_counter()

    prompts = heldout_prompts(cfg)
    images = []
    for i in tqdm(range(0, len(prompts), cfg.batch), desc="held-out prompts", unit="batch"):
        chunk = prompts[i:i + cfg.batch]
        images += pipe([p for p, _ in chunk], height=size, width=size, seed=cfg.seed + i,
                       prior_ids=plan([s for _, s in chunk]), **kw).images
    comp, texts, per_item = [], [], []
    for (prompt, scene), im in zip(prompts, images):
        c = stated(prompt, judge_composition(im, scene)) if scene.shapes else {}
        t = judge_text(im, scene)
        comp += [c] if c else []
        texts += t
        per_item.append({"prompt": prompt, "composition": c, "text": t})
    t_gen = time.perf_counter() - t0

    edits = heldout_edits(cfg)
    results = []
    edit_images = []
    for i, edit in enumerate(tqdm(edits, desc="held-out edits", unit="edit")):
        src = render(edit.source, size)
        got = pipe(edit.instruction, images=[src], height=size, width=size, seed=cfg.seed + i,
                   prior_ids=plan([edit.target]), **kw).images[0]
        r = edit_success(src, got, edit)
        if not r["target"]:  # what the image got wrong of the target scene
            r["misses"] = [k for k, ok in judge_composition(got, edit.target).items() if not ok] + [
                f"text {t['target']!r} read {t['read']!r}" for t in judge_text(got, edit.target) if not t["exact"]]
        results.append({"kind": edit.kind, "instruction": edit.instruction, **r})
        edit_images.append((src, got, edit.instruction))

    cats = composition_accuracy(comp)
    report = {
        "model_size": size, "n_prompts": len(prompts), "n_texts": len(texts), "n_edits": len(edits),
        "word_accuracy": float(np.mean([t["exact"] for t in texts])) if texts else float("nan"),
        "normalized_edit_distance": float(np.mean([t["ned"] for t in texts])) if texts else float("nan"),
        "composition": float(np.mean([cats[c] for c in HEADLINE if c in cats])) if cats else float("nan"),
        "composition_per_category": cats,
        "composition_scene_exact": float(np.mean([all(c.values()) for c in comp])) if comp else float("nan"),
        "edit_success": float(np.mean([r["success"] for r in results])) if results else float("nan"),
        "edit_per_kind": {k: float(np.mean([r["success"] for r in results if r["kind"] == k]))
                          for k in sorted({r["kind"] for r in results})},
        "edit_parts": {k: float(np.mean([r[k] for r in results])) for k in ("target", "changed", "preserved")}
        if results else {},
        "seconds": time.perf_counter() - t0, "seconds_per_image": t_gen / max(1, len(prompts)),
        "config": {k: v for k, v in vars(cfg).items() if k != "extra"},
        "items": per_item, "edits": results,
    }
    (out / "world_eval.json").write_text(json.dumps(report, indent=2, default=str))
    if images:  # none with --n 0 (edits only)
        n = min(24, len(images))
        step = max(1, len(images) // n)
        contact_sheet(images[::step][:n], [p for p, _ in prompts][::step][:n], columns=6).save(out / "t2i_sheet.png")
    if edit_images:
        sheet = [im for s, g, _ in edit_images[:12] for im in (s, g)]
        caps = [c for _, _, ins in edit_images[:12] for c in ("source", ins)]
        contact_sheet(sheet, caps, columns=6).save(out / "edit_sheet.png")
    return report


def format_table(report: dict) -> str:
    rows = [("quoted-word accuracy", report["word_accuracy"], TARGETS["word_accuracy"]),
            ("normalised edit distance", report["normalized_edit_distance"], None),
            ("composition (object/colour/count/position)", report["composition"], TARGETS["composition"])]
    rows += [(f"  {k}", v, None) for k, v in report["composition_per_category"].items()]
    rows += [("  scene exact (all categories)", report["composition_scene_exact"], None),
             ("edit success", report["edit_success"], TARGETS["edit_success"])]
    rows += [(f"  {k}", v, None) for k, v in report["edit_per_kind"].items()]
    rows += [(f"  edit {k}", v, None) for k, v in report["edit_parts"].items()]
    lines = [f"{'metric':<46} {'value':>7} {'target':>7}", "-" * 62]
    for name, v, target in rows:
        if v != v:  # NaN: nothing of this kind was judged (--n 0 or --edits 0)
            lines.append(f"{name:<46} {'-':>7} {'' if target is None else f'{target:>7.2f}'}")
            continue
        mark = "" if target is None else (" ok" if v >= target else " MISS")
        lines.append(f"{name:<46} {v:>7.3f} {'' if target is None else f'{target:>7.2f}'}{mark}")
    lines.append(f"({report['n_prompts']} held-out prompts, {report['n_texts']} quoted words, {report['n_edits']} "
                 f"edits; {report['seconds_per_image']:.2f} s per image incl. batching; {report['seconds']:.0f} s)")
    if report["config"].get("true_ids"):
        lines.append("(the DiT alone: every image painted from its scene's true semantic ids, the AR skipped)")
    return "\n".join(lines)
