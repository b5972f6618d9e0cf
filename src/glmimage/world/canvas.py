"""Canvas of the world model: the plan drawn as masks, the quoted text (channel 0) and the shapes (channel 1).

A DiT of a few million parameters trained for hours does not learn to spell words it never saw from the ByT5 glyph
stream alone (it paints letter-like strokes: README "Why no letters"), and from ids that name each 8-px token's
shape, colour and part it paints a rounded blob (README "Where the shapes go"). The world model's DiT therefore
also reads a canvas (TextDiffuser / GlyphControl style, a layout drawn as masks): channel 0 is the quoted text as a
grey mask, in the font and on the text row that the semantic ids name; channel 1 (world models with
`canvas_channels=2`) the silhouettes of the shapes that the ids name, in the cells and at the sizes that they give.
The DiT's `canvas_embedder` adds each patch of it to the patch embeddings: writing a letter or drawing a star's
points is then copying the pixels under the token. Colour, background and texture still come from the ids alone.
This is not part of the official GLM-Image architecture (its DiT has no such input, `canvas_patch=0`); it needs
ids that carry the layout, as the world tokenizer's do, and the canvas carries nothing the ids do not.

Training draws the canvas from the scene graph (`scene_canvas`), inference from the plan (`plan_canvas`, which
decodes the layout from the ids): the same renderer, so the DiT learns to put the ink exactly where the canvas has it.
An edit that quotes nothing but keeps its source's text ('use a black background') cannot spell the word from the
prompt: its inference canvas traces the source image's ink (`traced_text`, within 1 % of the rendered mask), and its
training canvas draws the target's text, which is the same ink.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from glmimage.glyph import quoted_spans
from glmimage.world.colors import PALETTE
from glmimage.world.render import SUPERSAMPLE, TEXT_BANDS, TEXT_LAYOUT, _draw_shape, _draw_text
from glmimage.world.scene import CELL_CENTERS, Background, Scene, Shape, Text

CHANNELS = ("text", "shapes")  # canvas channels, in order; a model reads the first DiTConfig.canvas_channels


def _mask(objects: Sequence[Shape | Text], size: int) -> np.ndarray:
    """Objects drawn in white as `render` draws them (4× then LANCZOS): (size, size) float32 in [0, 1]."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    for o in objects:
        if isinstance(o, Text):
            _draw_text(draw, Text(text=o.text, font=o.font, color="white", row=o.row, offset=o.offset), side)
        else:
            _draw_shape(draw, Shape(shape=o.shape, color="white", size=o.size, cell=o.cell, offset=o.offset), side)
    small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def text_mask(texts: Sequence[Text], size: int) -> np.ndarray:
    """The ink of text objects, drawn as `render` draws them: (size, size) float32 in [0, 1]."""
    return _mask(texts, size)


def shape_mask(shapes: Sequence[Shape], size: int) -> np.ndarray:
    """The silhouettes of shapes, drawn as `render` draws them: (size, size) float32 in [0, 1]."""
    return _mask(shapes, size)


# words that introduce the text an instruction replaces: 'replace "OLD" with "NEW"', 'write "NEW" instead of "OLD"'
_REPLACED = re.compile(r"\b(replace|instead of|from|change)\s*$", re.IGNORECASE)


def canvas_text(prompt: str) -> str | None:
    """The quoted string the inference canvas writes: the first (in GLM-Image's reading order) that the prompt does
    not name as the text being replaced, so an edit draws the new word ('replace "OLD" with "NEW"' -> NEW), as its
    training canvas (the target scene's text) does; None when the prompt quotes nothing drawable."""
    spans = quoted_spans(prompt)
    kept = [t for i, t in spans if not _REPLACED.search(prompt[:i])] or [t for _, t in spans]
    return next((t for t in kept if t.strip() and '"' not in t), None)


def _check_channels(channels: int) -> None:
    if channels not in range(1, len(CHANNELS) + 1):
        raise ValueError(f"canvas channels must be 1 (text) or 2 (text, shapes), got {channels!r}")


def _kept_text(source: Scene | None, scene: Scene) -> bool:
    """An edit keeps its source's text where it was, in its font (plan_canvas then traces the source's ink)."""
    layout = lambda s: sorted((t.row, t.font) for t in s.texts)  # noqa: E731
    return source is not None and bool(scene.texts) and layout(source) == layout(scene)


def scene_canvas(scene: Scene, prompt: str, size: int, channels: int = 1, source: Scene | None = None) -> np.ndarray:
    """Training canvas -> (channels, size, size) float32: the scene's text where plan_canvas would draw text (the
    prompt quotes it, or an edit of `source` quotes nothing and keeps its text in place), else empty; then the
    scene's shapes."""
    _check_channels(channels)
    out = np.zeros((channels, size, size), np.float32)
    quoted = canvas_text(prompt) is not None
    if scene.texts and (quoted or _kept_text(source, scene)):
        out[0] = text_mask(scene.texts, size)
    if channels > 1 and scene.shapes:
        out[1] = shape_mask(scene.shapes, size)
    return out


def _grid(ids: np.ndarray) -> tuple[np.ndarray, int]:
    ids = np.asarray(ids).reshape(-1)
    grid = round(len(ids) ** 0.5)
    if grid * grid != len(ids):
        raise ValueError(f"ids must be a square grid, got {len(ids)} ids")
    return ids, grid


def _text_tokens(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tokens of a flat grid of ids that hold text, and the colour and font index each names (token_codes)."""
    from glmimage.train.data import FONTS, N_BG, N_SHAPE, TEXT_PARTS

    where = np.flatnonzero(ids >= N_BG + N_SHAPE)
    colour, font = np.divmod((ids[where] - N_BG - N_SHAPE) // len(TEXT_PARTS), len(FONTS))
    return where, colour, font


def plan_layout(ids: np.ndarray) -> tuple[int, str] | None:
    """(text row, font) that a target grid of semantic ids (grid², raster order) gives its line of text: the row
    whose centre is nearest the text tokens' mean height, and their most common font; None without text tokens."""
    from glmimage.train.data import FONTS

    ids, grid = _grid(ids)
    where, _, fonts = _text_tokens(ids)
    if not len(where):
        return None
    y = ((where // grid) + 0.5).mean() / grid
    row = min(TEXT_LAYOUT, key=lambda r: abs(TEXT_LAYOUT[r][0] - y))
    return row, FONTS[int(np.bincount(fonts, minlength=len(FONTS)).argmax())]


def _labelled(shape: Shape, grid: int) -> set[int]:
    """Tokens of a grid that a shape labels on its own (train/data.token_codes of a scene holding only it)."""
    from glmimage.train.data import N_BG, token_codes

    codes = token_codes(Scene(background=Background(color="white"), objects=(shape,)), grid)
    return set(np.flatnonzero(codes >= N_BG).tolist())


def plan_shapes(ids: np.ndarray) -> list[Shape]:
    """The shapes a target grid of semantic ids names (grid², raster order). An id holds a shape, its colour and
    where the shape's centre lies relative to the token (train/data.token_codes); the token that holds the centre
    on both axes places the shape in the nearest cell of the 3×3 layout (the most common shape and colour there when
    a plan gives a cell two), and the size is the one whose box labels most of the tokens that carry this shape and
    colour and fewest others (ties: medium)."""
    from glmimage.train.data import COLORS, N_BG, N_SHAPE, PARTS
    from glmimage.world.scene import SHAPES

    ids, grid = _grid(ids)
    votes: dict[tuple[int, int], Counter] = {}
    tokens: dict[tuple[int, int], set[int]] = {}
    for t in np.flatnonzero((ids >= N_BG) & (ids < N_BG + N_SHAPE)):
        q, part = divmod(int(ids[t]) - N_BG, PARTS * PARTS)
        kind, (px, py) = divmod(q, len(COLORS)), divmod(part, PARTS)
        tokens.setdefault(kind, set()).add(int(t))
        if px in (1, 2) and py in (1, 2):  # the centre is in this token: which half, along each axis
            i, j = divmod(int(t), grid)
            x, y = (j + 0.5 * px - 0.25) / grid, (i + 0.5 * py - 0.25) / grid
            cell = tuple(int(np.abs(np.asarray(CELL_CENTERS) - v).argmin()) for v in (y, x))
            votes.setdefault(cell, Counter())[kind] += 1
    out = []
    for cell, counter in sorted(votes.items()):
        kind = counter.most_common(1)[0][0]
        seen = tokens[kind]
        best = None
        for size in ("medium", "small", "large"):
            shape = Shape(shape=SHAPES[kind[0]], color=COLORS[kind[1]], size=size, cell=cell)
            box = _labelled(shape, grid)
            score = len(box & seen) - len(box - seen)
            if best is None or score > best[0]:
                best = (score, shape)
        out.append(best[1])
    return out


def traced_text(source: np.ndarray, source_ids: np.ndarray) -> np.ndarray:
    """The ink of the line of text in a source image: (size, size) float32 in [0, 1], the share of each pixel that is
    ink, as text_mask draws it. The renderer blends ink over paper (pixel = a·ink + (1-a)·paper), so a is the
    pixel's projection onto ink - paper, with the ink the colour the ids name and the paper the background fitted
    (linear in y, as gradients are) on the background tokens; read in the band of the row the ids put the text on.
    source: (size, size, 3) uint8, source_ids: its square grid of ids (grid², raster order)."""
    from glmimage.train.data import COLORS, N_BG

    ids, grid = _grid(source_ids)
    size = source.shape[0]
    if source.shape != (size, size, 3) or size % grid:
        raise ValueError(f"source must be (size, size, 3) with size divisible by the grid {grid}, got {source.shape}")
    out = np.zeros((size, size), np.float32)
    layout = plan_layout(ids)
    if layout is None:
        return out
    ink = np.array(PALETTE[COLORS[int(np.bincount(_text_tokens(ids)[1]).argmax())]], np.float64)
    rgb = source.astype(np.float64)
    paper_tokens = (ids < N_BG).reshape(grid, grid).repeat(size // grid, 0).repeat(size // grid, 1)
    y0, y1 = (round(v * size) for v in TEXT_BANDS[layout[0]])
    band = np.zeros((size, size), bool)
    band[y0:y1] = True
    fit = paper_tokens & ~band
    if not fit.any():  # no paper outside the band: the image's left and right columns
        fit = np.zeros((size, size), bool)
        fit[:, [0, -1]] = True
    ys, _ = np.nonzero(fit)
    design = np.stack([np.ones(len(ys)), ys / size], 1)
    coef, *_ = np.linalg.lstsq(design, rgb[fit], rcond=None)  # (2, 3): paper(y) = c0 + c1·y
    paper = (np.stack([np.ones(size), np.arange(size) / size], 1) @ coef)[:, None, :]  # (size, 1, 3)
    contrast = ink - paper
    a = ((rgb - paper) * contrast).sum(-1) / np.maximum((contrast ** 2).sum(-1), 1.0)
    out[band] = np.clip(a[band], 0.0, 1.0)
    return out


def plan_canvas(prompt: str, ids: np.ndarray, height: int, width: int, channels: int = 1,
                source: np.ndarray | None = None, source_ids: np.ndarray | None = None) -> np.ndarray:
    """Inference canvas -> (channels, height, width) float32: the prompt's quoted string (canvas_text), centred on the
    row and in the font the plan's ids give, then the shapes the ids give (plan_shapes). Empty where the prompt quotes
    nothing or the plan has no text or no shape, and all empty when the image is not square (the world's renderer
    lays scenes out on square images only). An edit (source: the image edited, (height, width, 3) uint8, and
    source_ids: what the ViT reads from it) whose prompt quotes nothing and whose plan keeps the source's text on its
    row in its font gets the source's ink traced (traced_text): the letters stay the letters they were."""
    _check_channels(channels)
    out = np.zeros((channels, height, width), np.float32)
    if height != width:
        return out
    text, layout = canvas_text(prompt), plan_layout(ids)
    if text is not None and layout is not None:
        row, font = layout
        out[0] = text_mask([Text(text=text, font=font, color="white", row=row)], height)
    elif text is None and layout is not None and source is not None and source_ids is not None \
            and np.size(source_ids) == np.size(ids) and plan_layout(source_ids) == layout:
        out[0] = traced_text(source, source_ids)
    if channels > 1:
        shapes = plan_shapes(ids)
        if shapes:
            out[1] = shape_mask(shapes, height)
    return out


def plan_canvases(prompts: Sequence[str], ids: Sequence[np.ndarray] | np.ndarray | torch.Tensor, height: int,
                  width: int, channels: int = 1, source: Image.Image | None = None,
                  source_ids: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """plan_canvas of a batch: prompts and their target grids (B, grid²) -> (B, channels, height, width) float32;
    source / source_ids: the image every prompt edits and the ViT's reading of it, if any."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    if len(prompts) != len(ids):
        raise ValueError(f"got {len(prompts)} prompts and {len(ids)} grids of ids")
    if source is not None:
        source = np.asarray(source.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))
    if isinstance(source_ids, torch.Tensor):
        source_ids = source_ids.cpu().numpy()
    return torch.from_numpy(np.stack([plan_canvas(p, np.asarray(i), height, width, channels, source, source_ids)
                                      for p, i in zip(prompts, ids)]))
