"""Glyph canvas of the world model: the quoted text drawn as a mask where the plan puts it.

A DiT of a few million parameters trained for hours does not learn to spell words it never saw from the ByT5 glyph
stream alone (it paints letter-like strokes: README "Why no letters"). The world model's DiT therefore also reads a
canvas (TextDiffuser / GlyphControl style): the quoted text rendered as a grey mask, in the font and on the text row
that the semantic ids name, which the DiT's `canvas_embedder` adds to the patches under it. Writing a letter then is
copying the pixels under the token, for any word. This is not part of the official GLM-Image architecture (its DiT
has no such input, `canvas_patch=0`); it needs ids that carry the text layout, as the world tokenizer's do.

Training draws the canvas from the scene graph (`scene_canvas`), inference from the plan (`plan_canvas`): the same
renderer, so the DiT learns to put the ink exactly where the canvas has it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from glmimage.glyph import extract_glyph_texts
from glmimage.world.render import SUPERSAMPLE, TEXT_LAYOUT, _draw_text
from glmimage.world.scene import Scene, Text


def text_mask(texts: Sequence[Text], size: int) -> np.ndarray:
    """The ink of text objects, drawn as `render` draws them (4× then LANCZOS): (size, size) float32 in [0, 1]."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    for t in texts:
        _draw_text(draw, Text(text=t.text, font=t.font, color="white", row=t.row, offset=t.offset), side)
    small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def scene_canvas(scene: Scene, prompt: str, size: int) -> np.ndarray:
    """Training canvas: the scene's text where the prompt quotes text (else empty) -> (size, size) float32."""
    if not scene.texts or not extract_glyph_texts(prompt):
        return np.zeros((size, size), np.float32)
    return text_mask(scene.texts, size)


def plan_layout(ids: np.ndarray) -> tuple[int, str] | None:
    """(text row, font) that a target grid of semantic ids (grid², raster order) gives its line of text: the row
    whose centre is nearest the text tokens' mean height, and their most common font; None without text tokens."""
    from glmimage.train.data import FONTS, N_BG, N_SHAPE, TEXT_PARTS

    ids = np.asarray(ids).reshape(-1)
    grid = round(len(ids) ** 0.5)
    if grid * grid != len(ids):
        raise ValueError(f"ids must be a square grid, got {len(ids)} ids")
    where = np.flatnonzero(ids >= N_BG + N_SHAPE)
    if not len(where):
        return None
    y = ((where // grid) + 0.5).mean() / grid
    row = min(TEXT_LAYOUT, key=lambda r: abs(TEXT_LAYOUT[r][0] - y))
    fonts = ((ids[where] - N_BG - N_SHAPE) // len(TEXT_PARTS)) % len(FONTS)
    return row, FONTS[int(np.bincount(fonts, minlength=len(FONTS)).argmax())]


def plan_canvas(prompt: str, ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inference canvas: the prompt's first quoted string, centred on the row and in the font the plan's ids give
    -> (height, width) float32. Empty when the prompt quotes nothing, the plan has no text or the image is not
    square (the world's renderer lays text out on square images only)."""
    texts = [t for t in extract_glyph_texts(prompt) if t.strip() and '"' not in t]
    layout = plan_layout(ids) if texts and height == width else None
    if layout is None:
        return np.zeros((height, width), np.float32)
    row, font = layout
    return text_mask([Text(text=texts[0], font=font, color="white", row=row)], height)

