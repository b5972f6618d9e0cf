"""Datasets of real images with captions, for fine-tuning: an image folder with a caption `.txt` beside each image
(the diffusers / kohya convention), a JSONL manifest, or webdataset shards (`.tar` files where `KEY.png|jpg|…` and
`KEY.txt` (or `KEY.json` with "caption") belong together), and aspect-ratio buckets of sizes the model accepts.

Loaders validate at the boundary: a missing caption, an unreadable or tiny image, a manifest line without `image`
or `caption` raise ValueError naming the file (and line), before any training starts.
"""
from __future__ import annotations

import io
import json
import math
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    image: Path  # the image file, or the .tar shard that holds it
    caption: str
    member: str | None = None  # the image's name inside the shard
    source: Path | None = None  # image-to-image: the condition image the caption (an instruction) edits


def scan_folder(root: str | Path) -> list[Item]:
    """Every image under `root` (recursively) with the caption in the `.txt` of the same stem."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    items, missing = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            missing.append(path)
            continue
        caption = txt.read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"{txt}: empty caption")
        items.append(Item(path, caption))
    if missing:
        raise ValueError(f"{len(missing)} image(s) without a caption file, e.g. {missing[0]} (expected "
                         f"{missing[0].with_suffix('.txt')})")
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) with captions under {root}")
    return items


def read_manifest(path: str | Path) -> list[Item]:
    """JSONL, one {"image": path, "caption": text} per line, or for image-to-image {"image": edited, "source":
    original, "caption": instruction} (every line, or none); relative paths are relative to the manifest."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest not found: {path}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or \
                not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise ValueError(f"{path}:{n}: expected {{\"image\": path, \"caption\": non-empty text}}")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{path}:{n}: image not found: {image}")
        source = row.get("source")
        if source is not None:
            if not isinstance(source, str):
                raise ValueError(f"{path}:{n}: \"source\" must be one image path (one condition image per edit)")
            source = Path(source) if Path(source).is_absolute() else path.parent / source
            if not source.is_file():
                raise ValueError(f"{path}:{n}: source image not found: {source}")
        items.append(Item(image, row["caption"].strip(), source=source))
    if not items:
        raise ValueError(f"{path}: no entries")
    if len({it.source is None for it in items}) > 1:
        raise ValueError(f"{path}: some lines have a \"source\" and some do not; keep text-to-image and edit pairs "
                         "in separate manifests")
    return items


def read_shards(shards: list[Path]) -> list[Item]:
    """webdataset shards: in each .tar, files sharing a key (the name up to its first dot) form one sample."""
    items = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in members:
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{key}", {})[ext.lower()] = m
                for key, files in sorted(groups.items()):
                    image = next((files[e] for e in ("png", "jpg", "jpeg", "webp", "bmp") if e in files), None)
                    if image is None:
                        continue
                    if "txt" in files:
                        caption = tar.extractfile(files["txt"]).read().decode("utf-8").strip()
                    elif "json" in files:
                        meta = json.loads(tar.extractfile(files["json"]).read())
                        caption = str(meta.get("caption") or meta.get("text") or "").strip() \
                            if isinstance(meta, dict) else ""
                    else:
                        raise ValueError(f"{shard}: sample {key!r} has an image but no .txt or .json caption")
                    if not caption:
                        raise ValueError(f"{shard}: sample {key!r} has an empty caption")
                    items.append(Item(shard, caption, image.name))
        except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read shard {shard}: {e}") from None
    if not items:
        raise ValueError(f"no captioned images in {', '.join(map(str, shards[:3]))}")
    return items


def load_items(source: str | Path) -> list[Item]:
    """A folder (captions beside images, or .tar shards), a .jsonl manifest, or a .tar shard."""
    source = Path(source)
    if source.suffix == ".jsonl":
        return read_manifest(source)
    if source.suffix == ".tar":
        if not source.is_file():
            raise ValueError(f"shard not found: {source}")
        return read_shards([source])
    if source.is_dir() and (shards := sorted(source.glob("*.tar"))):
        return read_shards(shards)
    return scan_folder(source)


def buckets(stride: int, area: int, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) sizes, multiples of `stride`, of at most `area` pixels and aspect within 1:max_ratio, each
    the widest for its height: the buckets images are resized and cropped to."""
    out = set()
    h = stride
    while h * stride <= area:
        w = (area // h) // stride * stride
        if w >= stride and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        h += stride
    if not out:
        raise ValueError(f"no size of at most {area} px with stride {stride}")
    return sorted(out, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], options: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to the image's (width, height)."""
    r = math.log(size[0] / size[1])
    return min(options, key=lambda wh: abs(math.log(wh[0] / wh[1]) - r))


def open_image(item: Item | Path, min_side: int = 16) -> Image.Image:
    """An item's image as RGB (from its file or its shard); ValueError when unreadable or tiny."""
    item = item if isinstance(item, Item) else Item(Path(item), "")
    name = f"{item.image}:{item.member}" if item.member else str(item.image)
    try:
        if item.member:
            with tarfile.open(item.image) as tar:
                src = io.BytesIO(tar.extractfile(item.member).read())
        else:
            src = item.image
        with Image.open(src) as im:
            im.load()
            im = im.convert("RGB")
    except (OSError, ValueError, KeyError, tarfile.TarError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from None
    if min(im.size) < min_side:
        raise ValueError(f"{name}: {im.width}x{im.height} is too small (at least {min_side} px a side)")
    return im


def load_resized(path: Item | Path, size: tuple[int, int], min_side: int = 16) -> np.ndarray:
    """Read an image, scale it to cover `size` and centre-crop -> uint8 (H, W, 3)."""
    return resize_crop(open_image(path, min_side), size)


def resize_crop(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover size (width, height), centre-crop -> uint8 (H, W, 3)."""
    w, h = size
    scale = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.LANCZOS)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)))


class BucketBatches:
    """Batches of indices that share a bucket, reshuffled each epoch from (seed, epoch): a pure function of them,
    so a resumed run sees the same batches."""

    def __init__(self, sizes: list[tuple[int, int]], options: list[tuple[int, int]], batch_size: int,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.assigned = [nearest_bucket(s, options) for s in sizes]
        self.batch_size, self.seed = batch_size, seed

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.assigned):
            groups.setdefault(b, []).append(i)
        batches = []
        for b in sorted(groups):
            idx = groups[b]
            rng.shuffle(idx)
            batches += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def bucket_of(self, batch: list[int]) -> tuple[int, int]:
        return self.assigned[batch[0]]
