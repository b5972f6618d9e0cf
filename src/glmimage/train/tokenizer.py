"""Stage `tokenizer`: the semantic visual tokenizer of the world model.

What an id means is fixed by the world, not discovered: each token of the 4×4 grid gets the id of what covers it
in the scene graph (`data.token_codes`: background colour + gradient; or shape, colour and which part of the shape
the token shows; or text colour, font and which part of the line). So the ids carry shape, colour, position and
text placement by construction, and the DiT is their only pixel decoder. The letters of quoted text are not in the
ids: they reach the DiT through the glyph stream, letter by letter (which is what lets it write unseen words).

Why not a VQ trained by reconstruction (tried first, README): with 16 ids per image and ~2k codes, a code cannot
hold background × shape × colour × part, and a ViT from scratch needs thousands of steps before its features tell
a circle from a square, so reconstruction codes spent their capacity on background colours and lost the shapes.

The ViT + cosine codebook (`tokenizer.vq.VisualTokenizer`, the official architecture) is then trained to read
these ids from pixels (the scenes', and with `edit_images` the edit pairs' images too): ids = argmax cosine(projected
features, codebook) is exactly its `quantize`, so training is a cosine-softmax classifier over the codebook. It is
what turns condition images into ids for image-to-image.

Outputs in <out>/tokenizer/: ids_*.npy (int16: scenes target grid, scenes preview grid, edit sources, edit
targets; written first), vq.safetensors, code_patches.npy (a picture of each id, for sample grids),
ids_source_read.npy (the ids the trained ViT reads from each edit's source image, as the pipeline will: the AR
learns its edits from these, not from the scene graph's, so it meets at training the reading errors it meets in
use), samples.png (image | its ids drawn | the ids the ViT reads), loss.png, tb/, ckpt/.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm

from glmimage.config import preset
from glmimage.tokenizer.vq import VisualTokenizer, normalize
from glmimage.train import common as C
from glmimage.train import data as D
from glmimage.world.colors import PALETTE
from glmimage.world.render import SHAPE_OUTLINES

PATCH = 16  # side of the picture drawn for one id


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig(C.StageConfig):
    preset: str = "world"
    logit_scale: float = 16.0  # cosine-softmax temperature⁻¹
    # the codebook rows of the world's ids are sums of factor vectors (FactoredCodebook) while training, so that an
    # id never seen (a held-out shape–colour pair) has the row its shape and its colour give and is read like the rest
    factored_codebook: bool = False
    # this share of each batch is shown in greyscale and scored on all but colour (the summed probability of the ids
    # that say the same in any colour): the shape from its outline alone. Meant against the held-out pairs' misreads
    # (a purple circle read as a square); not shown to help: the same steps all in colour read them better (README)
    grey_fraction: float = 0.0
    # also train on the edit pairs' source and target images (their scene graphs' ids): ten times the images of the
    # scenes alone when the data stage makes 240,000 edits, against the ViT's overfitting to 60,000 scenes
    edit_images: bool = False


def stage_dir(cfg) -> Path:
    return Path(cfg.out) / "tokenizer"


def load_trained(out: str | Path, cfg_name: str = "world") -> VisualTokenizer:
    vq = VisualTokenizer(preset(cfg_name).vq)
    vq.load_state_dict(load_file(str(Path(out) / "tokenizer" / "vq.safetensors")), strict=True)
    return vq.eval()


def write_ids(root: Path, out: Path, grid: int) -> None:
    """The semantic ids of every training image and edit pair (from the scene graphs, no pixels involved)."""
    scenes = D.scene_graphs(D.Dataset(root / "data" / "scenes"))
    codes = [(D.token_codes(s, grid), D.token_codes(s, max(1, grid // 2))) for s in tqdm(scenes, desc="scene ids")]
    np.save(out / "ids_scenes.npy", np.stack([t for t, _ in codes]))
    np.save(out / "ids_preview.npy", np.stack([p for _, p in codes]))
    edits = D.scene_graphs(D.Dataset(root / "data" / "edits"))
    codes = [(D.token_codes(e.source, grid), D.token_codes(e.target, grid)) for e in tqdm(edits, desc="edit ids")]
    np.save(out / "ids_source.npy", np.stack([s for s, _ in codes]))
    np.save(out / "ids_target.npy", np.stack([t for _, t in codes]))


def code_patches(num_codes: int) -> np.ndarray:
    """(num_codes, PATCH, PATCH, 3) uint8: a picture of what each id says (grey: no background information)."""
    out = np.full((num_codes, PATCH, PATCH, 3), 128, np.uint8)
    for k in range(min(num_codes, D.NUM_CODES)):
        im = Image.new("RGB", (PATCH * 4, PATCH * 4), (128, 128, 128))
        draw = ImageDraw.Draw(im)
        if k < D.N_BG:
            color = PALETTE[D.COLORS[k // D.GRADIENTS]]
            im.paste(color, (0, 0, im.width, im.height))
        elif k < D.N_BG + D.N_SHAPE:
            q = k - D.N_BG
            py, q = q % D.PARTS, q // D.PARTS
            px, q = q % D.PARTS, q // D.PARTS
            color, shape = PALETTE[D.COLORS[q % len(D.COLORS)]], D.SHAPES[q // len(D.COLORS)]
            centre = [(-0.25, 0.25, 0.75, 1.25)[p] * im.width for p in (px, py)]
            r = 0.45 * im.width
            draw.polygon([(centre[0] + x * r, centre[1] + y * r) for x, y in SHAPE_OUTLINES[shape]], fill=color)
        else:
            q = k - D.N_BG - D.N_SHAPE
            part, q = q % len(D.TEXT_PARTS), q // len(D.TEXT_PARTS)
            color = PALETTE[D.COLORS[q // len(D.FONTS)]]
            x0 = (0.4, 0.0, 0.0, 0.4)[part] * im.width
            x1 = (1.0, 1.0, 0.6, 0.6)[part] * im.width
            for t in range(3):  # three "letters"
                a = x0 + (x1 - x0) * t / 3
                draw.rectangle([a + 2, 0.3 * im.height, a + (x1 - x0) / 3 - 2, 0.7 * im.height], fill=color)
        out[k] = np.asarray(im.resize((PATCH, PATCH), Image.Resampling.BOX))
    return out


def ids_to_image(ids: np.ndarray, patches: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """What a grid of ids says: (h*w,) ids -> (h*PATCH, w*PATCH, 3) uint8."""
    p = patches[np.asarray(ids, dtype=np.int64)].reshape(grid_h, grid_w, PATCH, PATCH, 3)
    return p.transpose(0, 2, 1, 3, 4).reshape(grid_h * PATCH, grid_w * PATCH, 3)


class FactoredCodebook(nn.Module):
    """The codebook rows of the world's ids as sums of factor vectors: rows = data.factor_matrix() @ factors (shape·part
    + colour·part for a shape id, …). Starts from the least-squares fit of the rows it is given. A joint row per
    (shape, colour, part) lets the ViT read a colour it never saw on a shape as some other shape of that colour; a
    sum of factors has no row of its own to learn, so the features must say shape and colour separately.

    exact=True (a run that starts from a trained model): the rows start as given, to the bit, and only move in factor
    space: rows = rows0 + x @ (factors - factors0), with rows0 the given rows (exact) or their additive fit. Without
    it a trained, non-additive codebook would be replaced by its additive fit before the first step, and the ViT
    would read other ids."""

    def __init__(self, rows: torch.Tensor, exact: bool = False) -> None:
        super().__init__()
        self.register_buffer("x", D.factor_matrix(len(rows)), persistent=False)
        fit = torch.linalg.lstsq(self.x, rows.detach().float()).solution
        self.factors = nn.Parameter(fit.clone())
        self.register_buffer("factors0", fit)
        self.register_buffer("rows0", rows.detach().float().clone() if exact else self.x @ fit)

    def forward(self) -> torch.Tensor:
        return self.rows0 + self.x @ (self.factors - self.factors0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "rows0" not in state_dict and prefix + "factors" in state_dict:  # rows = x @ factors + residual
            f = state_dict[prefix + "factors"]
            residual = state_dict.pop(prefix + "residual", torch.zeros_like(self.rows0))
            state_dict[prefix + "factors0"] = f.clone()
            state_dict[prefix + "rows0"] = self.x @ f + residual
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def cosine_logits(vq: VisualTokenizer, pixels: torch.Tensor, scale: float, bf16: bool,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:
    """-> (B, N, K) scaled cosine similarities; their argmax is VisualTokenizer.quantize (with `codebook`, the rows
    it stands for)."""
    with C.forward(bf16):
        feats = vq.features(pixels)
    z = F.normalize(vq.quant_proj(feats.float()), dim=-1)
    return scale * z @ F.normalize((vq.codebook.weight if codebook is None else codebook).float(), dim=-1).t()


def main(cfg: TokenizerTrainConfig) -> Path:
    C.set_threads(cfg)
    out = stage_dir(cfg)
    C.write_config(out, cfg)
    mcfg = preset(cfg.preset)
    root = Path(cfg.out)
    data = D.Dataset(root / "data" / "scenes")
    if mcfg.vq.codebook_size < D.NUM_CODES:
        raise ValueError(f"codebook {mcfg.vq.codebook_size} < {D.NUM_CODES} world codes")
    if mcfg.vq.downsample != 1:
        raise ValueError("the world tokenizer reads full-resolution images (vq.downsample must be 1)")
    grid = data.recipe["grid"]
    if not (out / "ids_target.npy").is_file():
        write_ids(root, out, grid)
    ids = torch.from_numpy(np.load(out / "ids_scenes.npy").astype(np.int64))
    images = data["images"]
    n = len(data)
    n_val = min(1000, n // 10)  # the last images: never trained on, for the reading accuracy
    mean, std = mcfg.vq.image_mean, mcfg.vq.image_std
    patches = code_patches(mcfg.vq.codebook_size)  # drawn once: samples.png and the stage output

    torch.manual_seed(cfg.seed)
    vq = VisualTokenizer(mcfg.vq)
    nn.init.normal_(vq.pos_embed.weight, std=0.02)
    C.init_from(cfg, out, {"vq": vq})
    k = min(mcfg.vq.codebook_size, D.NUM_CODES)
    models = {"vq": vq}
    if cfg.factored_codebook:
        models["factors"] = FactoredCodebook(vq.codebook.weight[:k], exact=bool(cfg.init))
    opt = C.make_optimizer([p for m in models.values() for p in m.parameters()], cfg)
    state = C.load_checkpoint(out, models, opt)

    if not 0.0 <= cfg.grey_fraction <= 1.0:
        raise ValueError(f"grey_fraction must be in [0, 1], got {cfg.grey_fraction}")
    n_grey = round(cfg.grey_fraction * cfg.batch_size)
    pool = [(images, ids, n - n_val)]  # (images, their ids, how many to train on): the scenes, then the edits'
    if cfg.edit_images:
        edits = D.Dataset(root / "data" / "edits")
        for key in ("source", "target"):
            pool.append((edits[key], torch.from_numpy(np.load(out / f"ids_{key}.npy").astype(np.int64)), len(edits)))
    ends = np.cumsum([m for _, _, m in pool])

    def batch(idx: np.ndarray, g: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
        if len(pool) == 1:
            return images[idx], ids[idx]
        local = [idx[(idx >= end - m) & (idx < end)] - (end - m) for (_, _, m), end in zip(pool, ends)]
        parts = [(im[i], t[i]) for (im, t, _), i in zip(pool, local)]
        perm = torch.randperm(len(idx), generator=g)  # the greyscale rows drawn from the whole pool
        return np.concatenate([x for x, _ in parts])[perm.numpy()], torch.cat([t for _, t in parts])[perm]
    same_but_colour = D.colour_classes(k) if n_grey else None  # only the greyscale rows' loss reads it

    def codebook() -> torch.Tensor | None:
        return torch.cat([models["factors"](), vq.codebook.weight[k:]]) if cfg.factored_codebook else None

    def sync() -> None:  # the factored rows into the ViT's own codebook, which is what gets read and saved
        if cfg.factored_codebook:
            with torch.no_grad():
                vq.codebook.weight[:k] = models["factors"]()
    start = state["step"] if state else 0
    log = C.Log(out, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="tokenizer", unit="step")
    pause = C.Pause(out)
    for step in range(start, cfg.steps):
        g = C.step_generator(cfg.seed, step)
        idx = np.sort(torch.randint(0, int(ends[-1]), (cfg.batch_size,), generator=g).numpy())
        pixels, target = batch(idx, g)
        x = normalize(greyscale(pixels, n_grey), mean, std)
        for group in opt.param_groups:
            group["lr"] = C.lr_at(step, cfg)
        logits = cosine_logits(vq, x, cfg.logit_scale, cfg.bf16, codebook())
        loss = colour_blind_loss(logits, target, n_grey, same_but_colour)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(vq.parameters(), cfg.grad_clip)
        opt.step()
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            seen = slice(n_grey, None) if n_grey < len(idx) else slice(None)  # in colour, where one is
            acc = _accuracies(logits[seen].argmax(-1), target[seen])
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc['acc']:.2f}")
            log.scalars(step, loss=loss.item(), grad_norm=gn.item(), lr=C.lr_at(step, cfg), **acc)
        done = step + 1
        if done % cfg.sample_every == 0 or done == cfg.steps:
            sync()
            val = np.arange(n - n_val, n)
            read = read_ids(vq, images[val], mean, std)
            log.scalars(step, **{f"val_{k}": v for k, v in _accuracies(torch.from_numpy(read), ids[val]).items()})
            _samples(images[n - 8:], ids[n - 8:].numpy(), read[-8:], grid, patches, out / "samples.png")
            log.plot(f"tokenizer · step {done}")
        if done % cfg.ckpt_every == 0 or done == cfg.steps or pause(done, cfg.steps):
            sync()
            C.save_checkpoint(out, models, opt, done)
        if pause.paused:
            break
    bar.close()
    if pause.paused:
        pause.finish(log)
        return out
    log.plot(f"tokenizer · step {cfg.steps}")
    log.close()
    sync()
    vq.eval()
    C.save_weights(vq, out / "vq.safetensors")
    np.save(out / "code_patches.npy", patches)
    if cfg.steps > 0 or cfg.init:  # a ViT that has learnt to read (not the random one of `--steps 0`)
        np.save(out / "ids_source_read.npy", read_sources(vq, root, mean, std).astype(np.int16))
    return out


def greyscale(images: np.ndarray, n: int) -> np.ndarray:
    """The first n of a batch of uint8 RGB images as their luminance (ITU-R 601), the rest as they are."""
    if n == 0:
        return images
    out = np.array(images)
    luma = np.rint(out[:n].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    out[:n] = np.clip(luma, 0, 255).astype(np.uint8)[..., None]
    return out


def colour_blind_loss(logits: torch.Tensor, target: torch.Tensor, n_grey: int,
                      same_but_colour: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy per token over the codebook; for the first n_grey images (shown in greyscale), of the summed
    probability of the ids that differ from the target only in colour (`data.colour_classes`)."""
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    if n_grey:
        blind = -logp[:n_grey].gather(-1, same_but_colour[target[:n_grey]]).logsumexp(-1)
        nll = torch.cat([blind, nll[n_grey:]])
    return nll.mean()


def read_sources(vq: VisualTokenizer, root: Path, mean, std) -> np.ndarray:
    """The ids the ViT reads from every edit's source image, with the codebook rows of unseen ids completed as the
    assembled model has them (train/assemble.py), so exactly what the pipeline's AR will be given."""
    from glmimage.train.assemble import complete_unseen, seen_codes

    reader = VisualTokenizer(vq.cfg)
    reader.load_state_dict(vq.state_dict())
    with torch.no_grad():
        reader.codebook.weight.copy_(complete_unseen(reader.codebook.weight, seen_codes(root)))
    return read_ids(reader, D.Dataset(root / "data" / "edits")["source"], mean, std, desc="read the edit sources")


def _accuracies(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Overall, and on the tokens that show a shape / text (the background is most tokens and easy)."""
    shape = (target >= D.N_BG) & (target < D.N_BG + D.N_SHAPE)
    text = target >= D.N_BG + D.N_SHAPE
    ok = pred == target
    out = {"acc": ok.float().mean().item()}
    if shape.any():
        out["acc_shape_tokens"] = ok[shape].float().mean().item()
    if text.any():
        out["acc_text_tokens"] = ok[text].float().mean().item()
    return out


@torch.no_grad()
def read_ids(vq: VisualTokenizer, images: np.ndarray, mean, std, batch: int = 500, desc: str | None = None
             ) -> np.ndarray:
    """uint8 images -> the ids the ViT reads (N, h*w) int64, exactly as the pipeline tokenizes (with a progress bar
    named `desc` when given)."""
    was = vq.training
    vq.eval()
    out = [vq.encode(normalize(images[i:i + batch], mean, std)).flatten(1).numpy()
           for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", disable=desc is None)]
    vq.train(was)
    return np.concatenate(out)


def _samples(images, ids, read, grid, patches, path: Path) -> None:
    scale = images.shape[1] // (grid * PATCH) if images.shape[1] >= grid * PATCH else 1
    real = [np.asarray(im) for im in images]
    says = [ids_to_image(i, patches, grid, grid) for i in ids]
    reads = [ids_to_image(r, patches, grid, grid) for r in read]
    if says[0].shape != real[0].shape:
        f = math.ceil(says[0].shape[0] / real[0].shape[0])
        real = [im.repeat(f, 0).repeat(f, 1)[: says[0].shape[0], : says[0].shape[1]] for im in real]
    C.grid_image([real, says, reads], scale=max(1, scale)).save(path)
