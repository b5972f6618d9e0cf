"""Fine-tuning data: captioned folders, JSONL manifests, aspect buckets, deterministic bucketed batches."""
import json

import numpy as np
import pytest
from PIL import Image

from glmimage.data import BucketBatches, buckets, load_items, load_resized, nearest_bucket


def write(folder, name, size, caption=None, color=(200, 10, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption)


def test_folder_and_manifest(tmp_path):
    write(tmp_path / "d", "a.png", (64, 64), "a red square")
    write(tmp_path / "d" / "sub", "b.jpg", (96, 48), "  a wide one \n")
    items = load_items(tmp_path / "d")
    assert [(i.image.name, i.caption) for i in items] == [("a.png", "a red square"), ("b.jpg", "a wide one")]
    m = tmp_path / "d" / "m.jsonl"
    m.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n\n" + json.dumps(
        {"image": str(tmp_path / "d" / "sub" / "b.jpg"), "caption": "y"}) + "\n")
    assert [i.caption for i in load_items(m)] == ["x", "y"]


@pytest.mark.parametrize("setup,needle", [
    (lambda d: write(d, "a.png", (64, 64)), "without a caption"),
    (lambda d: write(d, "a.png", (64, 64), "   "), "empty caption"),
    (lambda d: d.mkdir(), "no images"),
    (lambda d: None, "not found"),
])
def test_bad_folders(tmp_path, setup, needle):
    setup(tmp_path / "d")
    with pytest.raises(ValueError, match=needle):
        load_items(tmp_path / "d")


@pytest.mark.parametrize("lines,needle", [
    (["{not json"], ":1: not JSON"),
    ([json.dumps({"image": "a.png"})], ":1: expected"),
    ([json.dumps({"image": "missing.png", "caption": "x"})], "image not found"),
    ([""], "no entries"),
])
def test_bad_manifests(tmp_path, lines, needle):
    write(tmp_path, "a.png", (64, 64))
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=needle):
        load_items(m)


def test_buckets_are_valid_sizes():
    options = buckets(32, 256 * 256)
    assert (256, 256) in options
    for w, h in options:
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 256 * 256 and max(w / h, h / w) <= 4
    ratios = [w / h for w, h in options]
    assert ratios == sorted(ratios) and ratios[0] < 0.3 and ratios[-1] > 3
    assert nearest_bucket((1920, 1080), options) == (320, 192)  # 1.67 vs 16:9 = 1.78: the closest on offer
    assert nearest_bucket((500, 500), options) == (256, 256)
    with pytest.raises(ValueError):
        buckets(64, 32 * 32)


def test_load_resized_covers_and_crops(tmp_path):
    im = np.zeros((100, 300, 3), np.uint8)
    im[:, 140:160] = 255  # a white bar in the middle
    Image.fromarray(im).save(tmp_path / "x.png")
    out = load_resized(tmp_path / "x.png", (64, 64))
    assert out.shape == (64, 64, 3) and out[:, 28:36].mean() > 200 and out[:, :10].mean() < 10
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_resized(tmp_path / "bad.png", (64, 64))
    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="too small"):
        load_resized(tmp_path / "tiny.png", (64, 64))


def test_bucket_batches_are_pure_functions_of_seed_and_epoch():
    sizes = [(64, 64)] * 7 + [(128, 64)] * 5
    bb = BucketBatches(sizes, buckets(32, 64 * 64), batch_size=3, seed=1)
    e0 = bb.epoch(0)
    assert e0 == BucketBatches(sizes, buckets(32, 64 * 64), batch_size=3, seed=1).epoch(0)
    assert e0 != bb.epoch(1)
    assert sorted(i for b in e0 for i in b) == list(range(12))
    for b in e0:
        assert len({bb.assigned[i] for i in b}) == 1 and len(b) <= 3
