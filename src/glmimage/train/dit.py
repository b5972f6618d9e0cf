"""Stage `dit`: flow matching on VAE latents, conditioned on the tokenizer ids (upsampled ×2) and the glyph
embeddings of the quoted text; the glyph encoder trains with it. Image-to-image steps add the source image's
K/V (the DiT run at t=0 on the source latents and ids), as inference does; the source's ids are its scene graph's,
or (edit_source=read) what the trained ViT reads from the source image, as the pipeline gives them.

Noise: x_σ = (1 − σ)·x0 + σ·ε, target velocity ε − x0, σ = the schedule's shift of u ~ U(0, 1), and the DiT sees
the raw timestep 1000·u − 1 (the GLM-Image convention the sampler follows). Condition dropout (prior ids, glyph and
condition image together, as the sampler's unconditional branch drops them) trains classifier-free guidance.
Outputs in <out>/dit/: dit.safetensors + glyph.safetensors (EMA weights), samples.png (real | sampled from the real
ids and the caption), loss.png, tb/, ckpt/.
Under torchrun the step runs in DDP, each process on its slice of the global batch (N processes = one).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from glmimage import parallel
from glmimage.checkpoint import TIED_T5
from glmimage.config import preset
from glmimage.dit import sample as dsample
from glmimage.dit.model import DiT
from glmimage.glyph import GlyphEncoder
from glmimage.pipeline import to_pil, upsample_ids
from glmimage.train import common as C
from glmimage.train.data import N_BG, Dataset, factored_init_, scene_graphs
from glmimage.world.canvas import plan_canvases, scene_canvas

MAX_GLYPH_POS = 64  # the glyph_aux head's classes: index 0 … 63 from either end (later positions share the last)


@dataclass(frozen=True, kw_only=True)
class DiTTrainConfig(C.StageConfig):
    preset: str = "world"
    edit_fraction: float = 0.25  # share of steps that train image-to-image
    cond_dropout: float = 0.1
    ema: float = 0.999
    n_samples: int = 8
    sample_steps: int = 20
    sample_guidance: float = 1.5
    fg_weight: float = 0.0  # extra loss weight on latents under shape / text ids (objects are a small share of pixels)
    fg_from_step: int = 0  # ... from this step on
    # extra loss weight, on image-to-image rows, on the latents whose token the edit changes (the target's id differs
    # from the source's, both from the scene graphs): a moved or added shape is a few tokens of a mostly copied image
    edit_weight: float = 0.0
    text_fraction: float = 0.0  # > 0: this share of the text-to-image rows is drawn from scenes with quoted text
    # > 1: draw training times u toward the noisy end, u = s·r / (1 + (s − 1)·r) with r ~ U(0, 1) (where sampling
    # lays out shapes and letters); the (timestep, σ) pairing the sampler uses is unchanged
    noise_shift: float = 1.0
    # weight of an auxiliary loss on the glyph encoder: a linear head reads, from each glyph embedding, its index
    # from the start and from the end of its string. A small ByT5 trained from nothing by the DiT's loss alone does
    # not learn absolute positions (a linear probe read the index for 21 % of letters), so the DiT cannot tell which
    # letter is which and paints their average; the pretrained ByT5 of the official model knows them. Training only.
    glyph_aux: float = 0.1
    factor_init: bool = False  # the prior embedding's rows start as sums of their ids' factors (data.factored_init_)
    # > 0: a warm restart at this step. The DiT and the glyph encoder go on from their EMA weights with a fresh
    # optimizer, a fresh warmup and cosine over the steps left, and the batches and noise of seed + 1 counted from
    # the restart: the second leg is the run `--set init=MODEL --set seed=1 --set steps=<steps left>` from the first
    # leg's model (fg_from_step counts from the run's start)
    restart_at: int = 0
    # the source grid of the image-to-image rows: "true" = the source scene graph's ids; "read" = the ids the trained
    # ViT reads from the source image (tokenizer stage, ids_source_read.npy), which is what the pipeline gives the
    # condition image at inference, misreadings included
    edit_source: str = "true"


def stage_dir(cfg) -> Path:
    return Path(cfg.out) / "dit"


def leg(step: int, cfg: DiTTrainConfig) -> tuple[int, int, int]:
    """(leg, step within it, steps in it): `restart_at` splits a run into two legs."""
    r = cfg.restart_at
    if 0 < r <= step:
        return 1, step - r, cfg.steps - r
    return 0, step, r if 0 < r < cfg.steps else cfg.steps


def sigma_of(u: torch.Tensor, mcfg, seq_len: int) -> torch.Tensor:
    """Noise level the sampler uses at raw time u = t / T: the schedule's linear time shift."""
    sch = mcfg.schedule
    mu = dsample.shift_mu(seq_len, base_seq_len=sch.base_image_seq_len, base_shift=sch.base_shift,
                          max_shift=sch.max_shift)
    return mu / (mu + (1.0 / u - 1.0))


def main(cfg: DiTTrainConfig) -> Path:
    C.set_threads(cfg)
    d = C.distributed(cfg)
    out = stage_dir(cfg)
    C.write_config(out, cfg)
    mcfg = preset(cfg.preset)
    root = Path(cfg.out)
    scenes, edits = Dataset(root / "data" / "scenes"), Dataset(root / "data" / "edits")
    if cfg.edit_source not in ("read", "true"):
        raise ValueError(f"edit_source must be 'read' or 'true', got {cfg.edit_source!r}")
    if cfg.fg_weight < 0 or cfg.edit_weight < 0:
        raise ValueError(f"fg_weight and edit_weight must be >= 0, got {cfg.fg_weight} and {cfg.edit_weight}")
    source = "ids_source_read.npy" if cfg.edit_source == "read" else "ids_source.npy"
    C.require(*(root / "vae" / f"latents_{k}.npy" for k in ("scenes", "source", "target")),
              *(root / "tokenizer" / f for f in ("ids_scenes.npy", source, "ids_source.npy", "ids_target.npy")))
    lat = np.load(root / "vae" / "latents_scenes.npy", mmap_mode="r")
    lat_s, lat_e = (np.load(root / "vae" / f"latents_{k}.npy", mmap_mode="r") for k in ("source", "target"))
    ids = np.load(root / "tokenizer" / "ids_scenes.npy")
    ids_s, ids_e = np.load(root / "tokenizer" / source), np.load(root / "tokenizer" / "ids_target.npy")
    ids_s_true = np.load(root / "tokenizer" / "ids_source.npy", mmap_mode="r")  # what the edit changes
    n_edits = len(lat_s)  # the pairs with latents (the vae's edit_latents): the AR and the ViT may read more
    if n_edits > len(edits) or len(lat_e) != n_edits:
        raise ValueError(f"{root / 'vae'} has latents of {n_edits} edit sources and {len(lat_e)} targets for "
                         f"{len(edits)} edit pairs in {root / 'data' / 'edits'}: run `glmimage train vae` again")
    size = scenes.recipe["size"]
    (th, tw), _ = mcfg.grids(size, size)
    seq_len = lat.shape[2] * lat.shape[3] // mcfg.dit.patch_size ** 2
    T = mcfg.schedule.num_train_timesteps
    with_text = [i for i, cs in enumerate(scenes["captions"]) if any('"' in c for c in cs)]
    canvas_on, channels = bool(mcfg.dit.canvas_patch), mcfg.dit.canvas_channels
    if canvas_on:  # the canvas is drawn from each row's scene graph (the target scene of an edit)
        graphs = scene_graphs(scenes)
        pairs = scene_graphs(edits, n_edits)  # only the pairs with latents: 24,000 of 240,000 take 15 s, not 150
        targets, sources = [e.target for e in pairs], [e.source for e in pairs]

    torch.manual_seed(cfg.seed)
    dit = DiT(mcfg.dit)
    dit.initialize_weights()
    if cfg.factor_init:
        factored_init_(dit.prior_embedding.weight)
    glyph = GlyphEncoder(mcfg.glyph)
    # a model from before the canvas (or its shape channel) starts without it: those embedder columns stay at zero
    C.init_from(cfg, out, {"dit": dit, "glyph": glyph.encoder}, missing_ok=("canvas_embedder.weight",))
    dit.train(), glyph.train()
    ema_dit, ema_glyph = copy.deepcopy(dit).eval(), copy.deepcopy(glyph).eval()
    for p in list(ema_dit.parameters()) + list(ema_glyph.parameters()):
        p.requires_grad_(False)
    aux = nn.Linear(glyph.dim, 2 * MAX_GLYPH_POS)  # training-only head of the glyph_aux loss
    models = {"dit": dit, "glyph": glyph.encoder, "ema_dit": ema_dit, "ema_glyph": ema_glyph.encoder, "aux": aux}
    params = list(dit.parameters()) + list(glyph.parameters())
    opt = C.make_optimizer(params, cfg)
    opt.add_param_group({"params": list(aux.parameters()), "weight_decay": 0.0})
    params += list(aux.parameters())
    state = C.load_checkpoint(out, models, opt)
    start = state["step"] if state else 0
    log = C.Log(out, start) if d.main else None
    step_fn = parallel.wrap(Step(dit, glyph, aux), "ddp", d, [])
    vae = None
    bar = tqdm(total=cfg.steps, initial=start, desc="dit", unit="step", disable=not d.main)
    pause = C.Pause(out, d)
    for step in range(start, cfg.steps):
        n_leg, k, leg_steps = leg(step, cfg)
        if n_leg and k == 0:  # warm restart: from the EMA weights, with a fresh optimizer
            dit.load_state_dict(ema_dit.state_dict())
            glyph.load_state_dict(ema_glyph.state_dict())
            opt.state.clear()
        lr = C.lr_at(k, cfg, leg_steps)
        # the global batch and its random draws, on every process; each process then takes its slice of the rows
        g = C.step_generator(cfg.seed + n_leg, k)
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))
        b = cfg.batch_size
        is_edit = rng.random() < cfg.edit_fraction
        if is_edit:
            idx = np.sort(np.array([rng.randrange(n_edits) for _ in range(b)]))
            texts = [edits["instructions"][i] for i in idx]
        else:
            idx = np.sort(np.array([rng.choice(with_text) if cfg.text_fraction and rng.random() < cfg.text_fraction
                                    else rng.randrange(len(scenes)) for _ in range(b)]))
            texts = [rng.choice(scenes["captions"][i]) for i in idx]
        drop = torch.rand(b, generator=g) < cfg.cond_dropout
        texts = ["" if dropped else t for t, dropped in zip(texts, drop.tolist())]
        u = torch.rand(b, generator=g)
        if cfg.noise_shift != 1.0:
            u = cfg.noise_shift * u / (1 + (cfg.noise_shift - 1) * u)
        u = u.clamp(1e-3, 1.0)
        noise = torch.randn((b, *lat.shape[1:]), generator=g)
        n_glyph = int((glyph.positions(texts)[0] >= 0).sum())  # of the global batch, to normalise glyph_aux
        idx, texts, drop, u, noise = (C.my_rows(x, d) for x in (idx, texts, drop, u, noise))
        n = len(idx)
        x0 = torch.from_numpy(np.array((lat_e if is_edit else lat)[idx], dtype=np.float32))
        row_ids = (ids_e if is_edit else ids)[idx].astype(np.int64)
        prior = upsample_ids(torch.from_numpy(row_ids).view(n, th, tw))
        sigma = sigma_of(u, mcfg, seq_len)[:, None, None, None]
        xt = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        size_t = torch.tensor([[size, size]] * n, dtype=torch.float32)
        src = src_prior = None
        canvas = None
        if canvas_on:
            rows = [(targets if is_edit else graphs)[i] for i in idx]
            srcs = [sources[i] if is_edit else None for i in idx]
            canvas = torch.from_numpy(np.stack([scene_canvas(sc, text, size, channels, source)
                                                for sc, text, source in zip(rows, texts, srcs)]))
        if is_edit:
            src = torch.from_numpy(np.array(lat_s[idx], dtype=np.float32))
            src_prior = upsample_ids(torch.from_numpy(ids_s[idx].astype(np.int64)).view(n, th, tw))
        for group in opt.param_groups:
            group["lr"] = lr
        with C.forward(cfg.bf16):
            v, aux_sum = step_fn(xt, u * T - 1, prior, drop, texts, size_t, src, src_prior, canvas)
        aux_loss = aux_sum * d.world / n_glyph  # this slice's share of the global mean (DDP averages gradients)
        err = (v.float() - target).pow(2)
        fg_weight = cfg.fg_weight if step >= cfg.fg_from_step else 0.0
        if fg_weight or (is_edit and cfg.edit_weight):
            w = loss_weight(row_ids, ids_s_true[idx] if is_edit else None, (th, tw), x0.shape[-1] // tw, fg_weight,
                            cfg.edit_weight)
            err = err * w
        loss = err.mean()  # every process has as many elements: the mean of the means is the global mean
        opt.zero_grad(set_to_none=True)
        (loss + cfg.glyph_aux * aux_loss).backward()
        gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = cfg.ema if k >= cfg.warmup else 0.0
            for m, e in ((dit, ema_dit), (glyph, ema_glyph)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p.detach(), 1 - decay)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            loss_v = parallel.mean(d, loss).item()
            pos_v = parallel.mean(d, aux_loss.detach()).item()  # every process joins the all-reduce
            bar.set_postfix(loss=f"{loss_v:.4f}")
            if d.main:
                key = "loss_i2i" if is_edit else "loss_t2i"
                log.scalars(step, **{key: loss_v}, glyph_pos=pos_v, grad_norm=gn.item(), lr=lr)
        done = step + 1
        if d.main and (done % cfg.sample_every == 0 or done == cfg.steps):
            if vae is None:
                from glmimage.train.vae import load_trained

                vae = load_trained(cfg.out)
            _samples(ema_dit, ema_glyph, vae, scenes, lat, ids, mcfg, cfg, out / "samples.png")
            log.plot(f"dit · step {done}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps or pause(done, cfg.steps):
            if d.main:
                C.save_checkpoint(out, models, opt, done)
            parallel.barrier(d)
        if pause.paused:
            break
    bar.close()
    if pause.paused:
        pause.finish(log)
        return out
    if d.main:
        log.plot(f"dit · step {cfg.steps}")
        log.close()
        C.save_weights(ema_dit, out / "dit.safetensors")
        C.save_weights(ema_glyph.encoder, out / "glyph.safetensors", skip=(TIED_T5,))  # tied to shared.weight
    parallel.shutdown(d)
    return out


def loss_weight(ids: np.ndarray, source_ids: np.ndarray | None, grid: tuple[int, int], f: int, fg_weight: float,
                edit_weight: float) -> torch.Tensor:
    """Per-latent weight (B, 1, h·f, w·f) of the flow-matching loss of rows with target ids (B, h·w): 1, plus
    fg_weight under shape and text ids, plus edit_weight where the row edits source_ids (B, h·w) and changes the
    token's id. f: latent pixels per token along each axis."""
    w = 1 + fg_weight * torch.from_numpy(np.asarray(ids) >= N_BG).float()
    if source_ids is not None:
        w = w + edit_weight * torch.from_numpy(np.asarray(ids) != np.asarray(source_ids)).float()
    return w.view(len(w), 1, *grid).repeat_interleave(f, 2).repeat_interleave(f, 3)


class Step(nn.Module):
    """One training forward (glyph encoder, condition K/V, DiT) as a module, so that DDP can wrap it.
    Returns the velocity and the glyph_aux loss summed over this batch's glyph tokens (cross-entropy of each glyph
    embedding's index from the start and from the end of its string, averaged over the two)."""

    def __init__(self, dit: DiT, glyph: GlyphEncoder, aux: nn.Linear) -> None:
        super().__init__()
        self.dit, self.glyph, self.aux = dit, glyph, aux

    def forward(self, xt, t, prior, drop, texts, size_t, src=None, src_prior=None, canvas=None):
        gl, gmask = self.glyph(texts)
        aux = glyph_position_loss(self.glyph, self.aux, gl, texts)
        cond_kv = None if src is None else self.dit.condition_kv_batched(src, src_prior, size_t)
        v = self.dit(xt, t, prior_ids=prior, prior_drop=drop, glyph=gl, target_size=size_t, glyph_mask=gmask,
                     cond_kv=cond_kv, use_cond=~drop if src is not None else None, canvas=canvas)
        return v, aux


def glyph_position_loss(glyph: GlyphEncoder, head: nn.Linear, gl: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """glyph_aux: cross-entropy of the head's reading of each glyph embedding gl (B, L, dim) = glyph(texts) as its
    index from the start and from the end of its string, averaged over the two, summed over the tokens."""
    start, end = (p.clamp(max=MAX_GLYPH_POS - 1).to(gl.device) for p in glyph.positions(texts))
    logits = head(gl.float()).view(*gl.shape[:2], 2, MAX_GLYPH_POS)
    return sum(F.cross_entropy(logits[:, :, k].flatten(0, 1), p.flatten(), ignore_index=-1, reduction="sum")
               for k, p in ((0, start), (1, end))) / 2


@torch.no_grad()
def sample_latents(dit: DiT, glyph: GlyphEncoder, prior: torch.Tensor, prompts: list[str], mcfg, size: int,
                   steps: int, guidance: float, seed: int = 0, ids: np.ndarray | None = None) -> torch.Tensor:
    """The pipeline's sampler from given prior ids (B, N) and prompts -> latents (B, C, h, w). ids: the target grids
    (B, grid²) the canvas is laid out from, as the pipeline does, when the DiT reads one."""
    b, f = prior.shape[0], mcfg.vae_factor
    noise = torch.randn(b, mcfg.dit.in_channels, size // f, size // f, generator=torch.Generator().manual_seed(seed))
    gl, gm = glyph.encode(list(prompts))
    neg, nm = glyph.encode([""] * b)
    canvas = None
    if dit.cfg.canvas_patch and ids is not None:
        canvas = plan_canvases(prompts, ids, size, size, dit.cfg.canvas_channels)
    return dsample.generate_latents(dit, noise, prior=prior, glyph=gl, glyph_mask=gm, size=(size, size), steps=steps,
                                    guidance=guidance, schedule=mcfg.schedule, neg_glyph=neg, neg_mask=nm,
                                    canvas=canvas)


@torch.no_grad()
def _samples(dit, glyph, vae, scenes, lat, ids, mcfg, cfg, path: Path) -> None:
    """Row 1: real images; row 2: their latents decoded (the VAE's ceiling); row 3: sampled from their ids + caption."""
    n = min(cfg.n_samples, len(scenes))
    size = scenes.recipe["size"]
    (th, tw), _ = mcfg.grids(size, size)
    prior = upsample_ids(torch.from_numpy(ids[:n].astype(np.int64)).view(n, th, tw))
    prompts = [scenes["captions"][i][0] for i in range(n)]
    z = sample_latents(dit, glyph, prior, prompts, mcfg, size, cfg.sample_steps, cfg.sample_guidance,
                       ids=ids[:n].astype(np.int64))
    real = [np.asarray(im) for im in scenes["images"][:n]]
    ceiling = [np.asarray(im) for im in to_pil(vae.decode(torch.from_numpy(np.array(lat[:n], dtype=np.float32))))]
    sampled = [np.asarray(im) for im in to_pil(vae.decode(z))]
    C.grid_image([real, ceiling, sampled], scale=2).save(path)
