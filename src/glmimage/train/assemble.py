"""Put the stage outputs of a run together into one model folder in glmimage's format (<out>/model).

Ids that never occur in training (held-out shape–colour pairs) get their embedding / head rows from an additive fit
of the seen ones (`complete_unseen`); everything else is copied as trained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from glmimage import checkpoint
from glmimage.config import ModelConfig, preset
from glmimage.tokenizer.text import TextTokenizer
from glmimage.train import data as D


# component -> (stage, final weights file, prefix of the same weights in the stage checkpoint (the EMA where kept))
SOURCES = {"ar": ("ar", "ar.safetensors", "ar."), "vq": ("tokenizer", "vq.safetensors", "vq."),
           "dit": ("dit", "dit.safetensors", "ema_dit."), "glyph": ("dit", "glyph.safetensors", "ema_glyph."),
           "vae": ("vae", "vae.safetensors", "vae.")}
# the id tables whose rows of ids never seen in training are filled in by complete_unseen (the ViT's codebook: an
# untrained row is never the nearest, so a held-out pair would be read as another shape of its colour)
UNSEEN_ROWS = (("ar", "embed_tokens.weight"), ("ar", "lm_head.weight"), ("dit", "prior_embedding.weight"),
               ("vq", "codebook.weight"))


def _from_checkpoint(stage_dir: Path, prefix: str) -> dict[str, torch.Tensor] | None:
    ck = stage_dir / "ckpt" / "model.safetensors"
    if not ck.is_file():
        return None
    weights = load_file(str(ck))
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)} or None


def assemble(out: str | Path, *, preset_name: str = "world", dtype: str = "float16",
             dest: str | Path | None = None, live: bool = False, base: str | Path | None = None) -> Path:
    """<out>/{ar,tokenizer,dit,vae} -> <dest or out/model>, weights stored in `dtype`. live=True takes each stage's
    newest checkpoint (the EMA where the stage keeps one) instead of its final file: a snapshot of a run in
    progress, without stopping it. base: a model folder (`world`: the embedded model) that gives what the run has
    not trained: a run that retrained the tokenizer and the AR only takes the DiT, glyph encoder and VAE from it."""
    out = Path(out)
    folder = checkpoint.model_folder(base) if base is not None else None
    if folder is not None and not (folder / "model.safetensors").is_file():
        raise ValueError(f"base={base!r} is not a glmimage model folder (no {folder / 'model.safetensors'})")
    state, from_base, base_flat = {}, [], None
    for comp, (stage, name, prefix) in SOURCES.items():
        sd = _from_checkpoint(out / stage, prefix) if live else None
        if sd is None and (out / stage / name).is_file():
            sd = load_file(str(out / stage / name))
        if sd is None and folder is not None:
            if base_flat is None:  # read once, whatever the run lacks
                base_flat = checkpoint.read_safetensors([folder / "model.safetensors"])
            sd = {k[len(comp) + 1:]: v.float() for k, v in base_flat.items() if k.startswith(comp + ".")}
            from_base.append(comp)
        if not sd:
            where = f"{' and no checkpoint' if live else ''}{f' and none in {folder}' if folder else ''}"
            raise ValueError(f"run {out} has no weights for {comp} yet (no {out / stage / name}{where})")
        state[comp] = sd
    cfg_dict = preset(preset_name).to_dict()
    # the VAE's config with its measured latents mean / std: the run's, or the base model's with its weights
    cfg_dict["vae"] = (json.loads((folder / "config.json").read_text())["vae"] if "vae" in from_base
                       else json.loads((out / "vae" / "vae.json").read_text()))
    cfg = ModelConfig.from_dict(cfg_dict)
    checkpoint._tie_t5(state["glyph"])
    trained = [(comp, key) for comp, key in UNSEEN_ROWS if comp not in from_base]  # the base's are completed
    seen = seen_codes(out) if trained else None  # a VAE-only run has no ids
    for comp, key in trained:
        state[comp][key] = complete_unseen(state[comp][key], seen)
    tok = TextTokenizer.from_file(out / "ar" / "tokenizer.json" if "ar" not in from_base else folder / "tokenizer.json")
    pipe = checkpoint.build(cfg, tok, device="cpu", state=state)
    return checkpoint.save(pipe, Path(dest) if dest else out / "model", dtype=dtype)


def seen_codes(out: str | Path) -> np.ndarray:
    """The semantic ids that occur in the run's training targets (any grid, any stage)."""
    tok = Path(out) / "tokenizer"
    return np.unique(np.concatenate([np.load(tok / f"ids_{k}.npy").ravel()
                                     for k in ("scenes", "preview", "source", "target")]))


def complete_unseen(table: torch.Tensor, seen: np.ndarray) -> torch.Tensor:
    """Rows of an id table (embedding or output head, (K, D)) for ids never seen in training, filled in from the
    seen rows by a least-squares additive fit over the ids' factors (shape·part + colour·part for shapes,
    colour·part + font·part for text). A shape–colour pair held out of training then gets the row that its shape
    and its colour imply instead of an untrained one."""
    k = min(table.shape[0], D.NUM_CODES)
    x = D.factor_matrix(k).double()
    seen_mask = torch.zeros(k, dtype=torch.bool)
    seen_mask[torch.from_numpy(seen[seen < k].astype(np.int64))] = True
    w = table[:k].double()
    coef = torch.linalg.lstsq(x[seen_mask], w[seen_mask], driver="gelsd").solution  # (F, D)
    out = table.clone()
    fill = ~seen_mask
    out[:k][fill] = (x[fill] @ coef).to(table.dtype)
    return out
