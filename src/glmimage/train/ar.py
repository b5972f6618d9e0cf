"""Stage `ar`: train the AR generator to write the preview grid then the target grid (text-to-image) and the target
grid from a condition image's ids and an instruction (image-to-image), with caption and instruction dropout. The
condition ids are the ones the trained ViT reads from the source image (tokenizer stage, ids_source_read.npy), as in
use.

Sequences are laid out by `ar.generate.layout_prompt`, the same function inference uses, so training and sampling
see identical ids and mRoPE positions. Rows are left-padded so that the grids end every row; the loss is the cross
entropy of the grid ids only. Outputs in <out>/ar/: ar.safetensors, samples.png (what the sampled ids say, next
to the ids of the real image, at 4-px resolution), loss.png, tb/, ckpt/.

Under torchrun the model is wrapped in DDP and each process takes its slice of the global batch (every process
draws the whole batch from (seed, step), so N processes see the losses of one).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from glmimage import parallel
from glmimage.ar import generate as argen
from glmimage.ar.model import ARModel
from glmimage.checkpoint import model_folder
from glmimage.config import preset
from glmimage.tokenizer.text import TextTokenizer, train_bpe
from glmimage.train import common as C
from glmimage.train.data import Dataset, factored_init_
from glmimage.train.tokenizer import ids_to_image


@dataclass(frozen=True, kw_only=True)
class ARTrainConfig(C.StageConfig):
    preset: str = "world"
    edit_fraction: float = 0.3  # share of image-to-image rows in a batch
    caption_dropout: float = 0.1  # text-to-image rows trained with an empty prompt
    # image-to-image rows trained with an empty instruction (the source alone): the unconditional row that AR
    # guidance (`--ar-guidance`) compares an edit's plan with; 0 draws nothing, so older runs resume unchanged
    instruction_dropout: float = 0.0
    n_samples: int = 8
    bpe_merges: int = 512  # the prompt BPE (captions are ~4× shorter than in bytes)
    factor_init: bool = False  # embedding and head rows of the ids start as sums of their factors (factored_init_)
    # the edit rows' source grid: "read" = the ids the trained ViT reads from the source image (tokenizer stage,
    # ids_source_read.npy), as the pipeline gives them; "true" = the source scene graph's own ids
    edit_source: str = "read"
    # extra loss weight on the target ids of an image-to-image row that differ from its source grid (what the edit
    # changes, and the source's misreadings it must correct): 1 + edit_weight there, 1 elsewhere; 0 = plain CE
    edit_weight: float = 0.0


def stage_dir(cfg) -> Path:
    return Path(cfg.out) / "ar"


def init_weights(model: ARModel) -> None:
    """GPT-2 style: N(0, 0.02) for linears and the embedding, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def make_batch(rows: list[tuple[argen.Prompt, torch.Tensor]], pad_id: int):
    """[(prompt, grid ids (N,))] -> ids (B, L), pos (3, B, L), targets (B, L) (-100 = no loss).

    Rows are right-padded, so plain causal attention is exact for every real token (pads only follow them)."""
    seqs = [(torch.cat([p.ids, g]), torch.cat([p.pos, p.decode_pos], dim=1), p.ids.numel()) for p, g in rows]
    L = max(s[0].numel() for s in seqs)
    b = len(seqs)
    ids = torch.full((b, L), pad_id, dtype=torch.long)
    pos = torch.zeros(3, b, L, dtype=torch.long)
    targets = torch.full((b, L), -100, dtype=torch.long)
    for i, (s, p, t) in enumerate(seqs):
        n = s.numel()
        ids[i, :n], pos[:, i, :n] = s, p
        targets[i, t - 1:n - 1] = s[t:]  # position j predicts token j + 1; only grid tokens are targets
    return ids, pos, targets


def edit_weights(source: torch.Tensor, target: torch.Tensor, w: float) -> torch.Tensor:
    """Loss weights of an edit row's target grid: 1 + w where the target id differs from the source's, else 1."""
    return 1.0 + w * (target != source).float()


def target_weights(targets: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Each row's grid weights (in grid order, as make_batch lays out its targets) at its target positions (B, L);
    0 where there is no target."""
    out = torch.zeros(targets.shape)
    out[targets != -100] = torch.cat(weights)
    return out


def text_tokenizer(root: Path, codebook_size: int, merges: int, init: str = "") -> TextTokenizer:
    """The run's BPE over the world's captions and instructions (trained once, kept in <out>/ar/tokenizer.json);
    a run started from a model (`init`) keeps that model's, which its embedding rows were trained with."""
    path = root / "ar" / "tokenizer.json"
    if path.is_file():
        return TextTokenizer.from_file(path)
    if init:
        tok = TextTokenizer.from_file(model_folder(init) / "tokenizer.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
        return tok
    scenes, edits = Dataset(root / "data" / "scenes"), Dataset(root / "data" / "edits")
    tok = train_bpe([c for cs in scenes["captions"] for c in cs] + list(edits["instructions"]), codebook_size,
                    merges)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def main(cfg: ARTrainConfig) -> Path:
    C.set_threads(cfg)
    d = C.distributed(cfg)
    out = stage_dir(cfg)
    C.write_config(out, cfg)
    mcfg = preset(cfg.preset)
    root = Path(cfg.out)
    scenes, edits = Dataset(root / "data" / "scenes"), Dataset(root / "data" / "edits")
    tokdir = root / "tokenizer"
    if cfg.edit_source not in ("read", "true"):
        raise ValueError(f"edit_source must be 'read' or 'true', got {cfg.edit_source!r}")
    if not (cfg.edit_weight >= 0 and math.isfinite(cfg.edit_weight)):
        raise ValueError(f"edit_weight must be a finite number >= 0, got {cfg.edit_weight}")
    if not 0 <= cfg.instruction_dropout <= 1:
        raise ValueError(f"instruction_dropout must be in [0, 1], got {cfg.instruction_dropout}")
    source = "ids_source_read.npy" if cfg.edit_source == "read" else "ids_source.npy"
    if not (tokdir / source).is_file() and cfg.edit_source == "read":
        raise ValueError(f"{tokdir / source} missing: train the tokenizer's ViT first (`glmimage train tokenizer`; "
                         "it writes what it reads from every edit source), or `--set edit_source=true`")
    C.require(*(tokdir / f for f in ("ids_scenes.npy", "ids_preview.npy", source, "ids_target.npy",
                                      "code_patches.npy")))
    ids_t, ids_p = np.load(tokdir / "ids_scenes.npy"), np.load(tokdir / "ids_preview.npy")
    ids_s, ids_e = np.load(tokdir / source), np.load(tokdir / "ids_target.npy")
    code_patches = np.load(tokdir / "code_patches.npy")
    size = scenes.recipe["size"]
    target, preview = mcfg.grids(size, size)
    if ids_t.shape[1] != target[0] * target[1] or ids_p.shape[1] != preview[0] * preview[1]:
        raise ValueError(f"tokenizer ids {ids_t.shape[1]}/{ids_p.shape[1]} do not match the grids {target}/{preview}")
    if d.main:
        text_tokenizer(root, mcfg.vq.codebook_size, cfg.bpe_merges, cfg.init)  # trained once, by one process
    parallel.barrier(d)
    tok = text_tokenizer(root, mcfg.vq.codebook_size, cfg.bpe_merges, cfg.init)
    if len(tok) > mcfg.ar.vocab_size:
        raise ValueError(f"text tokenizer has {len(tok)} ids, the AR embedding {mcfg.ar.vocab_size}")
    captions, instructions = scenes["captions"], edits["instructions"]

    torch.manual_seed(cfg.seed)
    model = ARModel(mcfg.ar)
    init_weights(model)
    if cfg.factor_init:
        for table in (model.embed_tokens.weight, model.lm_head.weight):
            factored_init_(table)
    C.init_from(cfg, out, {"ar": model})
    model.train()
    opt = C.make_optimizer(model.parameters(), cfg)
    state = C.load_checkpoint(out, {"ar": model}, opt)
    start = state["step"] if state else 0
    log = C.Log(out, start) if d.main else None
    ddp = parallel.wrap(model, "ddp", d, [])
    bar = tqdm(total=cfg.steps, initial=start, desc="ar", unit="step", disable=not d.main)
    pause = C.Pause(out, d)
    for step in range(start, cfg.steps):
        g = C.step_generator(cfg.seed, step)
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
        rows, weights = [], []
        for _ in range(cfg.batch_size):
            if rng.random() < cfg.edit_fraction:
                i = rng.randrange(len(edits))
                text = "" if cfg.instruction_dropout and rng.random() < cfg.instruction_dropout else instructions[i]
                p = argen.layout_prompt(tok, text, target=target, preview=None,
                                        cond=[(torch.from_numpy(ids_s[i].astype(np.int64)), *target)])
                grid = torch.from_numpy(ids_e[i].astype(np.int64))
                rows.append((p, grid))
                weights.append(edit_weights(torch.from_numpy(ids_s[i].astype(np.int64)), grid, cfg.edit_weight))
            else:
                i = rng.randrange(len(scenes))
                text = "" if rng.random() < cfg.caption_dropout else rng.choice(captions[i])
                p = argen.layout_prompt(tok, text, target=target, preview=preview)
                rows.append((p, torch.from_numpy(np.concatenate([ids_p[i], ids_t[i]]).astype(np.int64))))
                weights.append(torch.ones(rows[-1][1].numel()))
        # of the global batch (edit rows have no preview grid): the plain and the weighted count of targets
        n_targets, total = sum(g.numel() for _, g in rows), float(sum(w.sum() for w in weights))
        ids, pos, targets = make_batch(C.my_rows(rows, d), tok.pad_id)
        weight = target_weights(targets, C.my_rows(weights, d))
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, cfg)
        with C.forward(cfg.bf16):
            logits = ddp(ids, pos, None)
        # the global batch's (weighted) mean: this slice's sum over its targets (× processes, as DDP averages
        # gradients); with edit_weight 0 every weight is 1 and it is the plain mean cross entropy
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                              reduction="none").view_as(weight)
        loss = (nll * weight).sum() * d.world / total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            sel = targets != -100
            acc = parallel.mean(d, (logits.argmax(-1)[sel] == targets[sel]).float().mean()).item()
            loss_v = parallel.mean(d, loss).item()  # = the global batch's (weighted) mean cross entropy
            # with edit_weight the plain mean cross entropy too, comparable with a run without it
            ce = {"ce": parallel.mean(d, nll.detach().sum() * d.world / n_targets).item()} if cfg.edit_weight else {}
            bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc:.2f}")
            if d.main:
                log.scalars(step, loss=loss_v, token_acc=acc, grad_norm=gn.item(), lr=C.lr_at(step, cfg), **ce)
        done = step + 1
        if d.main and (done % cfg.sample_every == 0 or done == cfg.steps):
            _samples(model, tok, scenes, ids_t, code_patches, target, preview, cfg, out / "samples.png")
            log.plot(f"ar · step {done}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps or pause(done, cfg.steps):
            if d.main:
                C.save_checkpoint(out, {"ar": model}, opt, done)
            parallel.barrier(d)
        if pause.paused:
            break
    bar.close()
    if pause.paused:
        pause.finish(log)
        return out
    if d.main:
        log.plot(f"ar · step {cfg.steps}")
        log.close()
        model.eval()
        C.save_weights(model, out / "ar.safetensors")
    parallel.shutdown(d)
    return out


@torch.no_grad()
def _samples(model, tok, scenes, ids_t, code_patches, target, preview, cfg, path: Path) -> None:
    """Row 1: the real images; row 2: what their ids say; row 3: what the ids sampled from their caption say."""
    model.eval()
    n = min(cfg.n_samples, len(scenes))
    prompts = [argen.layout_prompt(tok, scenes["captions"][i][0], target=target, preview=preview) for i in range(n)]
    ids = argen.generate(model, prompts, codebook_size=code_patches.shape[0], pad_id=tok.pad_id, temperature=0.7,
                         top_p=None, generator=torch.Generator().manual_seed(0))
    model.clear_caches()
    model.train()
    th, tw = target
    real = np.asarray(scenes["images"][:n])
    scale = real.shape[1] // (th * code_patches.shape[1])
    up = lambda a: a.repeat(scale, 0).repeat(scale, 1)
    says = [up(ids_to_image(ids_t[i], code_patches, th, tw)) for i in range(n)]
    sampled = [up(ids_to_image(ids[i, -th * tw:].numpy(), code_patches, th, tw)) for i in range(n)]
    C.grid_image([list(real), says, sampled], scale=2).save(path)
