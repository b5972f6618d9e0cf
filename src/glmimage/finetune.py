"""`glmimage finetune`: LoRA or full fine-tuning of the AR model, the DiT, or both, on captioned images.

    glmimage finetune --model M --data DIR --target dit --method lora --rank 16 --out runs/ft
    torchrun --nproc_per_node 2 -m glmimage finetune ... --parallel fsdp

1. Pretokenize once (`pretokenize`): each image is resized and centre-cropped to its aspect-ratio bucket, then
   its VQ ids (target and preview grids), VAE latents and the glyph embeddings of its caption are written to
   <cache>/<hash>.safetensors. The hash covers the file (path, size, mtime), the caption, the bucket and the base
   model, so a later run (or another process) reuses what is there and only encodes what changed.
2. Train (`main`): the frozen model with LoRA adapters (peft) or with the target's weights trainable; the AR learns
   the preview then target grid from the caption (cross entropy on the grid ids), the DiT flow matching on the
   latents conditioned on the true ids and the glyph stream (the world's `dit` stage objective). Captions are
   dropped (classifier-free guidance) with probability `caption_dropout`. Edit pairs (a manifest with "source")
   train image-to-image: the AR writes the target grid after the source's ids and the instruction, the DiT reads
   the source's K/V, both exactly as inference lays them out.

Determinism: the global batch of step s is a pure function of (seed, s) and every random draw of a row of it comes
from a generator seeded with (seed, s, row), so the losses do not depend on how the rows are split across processes
or micro-batches, and a resumed run replays an uninterrupted one. Checkpoints hold full (unsharded) tensors of what
trains, the optimizer and the EMA, written atomically by rank 0, so a run resumes on any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from glmimage import lora, parallel
from glmimage.ar import generate as argen
from glmimage.checkpoint import atomic_folder, recover_folder
from glmimage.data.folder import Item, buckets, BucketBatches, load_items, nearest_bucket, open_image, resize_crop
from glmimage.pipeline import peak_memory, upsample_ids
from glmimage.train import common as C
from glmimage.train.ar import make_batch
from glmimage.tokenizer.vq import pixels_at
from glmimage.train.dit import sigma_of

TARGETS, METHODS = ("ar", "dit", "both"), ("lora", "full")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(C.StageConfig):
    model: str = "world"  # base model: folder (glmimage or official layout) or preset
    data: str = ""  # image folder with captions, .jsonl manifest, .tar shard(s) or a folder of them
    out: str = "runs/finetune"
    cache: str = ""  # pretokenized items; default <out>/cache
    target: str = "dit"  # ar | dit | both
    method: str = "lora"  # lora | full
    rank: int = 16
    alpha: float = 0.0  # LoRA alpha; 0 = rank (scale 1)
    resolution: int = 0  # bucket area = resolution² px; 0 = the model's default image size
    steps: int = 500
    batch_size: int = 8  # global batch (all processes, all micro-batches)
    lr: float = 1e-4
    warmup: int = 20
    grad_accum: int = 1
    grad_checkpointing: bool = False
    ema: float = 0.0  # EMA decay of the trained weights (0 = none); the EMA is what gets saved
    caption_dropout: float = 0.1
    parallel: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp
    device: str = "cpu"
    n_samples: int = 4
    sample_steps: int = 0  # DiT steps of the sample images; 0 = the model's default
    sample_every: int = 100
    ckpt_every: int = 50

    def check(self, world: int) -> None:
        if not self.data:
            raise ValueError("--data is required: an image folder with .txt captions, a .jsonl manifest or .tar shards")
        if self.target not in TARGETS:
            raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.steps < 1 or self.grad_accum < 1 or self.rank < 1 or not 0 <= self.ema < 1:
            raise ValueError("steps, grad_accum and rank must be >= 1 and ema in [0, 1)")
        if self.resolution < 0 or not 0 <= self.caption_dropout <= 1 or self.lr <= 0:
            raise ValueError("resolution must be >= 0 (0: the model's size), caption_dropout in [0, 1], lr > 0")
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"batch size {self.batch_size} must be a multiple of processes × grad_accum "
                             f"({world} × {self.grad_accum})")


# ---------------------------------------------------------------------------------------------------------------
# 1. Pretokenization
# ---------------------------------------------------------------------------------------------------------------
def model_fingerprint(model: str) -> str:
    """What identifies the base model's encoders: a preset's name, or a folder's config and weight file stats."""
    from glmimage.checkpoint import model_folder

    p = model_folder(model)
    if not p.is_dir():
        return model
    h = hashlib.sha1()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def item_key(item: Item, area: int, fingerprint: str) -> str:
    def stat(path: Path) -> list:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    what = [stat(Path(item.image)), item.member or "", stat(item.source) if item.source else None, item.caption,
            area, fingerprint]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:24]


def _vq_pixels(image: Image.Image, grid: tuple[int, int], vq_cfg) -> torch.Tensor:
    """The image at the visual tokenizer's input size for a token grid (h, w), normalised like `preprocess`."""
    return pixels_at(image, grid[0] * vq_cfg.patch_size, grid[1] * vq_cfg.patch_size, vq_cfg)


@torch.no_grad()
def encode_item(pipe, item: Item, options: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One image + caption -> the tensors training reads (ids, preview ids, latents, glyph embeddings)."""
    image = open_image(item)
    w, h = nearest_bucket(image.size, options)
    pixels = torch.from_numpy(np.array(resize_crop(image, (w, h))))  # (h, w, 3) uint8
    im = Image.fromarray(pixels.numpy())
    target, preview = pipe.cfg.grids(h, w)
    out = {"ids": pipe.vq.encode(_vq_pixels(im, target, pipe.cfg.vq))[0].flatten().int(),
           "preview": pipe.vq.encode(_vq_pixels(im, preview, pipe.cfg.vq))[0].flatten().int(),
           "latents": pipe.vae.encode(_to_unit(pixels))[0].float(),
           "glyph": pipe.glyph.encode_one(item.caption).float(), "size": torch.tensor([h, w]), "pixels": pixels}
    if item.source is not None:  # image-to-image: the condition image as inference sees it (same bucket)
        src = Image.fromarray(resize_crop(open_image(item.source), (w, h)))
        src, src_ids = pipe.condition_tokens(src)
        src_pixels = torch.from_numpy(np.array(src))
        out.update(src_ids=src_ids.flatten().int(), src_grid=torch.tensor(src_ids.shape), src_pixels=src_pixels,
                   src_latents=pipe.vae.encode(_to_unit(src_pixels))[0].float(),
                   src_size=torch.tensor([src.height, src.width]))
    return out


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return pixels.permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def pretokenize(pipe, items: list[Item], cache: Path, area: int, fingerprint: str, d: parallel.Dist) -> list[Path]:
    """Encode every item not in the cache (processes split the work), -> the cache file of every item."""
    options = buckets(pipe.cfg.stride, area)
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"{item_key(it, area, fingerprint)}.safetensors" for it in items]
    todo = [i for i in range(d.rank, len(items), d.world) if not paths[i].is_file()]
    for i in tqdm(todo, desc="pretokenize", unit="img", disable=not d.main or not todo):
        tensors = encode_item(pipe, items[i], options)
        tmp = paths[i].with_name(f".{paths[i].name}.{d.rank}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"caption": items[i].caption})
        tmp.replace(paths[i])
    parallel.barrier(d)
    return paths


class Cached:
    """The pretokenized items, read lazily (one small file per image)."""

    def __init__(self, paths: list[Path], captions: list[str]) -> None:
        self.paths, self.captions = paths, captions
        self.sizes = []
        for p in paths:
            with safe_open(str(p), "pt") as f:
                h, w = f.get_slice("size")[:].tolist()
            self.sizes.append((w, h))

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.paths[i]))


def step_batches(sizes: list[tuple[int, int]], batch_size: int, seed: int):
    """step -> the global batch (item indices, one bucket): full batches of a bucket only, epochs reshuffled."""
    bb = BucketBatches(sizes, sorted(set(sizes)), batch_size, seed)
    per_epoch = sum(len(b) == batch_size for b in bb.epoch(0))
    if per_epoch == 0:
        largest = max(map(sizes.count, set(sizes)))
        raise ValueError(f"batch size {batch_size} is larger than every aspect-ratio bucket (the largest holds "
                         f"{largest} images): lower --batch-size or add images")

    def at(step: int) -> list[int]:
        full = [b for b in bb.epoch(step // per_epoch) if len(b) == batch_size]
        return sorted(full[step % per_epoch])
    return at, per_epoch


def row_generator(seed: int, step: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 10_007 + row) % (2**63))


# ---------------------------------------------------------------------------------------------------------------
# 2. The losses
# ---------------------------------------------------------------------------------------------------------------
class Trainee(nn.Module):
    """What trains: the AR model and/or the DiT; forward(batch) -> (loss, {part: loss}). DDP / FSDP wrap this."""

    def __init__(self, pipe, target: str) -> None:
        super().__init__()
        self.mcfg, self.tok = pipe.cfg, pipe.tokenizer
        if target in ("ar", "both"):
            self.ar = pipe.ar
        if target in ("dit", "both"):
            self.dit = pipe.dit

    def models(self) -> list[nn.Module]:
        return [getattr(self, c) for c in ("ar", "dit") if hasattr(self, c)]

    def blocks(self) -> list[nn.ModuleList]:
        return [m.layers if m is getattr(self, "ar", None) else m.blocks for m in self.models()]

    def shard_units(self) -> list[nn.Module]:
        """FSDP units, innermost first: every block, then each model (its embeddings, norms, heads)."""
        return [b for blocks in self.blocks() for b in blocks] + self.models()

    def forward(self, rows: list[dict], empty_glyph: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        if hasattr(self, "ar"):
            parts["ar"] = self.ar_loss(rows)
        if hasattr(self, "dit"):
            parts["dit"] = self.dit_loss(rows, empty_glyph)
        return sum(parts.values()), parts

    def ar_loss(self, rows: list[dict]) -> torch.Tensor:
        """Text-to-image: caption -> preview grid, target grid. Image-to-image: condition ids + instruction -> the
        target grid (no preview), as `ar.generate.layout_prompt` lays them out at inference."""
        h, w = rows[0]["size"].tolist()
        target, preview = self.mcfg.grids(h, w)
        seqs = []
        for r in rows:
            text = "" if r["drop"] else r["caption"]
            if "src_ids" in r:
                cond = [(r["src_ids"].long(), *r["src_grid"].tolist())]
                seqs.append((argen.layout_prompt(self.tok, text, target=target, preview=None, cond=cond),
                             r["ids"].long()))
            else:
                seqs.append((argen.layout_prompt(self.tok, text, target=target, preview=preview),
                             torch.cat([r["preview"], r["ids"]]).long()))
        ids, pos, targets = make_batch(seqs, self.tok.pad_id)
        dev = self.ar.embed_tokens.weight.device
        logits = self.ar(ids.to(dev), pos.to(dev), None)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.to(dev).flatten(), ignore_index=-100)

    def dit_loss(self, rows: list[dict], empty_glyph: torch.Tensor) -> torch.Tensor:
        b = len(rows)
        h, w = rows[0]["size"].tolist()
        th, tw = self.mcfg.grids(h, w)[0]
        dev = self.dit.prior_embedding.weight.device
        x0 = torch.stack([r["latents"] for r in rows]).to(dev)
        prior = upsample_ids(torch.stack([r["ids"] for r in rows]).long().view(b, th, tw)).to(dev)
        drop = torch.tensor([r["drop"] for r in rows], device=dev)
        glyphs = [empty_glyph if r["drop"] else r["glyph"] for r in rows]
        n = max(g.shape[0] for g in glyphs)
        gl = torch.zeros(b, n, glyphs[0].shape[1], device=dev)
        gm = torch.zeros(b, n, dtype=torch.bool, device=dev)
        for i, g in enumerate(glyphs):
            gl[i, :g.shape[0]], gm[i, :g.shape[0]] = g, True
        u = torch.stack([r["u"] for r in rows]).to(dev)
        noise = torch.stack([r["noise"] for r in rows]).to(dev)
        seq_len = x0.shape[2] * x0.shape[3] // self.mcfg.dit.patch_size ** 2
        sigma = sigma_of(u, self.mcfg, seq_len)[:, None, None, None]
        xt = (1 - sigma) * x0 + sigma * noise
        size = torch.tensor([[h, w]] * b, dtype=torch.float32, device=dev)
        cond_kv = use_cond = None
        if "src_latents" in rows[0]:  # the condition image's K/V (dropped with the caption, as for guidance)
            src = torch.stack([r["src_latents"] for r in rows]).to(dev)
            sh, sw = rows[0]["src_grid"].tolist()
            src_prior = upsample_ids(torch.stack([r["src_ids"] for r in rows]).long().view(b, sh, sw)).to(dev)
            src_size = torch.stack([r["src_size"] for r in rows]).float().to(dev)
            cond_kv, use_cond = self.dit.condition_kv_batched(src, src_prior, src_size), ~drop
        canvas = None
        if self.dit.cfg.canvas_patch:  # the world model's canvas, laid out from the ids as inference does
            from glmimage.world.canvas import plan_canvases

            canvas = plan_canvases([r["caption"] for r in rows], [r["ids"].numpy() for r in rows], h, w,
                                   self.dit.cfg.canvas_channels).to(dev)
        v = self.dit(xt, u * self.mcfg.schedule.num_train_timesteps - 1, prior_ids=prior, prior_drop=drop, glyph=gl,
                     target_size=size, glyph_mask=gm, cond_kv=cond_kv, use_cond=use_cond, canvas=canvas)
        return (v.float() - (noise - x0)).pow(2).mean()


def make_rows(data: Cached, idx: list[int], first_row: int, step: int, cfg: FinetuneConfig) -> list[dict]:
    """The rows of a (micro-)batch with their random draws, each from its own (seed, step, row) generator."""
    rows = []
    for j, i in enumerate(idx):
        r = data.load(i)
        g = row_generator(cfg.seed, step, first_row + j)
        r["caption"] = data.captions[i]
        r["drop"] = bool(torch.rand(1, generator=g).item() < cfg.caption_dropout)
        r["u"] = torch.rand((), generator=g).clamp(1e-3, 1.0)
        r["noise"] = torch.randn(r["latents"].shape, generator=g)
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 3. Checkpoints: full tensors of what trains, the optimizer and the EMA; rank 0 writes, every rank reads
# ---------------------------------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `param` (sharded the same way under FSDP)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype)


def save_ckpt(out: Path, model: nn.Module, named: dict[str, nn.Parameter], opt, ema: dict | None, step: int,
              d: parallel.Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = {k: _full(p) for k, p in named.items()}
    ema_t = {k: _full(v) for k, v in ema.items()} if ema is not None else {}
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        with atomic_folder(out / "ckpt") as tmp:
            save_file(weights, str(tmp / "model.safetensors"))
            if ema_t:
                save_file(ema_t, str(tmp / "ema.safetensors"))
            flat = {f"{k}|{s}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
                    for k, st in osd["state"].items() for s, v in st.items()}
            save_file(flat or {"_": torch.zeros(1)}, str(tmp / "optim.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": osd["param_groups"]}))
    parallel.barrier(d)


def load_ckpt(out: Path, model: nn.Module, named: dict[str, nn.Parameter], opt, ema: dict | None) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    ck = out / "ckpt"
    recover_folder(ck)
    if not (ck / "state.json").is_file():
        return 0
    state = json.loads((ck / "state.json").read_text())
    weights = load_file(str(ck / "model.safetensors"))
    if set(weights) != set(named):
        raise ValueError(f"{ck} was written by a different fine-tune (other target, method or rank); remove it to "
                         f"start over, or use another --out")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(_like(weights[k], p))
        if ema is not None:
            ema_w = load_file(str(ck / "ema.safetensors")) if (ck / "ema.safetensors").is_file() else weights
            for k, p in named.items():
                ema[k].copy_(_like(ema_w[k], p))
    flat = load_file(str(ck / "optim.safetensors"))
    osd_state: dict[str, dict] = {}
    for key, v in flat.items():
        if "|" in key:
            name, s = key.split("|")
            osd_state.setdefault(name, {})[s] = v
    set_optimizer_state_dict(model, opt, {"state": osd_state, "param_groups": state["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    return int(state["step"])


# ---------------------------------------------------------------------------------------------------------------
# 4. The loop
# ---------------------------------------------------------------------------------------------------------------
def main(cfg: FinetuneConfig) -> Path:
    import glmimage

    C.set_threads(cfg)
    d = parallel.init(cfg.device)
    cfg.check(d.world)
    out = Path(cfg.out)
    if d.main:
        C.write_config(out, cfg)
    mode = parallel.resolve_mode(cfg.parallel, d)

    pipe = glmimage.load(cfg.model, device=str(d.device))
    items = load_items(cfg.data)
    area = (cfg.resolution or pipe.cfg.sampling.height) ** 2
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    data = Cached(pretokenize(pipe, items, cache, area, model_fingerprint(cfg.model), d), [it.caption for it in items])
    batch_at, per_epoch = step_batches(data.sizes, cfg.batch_size, cfg.seed)
    empty_glyph = pipe.glyph.encode_one("").float()

    torch.manual_seed(cfg.seed)  # LoRA's A matrices: the same init on every process
    for m in pipe.modules().values():
        m.requires_grad_(False)
    trainee = Trainee(pipe, cfg.target)
    parts = [c for c in ("ar", "dit") if hasattr(trainee, c)]
    alpha = cfg.alpha or float(cfg.rank)
    if cfg.method == "lora":
        for c in parts:
            lora.add(getattr(trainee, c), c, cfg.rank, alpha)
    else:
        for c in parts:
            getattr(trainee, c).requires_grad_(True)
    trainee.train()
    if cfg.grad_checkpointing:
        for blocks in trainee.blocks():
            parallel.checkpoint_blocks(blocks)
    model = parallel.wrap(trainee, mode, d, trainee.shard_units())
    named = {k: p for k, p in trainee.named_parameters() if p.requires_grad}
    opt = C.make_optimizer(list(named.values()), cfg)
    ema = {k: p.detach().clone() for k, p in named.items()} if cfg.ema else None
    start = load_ckpt(out, model, named, opt, ema)
    log = C.Log(out, start) if d.main else None
    if d.main:
        n_train = sum(p.numel() for p in named.values())
        print(f"finetune {cfg.method} on {'+'.join(parts)}: {n_train / 1e6:.2f} M trained parameters, {len(data)} "
              f"images, {per_epoch} batches of {cfg.batch_size} per epoch, {d.world} process(es) ({mode})", flush=True)
    sampler = Samples(pipe, data, cfg, out, d, mode)
    if start == 0:
        sampler.before()

    per_rank = cfg.batch_size // d.world
    micro = per_rank // cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not d.main)
    train_time = 0.0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        batch = batch_at(step)
        mine = batch[d.rank * per_rank:(d.rank + 1) * per_rank]
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, cfg)
        totals: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            first = d.rank * per_rank + k * micro
            rows = make_rows(data, mine[k * micro:(k + 1) * micro], first, step, cfg)
            with parallel.no_sync(model, mode, sync=k == cfg.grad_accum - 1), C.forward(cfg.bf16, d.device.type):
                loss, part_losses = model(rows, empty_glyph.to(d.device))
                (loss / cfg.grad_accum).backward()
            for name, v in part_losses.items():
                totals[name] = totals.get(name, 0.0) + v.item() / cfg.grad_accum
        gn = torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                decay = cfg.ema if step >= cfg.warmup else 0.0
                for k2, p in named.items():
                    ema[k2].lerp_(p.detach(), 1 - decay)
        train_time += time.perf_counter() - t0
        bar.update(1)
        losses = {f"loss_{n}": parallel.mean(d, torch.tensor(v)).item() for n, v in totals.items()}
        if d.main and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
            log.scalars(step, **losses, grad_norm=float(_full(gn)), lr=C.lr_at(step, cfg))
        done = step + 1
        if done % cfg.sample_every == 0 or done == cfg.steps:
            with _swapped(named, ema):
                sampler.draw(done)
            if d.main:
                log.plot(f"finetune · step {done}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_ckpt(out, model, named, opt, ema, done, d)
    bar.close()
    result = _export(cfg, trainee, named, ema, parts, alpha, out, d)
    if d.main:
        log.close()
        summary = {"trained_parameters": sum(p.numel() for p in named.values()), "processes": d.world,
                   "steps_run": cfg.steps - start, "seconds_per_step": train_time / max(1, cfg.steps - start),
                   "peak_memory_mib": peak_memory([d.device])}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {result}  ({summary['seconds_per_step']:.2f} s/step, peak memory "
              f"{', '.join(f'{k} {v:.0f} MiB' for k, v in summary['peak_memory_mib'].items())})", flush=True)
    parallel.shutdown(d)
    return result


class _swapped:
    """Use the EMA weights inside the block (samples are drawn from what gets saved)."""

    def __init__(self, named, ema) -> None:
        self.named, self.ema, self.saved = named, ema, None

    def __enter__(self):
        if self.ema is not None:
            with torch.no_grad():
                self.saved = {k: p.detach().clone() for k, p in self.named.items()}
                for k, p in self.named.items():
                    p.copy_(self.ema[k])

    def __exit__(self, *exc):
        if self.saved is not None:
            with torch.no_grad():
                for k, p in self.named.items():
                    p.copy_(self.saved[k])


def _export(cfg, trainee, named, ema, parts, alpha, out: Path, d: parallel.Dist) -> Path:
    """The result: an adapter file (LoRA) or a model folder (full), from the EMA weights when there is one."""
    src = ema if ema is not None else named
    weights = {k: _full(v) for k, v in src.items()}  # collective under FSDP: every process takes part
    if cfg.method == "lora":
        path = out / "adapter.safetensors"
        if d.main:
            per = {c: lora.adapter_state(getattr(trainee, c), {k[len(c) + 1:]: v for k, v in weights.items()
                                                               if k.startswith(c + ".")}) for c in parts}
            lora.save(path, per, rank=cfg.rank, alpha=alpha, base_model=cfg.model)
    else:
        import glmimage

        path = out / "model"
        if d.main:
            fresh = glmimage.load(cfg.model, device="cpu")
            for c in parts:
                sd = {k[len(c) + 1:]: v for k, v in weights.items() if k.startswith(c + ".")}
                getattr(fresh, c).load_state_dict(sd, strict=True)
            glmimage.save(fresh, path)
    parallel.barrier(d)
    return path


class Samples:
    """A grid written next to the run: (edit pairs: the sources |) the data's images | the base model | the
    fine-tuned model, same prompts and seeds. The base row is drawn once (before the first step) and kept in
    <out>/samples/."""

    def __init__(self, pipe, data: Cached, cfg: FinetuneConfig, out: Path, d: parallel.Dist, mode: str) -> None:
        self.pipe, self.cfg, self.dir, self.d = pipe, cfg, out / "samples", d
        # under FSDP every process must run the forward passes (the weights are sharded); otherwise rank 0 alone
        self.active = mode == "fsdp" or d.main
        seen, self.picks = set(), []
        for i, c in enumerate(data.captions):
            if c not in seen and len(self.picks) < cfg.n_samples:
                seen.add(c)
                self.picks.append(i)
        self.data = data

    def _source(self, i: int) -> Image.Image | None:
        row = self.data.load(i)
        return Image.fromarray(row["src_pixels"].numpy()) if "src_pixels" in row else None

    def _draw(self) -> list[Image.Image]:
        ims = []
        for j, i in enumerate(self.picks):
            w, h = self.data.sizes[i]
            src = self._source(i)
            r = self.pipe(self.data.captions[i], images=[src] if src is not None else None, height=h, width=w,
                          seed=j, progress=False, num_inference_steps=self.cfg.sample_steps or None)
            ims.append(r.images[0])
        self.pipe.ar.clear_caches()  # training runs the AR without its KV cache
        return ims

    def before(self) -> None:
        if self.active and self.picks:
            ims = self._draw()
            if self.d.main:
                self.dir.mkdir(parents=True, exist_ok=True)
                for j, im in enumerate(ims):
                    im.save(self.dir / f"base_{j}.png")
        parallel.barrier(self.d)

    def draw(self, step: int) -> None:
        if self.active and self.picks:
            ims = self._draw()
            if self.d.main:
                self.dir.mkdir(parents=True, exist_ok=True)
                real = [Image.fromarray(self.data.load(i)["pixels"].numpy()) for i in self.picks]
                base = [Image.open(self.dir / f"base_{j}.png") if (self.dir / f"base_{j}.png").is_file() else
                        Image.new("RGB", im.size, "white") for j, im in enumerate(ims)]
                sources = [self._source(i) for i in self.picks]
                sheet = grid(([sources] if sources[0] is not None else []) + [real, base, ims])
                sheet.save(self.dir / f"step_{step:06d}.png")
                sheet.save(self.dir.parent / "samples.png")
        parallel.barrier(self.d)


def grid(rows: list[list[Image.Image]], cell: int = 128, pad: int = 4) -> Image.Image:
    """Rows of images of any size, each fitted into a cell×cell square and outlined, on white."""
    from PIL import ImageDraw

    ncol = max(len(r) for r in rows)
    sheet = Image.new("RGB", (pad + ncol * (cell + pad), pad + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            s = cell / max(im.size)
            im = im.convert("RGB").resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.NEAREST)
            x, y = pad + j * (cell + pad) + (cell - im.width) // 2, pad + i * (cell + pad) + (cell - im.height) // 2
            sheet.paste(im, (x, y))
            draw.rectangle((x - 1, y - 1, x + im.width, y + im.height), outline=(160, 160, 160))
    return sheet
