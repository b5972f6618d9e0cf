"""World datasets on disk: rendered scenes (with captions) and edit pairs, and the semantic codes of a scene.

A dataset folder holds uint8 image arrays (`.npy`, memory-mapped on load), the images at the visual tokenizer's
input sizes (half: target grid, quarter: preview grid; resized exactly as `tokenizer.vq.preprocess` does), and JSON
with captions / instructions. Item i is a pure function of (seed, split, i), so a folder is reproducible.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from glmimage.checkpoint import atomic_folder
from glmimage.train.common import StageConfig
from glmimage.world import all_captions, sample_edit, sample_scene
from glmimage.world.colors import PALETTE
from glmimage.world.render import TEXT_LAYOUT, fit_font, load_font, render, SUPERSAMPLE
from glmimage.world.scene import FONT_STYLES, SHAPES, Scene, Shape, Text

COLORS = tuple(PALETTE)
FONTS = tuple(FONT_STYLES)
MIN_COVER = 0.08  # an object labels a token when its box covers this share of the token


def text_box(t: Text, size: int = 64) -> tuple[float, float, float, float]:
    """Ink box (x0, y0, x1, y1) of a text object, fractions of the image side (as the renderer lays it out)."""
    side = size * SUPERSAMPLE
    cy, max_w, max_h = TEXT_LAYOUT[t.row]
    left, top, right, bottom = load_font(t.font, fit_font(t.font, t.text, round(max_w * side),
                                                          round(max_h * side))).getbbox(t.text)
    w, h = (right - left) / side, (bottom - top) / side
    cx, cy = 0.5 + t.offset[0], cy + t.offset[1]
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


# ---------------------------------------------------------------------------------------------------------------
# Semantic codes: what each token of the grid holds, read off the scene graph, as one id
# ---------------------------------------------------------------------------------------------------------------
GRADIENTS = 5  # background gradient buckets: flat, light / strong toward white, light / strong toward black
PARTS = 4  # where the object's centre lies along an axis, in token units: before, first half, second half, after
TEXT_PARTS = ("left end", "middle", "right end", "whole")
N_BG = len(COLORS) * GRADIENTS
N_SHAPE = len(SHAPES) * len(COLORS) * PARTS * PARTS
N_TEXT = len(COLORS) * len(FONTS) * len(TEXT_PARTS)
NUM_CODES = N_BG + N_SHAPE + N_TEXT  # 60 + 1152 + 240 = 1452


def _gradient_bucket(g: float) -> int:
    if abs(g) < 0.05:
        return 0
    return (1 if abs(g) < 0.25 else 2) + (0 if g > 0 else 2)


def _part(u: float) -> int:
    return 0 if u < 0 else 1 if u < 0.5 else 2 if u < 1 else 3


def code_factors(code: int) -> list[tuple[str, int]]:
    """The factors a semantic id is made of (token_codes), as (factor table, index) pairs."""
    if code < N_BG:
        return [("bg", code)]
    if code < N_BG + N_SHAPE:
        q, part = divmod(code - N_BG, PARTS * PARTS)
        shape, colour = divmod(q, len(COLORS))
        return [("shape·part", shape * PARTS * PARTS + part), ("colour·part", colour * PARTS * PARTS + part),
                ("is_shape", 0)]
    q = code - N_BG - N_SHAPE
    part, q = q % len(TEXT_PARTS), q // len(TEXT_PARTS)
    font, colour = q % len(FONTS), q // len(FONTS)
    return [("text colour·part", colour * len(TEXT_PARTS) + part), ("font·part", font * len(TEXT_PARTS) + part),
            ("is_text", 0)]


def colour_classes(k: int = NUM_CODES) -> torch.Tensor:
    """(k, len(COLORS)) int64: for each id, the ids that say the same but in each colour (background: colour × the
    same gradient; shape: the same shape and part; text: the same font and part). What an image without its colours
    (greyscale) still tells apart; row c holds c itself."""
    n = len(COLORS)
    out = torch.empty(k, n, dtype=torch.long)
    colours = torch.arange(n)
    for code in range(k):
        if code < N_BG:
            out[code] = colours * GRADIENTS + code % GRADIENTS
        elif code < N_BG + N_SHAPE:
            q, part = divmod(code - N_BG, PARTS * PARTS)
            out[code] = N_BG + ((q // n) * n + colours) * PARTS * PARTS + part
        else:
            q = code - N_BG - N_SHAPE
            part, q = q % len(TEXT_PARTS), q // len(TEXT_PARTS)
            out[code] = N_BG + N_SHAPE + (colours * len(FONTS) + q % len(FONTS)) * len(TEXT_PARTS) + part
    return out


def factor_matrix(k: int = NUM_CODES) -> torch.Tensor:
    """(k, F) 0/1 float: which factors (code_factors) each of the ids 0 … k-1 is made of."""
    columns: dict[tuple[str, int], int] = {}
    rows = [[columns.setdefault(f, len(columns)) for f in code_factors(c)] for c in range(k)]
    x = torch.zeros(k, len(columns))
    for c, cols in enumerate(rows):
        x[c, cols] = 1.0
    return x


@torch.no_grad()
def factored_init_(table: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Initialise the rows of an id table (embedding or output head, (K, D)) for the semantic ids as sums of random
    vectors of their factors (code_factors), each row N(0, std²) like a plain init. A red and a blue "circle, centre
    in this part" then start alike and learn the circle's part together, across the 12 colours, instead of each
    from its own 1/12 of the data."""
    k = min(table.shape[0], NUM_CODES)
    x = factor_matrix(k)
    f = torch.randn(x.shape[1], table.shape[1]) * std
    table[:k] = ((x @ f) / x.sum(1, keepdim=True).sqrt()).to(table.dtype)
    return table


def token_codes(scene: Scene, grid: int) -> np.ndarray:
    """(grid²,) int16 semantic ids, raster order. A token holds one of:
    - background only: its colour and gradient bucket (ids 0 … 59);
    - the shape covering it most: shape, colour, and where the shape's centre lies relative to the token along
      x and y (which part of the shape this token shows) (60 … 1211);
    - text: its colour, font, and whether the token is the left end, middle, right end or whole of the line
      (1212 … 1451). The letters themselves reach the DiT through the glyph stream.
    Tokens with an object do not repeat the background: the DiT reads it from the background tokens around."""
    bg = scene.background
    bg_code = COLORS.index(bg.color) * GRADIENTS + _gradient_bucket(bg.gradient)
    boxes = []
    for o in scene.objects:
        if isinstance(o, Shape):
            (cx, cy), r = o.center, o.radius
            boxes.append((o, (cx - r, cy - r, cx + r, cy + r)))
        else:
            boxes.append((o, text_box(o)))
    out = np.full(grid * grid, bg_code, np.int16)
    for i in range(grid):
        for j in range(grid):
            cell = (j / grid, i / grid, (j + 1) / grid, (i + 1) / grid)
            best, best_cover, best_box = None, MIN_COVER, None
            for o, b in boxes:
                ow = max(0.0, min(cell[2], b[2]) - max(cell[0], b[0]))
                oh = max(0.0, min(cell[3], b[3]) - max(cell[1], b[1]))
                if ow * oh * grid * grid >= best_cover:
                    best, best_cover, best_box = o, ow * oh * grid * grid, b
            if isinstance(best, Shape):
                cx, cy = best.center
                px, py = _part(cx * grid - j), _part(cy * grid - i)
                k = ((SHAPES.index(best.shape) * len(COLORS) + COLORS.index(best.color)) * PARTS + px) * PARTS + py
                out[i * grid + j] = N_BG + k
            elif isinstance(best, Text):
                left, right = best_box[0] >= cell[0], best_box[2] <= cell[2]
                part = 3 if left and right else 0 if left else 2 if right else 1
                k = (COLORS.index(best.color) * len(FONTS) + FONTS.index(best.font)) * len(TEXT_PARTS) + part
                out[i * grid + j] = N_BG + N_SHAPE + k
    return out


def scene_graphs(ds: "Dataset", n: int | None = None) -> list:
    """The scene graphs (scenes) or edits of a built folder, re-sampled from its recipe without rendering; the first
    `n` only when given (each item is drawn from its own index, so they are the whole list's first n)."""
    r = ds.recipe
    job = _Job(r["kind"], r["seed"], r["split"], r["size"], r["grid"], 0, r["n"])
    count = r["n"] if n is None else min(n, r["n"])
    if r["kind"] == "scenes":
        return [sample_scene(_rng(job, i), split=job.split) for i in range(count)]
    return [sample_edit(_rng(job, i), split=job.split) for i in range(count)]


def tokenizer_views(image: Image.Image, downsample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The image as the visual tokenizer sees it for the target grid (÷downsample) and for the preview grid
    (an image half the side, ÷downsample again), bicubic like `preprocess`."""
    s = image.width
    half = image.resize((s // downsample, s // downsample), Image.BICUBIC)
    quarter = image.resize((s // 2 // downsample, s // 2 // downsample), Image.BICUBIC)
    return np.asarray(half), np.asarray(quarter)


@dataclass(frozen=True)
class _Job:
    kind: str  # "scenes" or "edits"
    seed: int
    split: str
    size: int
    grid: int
    start: int
    stop: int


def _rng(job: _Job, i: int) -> random.Random:
    return random.Random(f"{job.kind}-{job.seed}-{job.split}-{i}")


def _work(job: _Job) -> dict:
    out: dict[str, list] = {}

    def add(k, v):
        out.setdefault(k, []).append(v)

    for i in range(job.start, job.stop):
        rng = _rng(job, i)
        if job.kind == "scenes":
            scene = sample_scene(rng, split=job.split)
            im = render(scene, job.size)
            half, quarter = tokenizer_views(im)
            add("images", np.asarray(im)), add("half", half), add("quarter", quarter)
            add("captions", all_captions(scene))
            add("texts", [t.text for t in scene.texts])
        else:
            edit = sample_edit(rng, split=job.split)
            src, tgt = render(edit.source, job.size), render(edit.target, job.size)
            add("source", np.asarray(src)), add("target", np.asarray(tgt))
            add("source_half", tokenizer_views(src)[0])
            add("target_half", tokenizer_views(tgt)[0])
            add("instructions", edit.instruction)
            add("kinds", edit.kind)
    return out


ARRAYS = {"scenes": ("images", "half", "quarter"), "edits": ("source", "target", "source_half",
                                                                      "target_half")}
LISTS = {"scenes": ("captions", "texts"), "edits": ("instructions", "kinds")}


def build(path: str | Path, kind: str, n: int, *, seed: int = 0, split: str = "train", size: int = 64,
          grid: int = 4, workers: int = 2, chunk: int = 500) -> Path:
    """Render n items into `path` (atomically), unless a complete folder with the same recipe is already there."""
    if kind not in ARRAYS:
        raise ValueError(f"kind must be 'scenes' or 'edits', got {kind!r}")
    path = Path(path)
    recipe = {"kind": kind, "n": n, "seed": seed, "split": split, "size": size, "grid": grid}
    meta = path / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("recipe") == recipe:
        return path
    jobs = [_Job(kind, seed, split, size, grid, a, min(n, a + chunk)) for a in range(0, n, chunk)]
    parts = []
    with mp.get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool:
        for part in tqdm(pool.imap(_work, jobs), total=len(jobs), desc=f"render {kind} ({split})", unit="chunk"):
            parts.append(part)
    with atomic_folder(path) as tmp:
        for k in ARRAYS[kind]:
            np.save(tmp / f"{k}.npy", np.stack([a for p in parts for a in p[k]]))
        lists = {k: [v for p in parts for v in p[k]] for k in LISTS[kind]}
        (tmp / "lists.json").write_text(json.dumps(lists))
        (tmp / "meta.json").write_text(json.dumps({"recipe": recipe}))
    return path


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def imap(self, fn, xs):
        return map(fn, xs)


class Dataset:
    """A built folder: arrays memory-mapped, lists in memory."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ValueError(f"{path} is not a built world dataset (no meta.json)")
        self.path = path
        self.recipe = json.loads((path / "meta.json").read_text())["recipe"]
        kind = self.recipe["kind"]
        self.arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in ARRAYS[kind]}
        self.lists = json.loads((path / "lists.json").read_text())

    def __len__(self) -> int:
        return self.recipe["n"]

    def __getitem__(self, k: str):
        return self.arrays[k] if k in self.arrays else self.lists[k]


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Stage `data`
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataTrainConfig(StageConfig):
    n_scenes: int = 60000
    n_edits: int = 24000
    size: int = 64
    grid: int = 4  # target token grid side (size / token stride)
    workers: int = 2


def main(cfg: DataTrainConfig) -> Path:
    """Render the training scenes and edit pairs (split "train") into <out>/data/{scenes,edits}."""
    root = Path(cfg.out) / "data"
    build(root / "scenes", "scenes", cfg.n_scenes, seed=cfg.seed, size=cfg.size, grid=cfg.grid, workers=cfg.workers)
    build(root / "edits", "edits", cfg.n_edits, seed=cfg.seed, size=cfg.size, grid=cfg.grid, workers=cfg.workers)
    return root
