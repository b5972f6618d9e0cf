"""Pillow renderer of world scenes: drawn 4× larger, then LANCZOS-downsampled, so edges and glyphs are antialiased."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glmimage.world.colors import color_rgb
from glmimage.world.scene import Scene, Shape, Text

SUPERSAMPLE = 4
MIN_SIZE = 32
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF")
# Font name → TrueType file; None (or a file that is not on this machine) means Pillow's built-in Aileron.
FONT_FILES: dict[str, str | None] = {
    "aileron": None,
    "dejavu-sans": "DejaVuSans.ttf",
    "dejavu-sans-bold": "DejaVuSans-Bold.ttf",
    "dejavu-serif": "DejaVuSerif.ttf",
    "dejavu-mono": "DejaVuSansMono.ttf",
}
# Per text row: centre y, and the largest ink (width, height), all as fractions of the image side.
TEXT_LAYOUT: dict[int, tuple[float, float, float]] = {
    0: (0.17, 0.88, 0.24),
    1: (0.5, 0.88, 0.45),
    2: (0.83, 0.88, 0.24),
}
# Per text row: the horizontal band (y0, y1) that holds the text and no shape; judges read text there.
TEXT_BANDS: dict[int, tuple[float, float]] = {0: (0.0, 0.38), 1: (0.15, 0.85), 2: (0.62, 1.0)}


def _heart(n: int = 96) -> list[tuple[float, float]]:
    """The classic parametric heart curve (x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t), y down."""
    ts = [2 * math.pi * i / n for i in range(n)]
    return [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    """A star with one point up; inner is the inner/outer radius ratio."""
    return [((1 if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             -(1 if i % 2 == 0 else inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def _fit_box(points: list[tuple[float, float]], half_w: float = 1.0, half_h: float = 1.0) -> list[tuple[float, float]]:
    """Scale and centre a polygon so its bounding box is [-half_w, half_w] × [-half_h, half_h]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    sx, sy = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    return [((x - cx) / sx * half_w, (y - cy) / sy * half_h) for x, y in points]


# Outline of each shape in a unit box (x right, y down), as drawn; the judge uses the same outlines as templates.
SHAPE_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "circle": [(math.cos(2 * math.pi * i / 96), math.sin(2 * math.pi * i / 96)) for i in range(96)],
    "square": [(-0.88, -0.88), (0.88, -0.88), (0.88, 0.88), (-0.88, 0.88)],
    "triangle": _fit_box([(0.0, -1.0), (1.0, 0.732), (-1.0, 0.732)], 1.0, 0.866),
    "star": _fit_box(_star(), 1.0, 0.951),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "heart": _fit_box(_heart(), 1.0, 0.92),
}


@cache
def font_path(name: str) -> str | None:
    """The TrueType file of a font on this machine, or None for Pillow's built-in font."""
    if name not in FONT_FILES:
        raise ValueError(f"unknown font {name!r}; valid: {list(FONT_FILES)}")
    file = FONT_FILES[name]
    paths = [os.path.join(d, file) for d in FONT_DIRS] if file else []
    return next((p for p in paths if os.path.isfile(p)), None)


@lru_cache(maxsize=4096)
def load_font(name: str, px: int) -> ImageFont.FreeTypeFont:
    """A font at a pixel size; falls back to Pillow's built-in Aileron when the file is missing."""
    path = font_path(name)
    return ImageFont.truetype(path, px) if path else ImageFont.load_default(size=px)


@lru_cache(maxsize=65536)
def fit_font(name: str, text: str, max_w: int, max_h: int) -> int:
    """Largest pixel size whose ink box of text fits max_w × max_h (binary search; ink size grows with size)."""
    lo, hi = 4, max(5, 2 * max_h)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        left, top, right, bottom = load_font(name, mid).getbbox(text)
        if right - left <= max_w and bottom - top <= max_h:
            lo = mid
        else:
            hi = mid - 1
    return lo


def text_font_px(text: Text, size: int) -> float:
    """Font size (em) of a text object in pixels of the final image."""
    _, max_w, max_h = TEXT_LAYOUT[text.row]
    big = size * SUPERSAMPLE
    return fit_font(text.font, text.text, round(max_w * big), round(max_h * big)) / SUPERSAMPLE


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an int ≥ {MIN_SIZE} (64, 96 and 128 are tested), got {size!r}")


def _background(scene: Scene, side: int) -> Image.Image:
    """The (vertical gradient) background at side × side."""
    top = np.array(scene.background.top_rgb, dtype=np.float64)
    bottom = np.array(scene.background.bottom_rgb, dtype=np.float64)
    t = np.linspace(0.0, 1.0, side)[:, None]  # (side, 1)
    rows = np.rint(top * (1 - t) + bottom * t).astype(np.uint8)  # (side, 3)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (side, side, 3))), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Shape, side: int) -> None:
    cx, cy = obj.center
    r = obj.radius * side
    points = [(cx * side + x * r, cy * side + y * r) for x, y in SHAPE_OUTLINES[obj.shape]]
    draw.polygon(points, fill=color_rgb(obj.color))


def _draw_text(draw: ImageDraw.ImageDraw, obj: Text, side: int) -> None:
    cy, max_w, max_h = TEXT_LAYOUT[obj.row]
    font = load_font(obj.font, fit_font(obj.font, obj.text, round(max_w * side), round(max_h * side)))
    left, top, right, bottom = font.getbbox(obj.text)
    x = (0.5 + obj.offset[0]) * side - (left + right) / 2
    y = (cy + obj.offset[1]) * side - (top + bottom) / 2
    draw.text((x, y), obj.text, font=font, fill=color_rgb(obj.color))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Scene → size × size RGB image (drawn at 4× and LANCZOS-downsampled)."""
    _check_size(size)
    side = size * SUPERSAMPLE
    image = _background(scene, side)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if isinstance(obj, Shape):
            _draw_shape(draw, obj, side)
        else:
            _draw_text(draw, obj, side)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def text_band(text: Text, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of the band that holds a text object."""
    y0, y1 = TEXT_BANDS[text.row]
    return (0, math.floor(y0 * size), size, math.ceil(y1 * size))


def object_box(obj: Shape | Text, size: int, margin: int = 2) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) covering an object, with a margin; clipped to the image."""
    if isinstance(obj, Text):
        return text_band(obj, size)
    (cx, cy), r = obj.center, obj.radius
    box = (math.floor((cx - r) * size) - margin, math.floor((cy - r) * size) - margin,
           math.ceil((cx + r) * size) + margin, math.ceil((cy + r) * size) + margin)
    return (max(0, box[0]), max(0, box[1]), min(size, box[2]), min(size, box[3]))


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], *, columns: int = 6,
                  scale: int = 2) -> Image.Image:
    """A grid of images, each enlarged `scale`× (nearest) with its caption wrapped underneath."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images and {len(captions)} captions")
    cell = max(im.width for im in images) * scale
    font = ImageFont.load_default(size=11)
    lines = [textwrap.wrap(c, width=max(10, cell // 6)) for c in captions]
    text_h = 13 * max(len(w) for w in lines) + 4
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for i, (im, wrapped) in enumerate(zip(images, lines)):
        x, y = 8 + (i % columns) * (cell + 8), 8 + (i // columns) * (cell + text_h + 8)
        sheet.paste(im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(wrapped):
            draw.text((x, y + cell + 2 + 13 * j), line, font=font, fill=(0, 0, 0))
    return sheet
