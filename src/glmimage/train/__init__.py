"""Training stages of the world model: data → vae → tokenizer → ar → dit, each a linear `main(cfg)`.

`run(stage, ...)` picks the stage's recipe (`world`, or `quick` for a smoke run of a few steps), applies overrides
and runs it; `run("all", ...)` runs every stage, two at a time on a multi-core CPU (`schedule.py`), and assembles
the model folder <out>/model.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

STAGES = ("data", "vae", "tokenizer", "ar", "dit")
DISTRIBUTED = ("ar", "dit")  # stages that run under torchrun (DDP); the others are quick or bound by data work

# Per stage: the recipe of the world model (`world`) and the smoke-test one (`quick`). `train all --preset world`
# runs the world recipe from nothing in under three hours on two cores (train/schedule.py; README "The recipe as
# one command, measured"). The embedded model came from an earlier, longer form of it (more DiT steps, then legs that
# retrained the ViT and the AR on more edit pairs; README "The embedded world model"); this one trades those DiT
# steps for the ViT's and the AR's, and the 240,000 edit pairs of the legs, inside the bound; the VAE ends with a
# decoder leg of batch 16 (half the embedded model's batch, for most of its gain in edits).
RECIPES: dict[str, dict[str, dict]] = {
    # ten times the edit pairs for the ViT and the AR; latents for the first 24,000 only (the DiT's edit rows)
    "data": {"world": dict(n_scenes=60000, n_edits=240000), "quick": dict(n_scenes=192, n_edits=96)},
    "vae": {"world": dict(steps=1500, batch_size=64, lr=1e-3, warmup=100, sample_every=250, ckpt_every=250,
                          decoder_steps=3000, decoder_batch_size=16, edit_latents=24000),
            "quick": dict(steps=3, batch_size=8, sample_every=3, ckpt_every=2, n_stats=64, decoder_steps=2,
                          decoder_batch_size=4)},
    "tokenizer": {"world": dict(steps=6000, batch_size=128, lr=1e-3, warmup=100, sample_every=500, ckpt_every=250,
                            factored_codebook=True, edit_images=True),
                  "quick": dict(steps=3, batch_size=8, sample_every=3, ckpt_every=2)},
    "ar": {"world": dict(steps=6000, batch_size=64, lr=1e-3, warmup=200, sample_every=1000, ckpt_every=250,
                         edit_fraction=0.5),
           "quick": dict(steps=3, batch_size=8, sample_every=3, ckpt_every=2)},
    "dit": {"world": dict(steps=4000, restart_at=0, batch_size=64, lr=5e-4, warmup=300, sample_every=1000,
                          ckpt_every=250, fg_weight=3.0, fg_from_step=2000, text_fraction=0.3, noise_shift=3.0,
                          glyph_aux=0.1, edit_fraction=0.5),
            "quick": dict(steps=3, restart_at=2, batch_size=8, sample_every=3, ckpt_every=2, n_samples=2)},
}


def for_stage(stage: str, overrides: dict) -> dict:
    """The overrides of a run (`train all` or the command line) that apply to `stage`: data has no steps."""
    return {k: v for k, v in overrides.items() if not (stage == "data" and k == "steps")}


def stage_config(stage: str, recipe: str = "world", **overrides):
    """The config object of a stage with its recipe and overrides applied."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES + ('all',))}")
    if recipe not in RECIPES[stage]:
        raise ValueError(f"unknown recipe {recipe!r} for stage {stage}; valid: {sorted(RECIPES[stage])}")
    mod = importlib.import_module(f"glmimage.train.{stage}")
    cls = next(v for k, v in vars(mod).items() if k.endswith("TrainConfig") and isinstance(v, type))
    return cls().with_overrides(**{**RECIPES[stage][recipe], **overrides})


def run(stage: str, recipe: str = "world", **overrides) -> Path:
    """Run one stage (or "all") and return its output folder."""
    if stage == "all":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"`train all` runs in one process; under torchrun run the stages {', '.join(DISTRIBUTED)}")
        from glmimage.train.schedule import run_all

        return run_all(recipe, overrides)
    cfg = stage_config(stage, recipe, **overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and stage not in DISTRIBUTED:
        raise ValueError(f"stage {stage} runs in one process; under torchrun: {', '.join(DISTRIBUTED)} (and "
                         "`glmimage finetune`)")
    return importlib.import_module(f"glmimage.train.{stage}").main(cfg)
