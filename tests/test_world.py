"""The synthetic world: sampler, renderer, captions, edits, QA, and the judges proven on clean renders."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glmimage.world.render as render_mod
from glmimage.world import judges
from glmimage.world.captions import CELL_PHRASES, all_captions, caption
from glmimage.world.colors import PALETTE, lab_distance
from glmimage.world.edits import EDIT_KINDS, MOVE_PHRASES, edit_heldout_items, sample_edit
from glmimage.world.qa import all_qa, sample_qa
from glmimage.world.render import render, text_font_px
from glmimage.world.scene import (
    FONT_STYLES,
    HELDOUT_WORDS,
    SCENE_KINDS,
    SHAPES,
    TRAIN_WORDS,
    Background,
    Scene,
    Shape,
    Text,
    blocked_rows,
    box_gap,
    contrasts,
    free_cells,
    heldout_items,
    sample_scene,
    scene_kind,
    text_contrasts,
)

SHAPE_KINDS = ("single", "count", "relation", "object_text")
TEXT_KINDS = ("text", "object_text")


def scenes(kinds, n, *, seed=0, split="train"):
    """n deterministic scenes cycling through kinds."""
    return [sample_scene(random.Random(seed * 100_003 + i), kind=kinds[i % len(kinds)], split=split)
            for i in range(n)]


def quotes(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def test_palette_and_vocabulary():
    assert len(SHAPES) >= 6 and len(PALETTE) >= 8
    for a, b in itertools.combinations(PALETTE.values(), 2):
        assert lab_distance(a, b) >= 40  # the judge names colours by nearest palette entry
    assert render_mod.FONT_FILES.keys() == FONT_STYLES.keys()
    assert not set(TRAIN_WORDS) & set(HELDOUT_WORDS)
    assert all(3 <= len(w) <= 6 and w.isalpha() and w.isupper() for w in TRAIN_WORDS + HELDOUT_WORDS)


def test_bad_input_names_valid_options():
    with pytest.raises(ValueError, match="circle"):
        Shape(shape="hexagon", color="red")
    with pytest.raises(ValueError, match="purple"):
        Shape(shape="circle", color="mauve")
    with pytest.raises(ValueError, match="dejavu-serif"):
        Text(text="HI", font="comic", color="red")
    with pytest.raises(ValueError, match="relation"):
        sample_scene(random.Random(0), kind="crowd")
    with pytest.raises(ValueError, match="heldout"):
        sample_scene(random.Random(0), split="test")
    with pytest.raises(ValueError, match="recolor"):
        sample_edit(random.Random(0), kind="rotate")
    with pytest.raises(ValueError, match="size"):
        render(scenes(("single",), 1)[0], size=8)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sampled_scenes_are_well_formed(split):
    for kind in SCENE_KINDS:
        for scene in scenes((kind,), 150, seed=1, split=split):
            assert scene_kind(scene) == kind
            assert 1 <= len(scene.objects) <= 4
            for s in scene.shapes:
                assert contrasts(s.color, scene.background)
                cx, cy = s.center
                assert s.radius < cx < 1 - s.radius and s.radius < cy < 1 - s.radius
                assert judges.grid_cell(cx, cy) == s.cell  # the centre stays in its third of the image
            for a, b in itertools.combinations(scene.shapes, 2):
                assert a.cell != b.cell and box_gap(a, b) >= 0.03
            for t in scene.texts:
                assert text_contrasts(t.color, scene.background)
                assert all(s.cell[0] not in blocked_rows(scene) for s in scene.shapes)  # text and shapes never meet


def test_heldout_items_never_in_train():
    train = scenes(tuple(SCENE_KINDS), 5000, seed=2)
    assert all(not heldout_items(s) for s in train)
    train_words = {t.text.upper() for s in train for t in s.texts}
    assert not train_words & set(HELDOUT_WORDS)
    for s in train[:1000]:
        for c in all_captions(s):
            assert not {q.upper() for q in quotes(c)} & set(HELDOUT_WORDS)
    # Every held-out scene holds at least one held-out item, and all of them get used.
    held = scenes(tuple(SCENE_KINDS), 1500, seed=3, split="heldout")
    assert all(heldout_items(s) for s in held)
    seen = set().union(*(heldout_items(s) for s in held))
    assert {i.split(":")[0] for i in seen} == {"word", "pair", "relation"}
    assert {i for i in seen if i.startswith("word:")} == {f"word:{w}" for w in HELDOUT_WORDS}


def test_heldout_edits_never_in_train():
    for i in range(400):
        kind = list(EDIT_KINDS)[i % len(EDIT_KINDS)]
        assert not edit_heldout_items(sample_edit(random.Random(i), kind=kind, split="train"))
        assert edit_heldout_items(sample_edit(random.Random(i), kind=kind, split="heldout"))
    held_types = {item for i in range(300) for item in edit_heldout_items(
        sample_edit(random.Random(i), kind=("recolor", "move", "add", "remove")[i % 4], split="heldout"))
        if item.startswith("edit:")}
    assert len(held_types) == 4


# ---------------------------------------------------------------------------------------------------------------
# Rendering and captions


def _digest(seed: int) -> str:
    rng = random.Random(seed)
    scene = sample_scene(rng)
    return hashlib.sha256(render(scene).tobytes() + caption(scene, rng).encode()).hexdigest()


def test_deterministic_within_and_across_processes():
    mine = [_digest(s) for s in range(40)]
    assert mine == [_digest(s) for s in range(40)]
    assert len(set(mine)) == 40
    # Another interpreter with another hash seed draws the same scenes, images and captions.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_world import _digest; "
            "print(','.join(_digest(s) for s in range(40)))")
    env = {"PYTHONHASHSEED": "123", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert other.stdout.strip().split(",") == mine


@pytest.mark.parametrize("size", [64, 96, 128])
def test_render_sizes(size):
    for scene in scenes(tuple(SCENE_KINDS), 10, seed=4):
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"


def test_text_is_big_enough_at_64px():
    ems = [text_font_px(t, 64) for s in scenes(TEXT_KINDS, 1500, seed=5) for t in s.texts]
    assert min(ems) >= 10.0  # OCR reads glyphs of em ≥ 10 px (environment.md §1)


def test_missing_font_falls_back_to_builtin(monkeypatch):
    text = Text(text="OPEN", font="dejavu-serif", color="black")
    scene = Scene(background=Background(color="white"), objects=(text,))
    builtin = render(replace(scene, objects=(replace(text, font="aileron"),)))
    for cached in (render_mod.font_path, render_mod.load_font, render_mod.fit_font):
        cached.cache_clear()
    monkeypatch.setitem(render_mod.FONT_FILES, "dejavu-serif", "NoSuchFont.ttf")
    try:
        assert render_mod.font_path("dejavu-serif") is None
        assert render(scene).tobytes() == builtin.tobytes()
    finally:
        for cached in (render_mod.font_path, render_mod.load_font, render_mod.fit_font):
            cached.cache_clear()


def test_captions_quote_the_rendered_text_and_name_the_objects():
    for scene in scenes(tuple(SCENE_KINDS), 600, seed=6):
        options = all_captions(scene)
        assert len(options) >= 3
        for c in options:
            assert quotes(c) == [t.text for t in scene.texts]
            for s in scene.shapes:
                assert s.color in c and s.shape in c
        if scene_kind(scene) == "count":
            assert any(f"{w} " in options[0] for w in ("two", "three", "four"))
    rng1, rng2 = random.Random(9), random.Random(9)
    picked = [caption(s, rng1) for s in scenes(tuple(SCENE_KINDS), 50, seed=7)]
    assert picked == [caption(s, rng2) for s in scenes(tuple(SCENE_KINDS), 50, seed=7)]
    assert len(set(picked)) > 40


def test_qa_answers_follow_the_scene():
    for scene in scenes(tuple(SCENE_KINDS), 300, seed=8):
        for qa in all_qa(scene):
            if qa.question == "what does the sign say?":
                assert qa.answer == scene.texts[0].text
            if qa.question == "how many shapes are there?":
                assert qa.answer == ("zero", "one", "two", "three", "four")[len(scene.shapes)]
            if qa.question.startswith("what color is the ") and qa.question[18:-1] in SHAPES:
                assert qa.answer == next(s.color for s in scene.shapes if s.shape == qa.question[18:-1])
            if qa.question.startswith("where is the"):
                assert qa.answer in CELL_PHRASES.values()
        assert sample_qa(scene, random.Random(0)) in all_qa(scene)


# ---------------------------------------------------------------------------------------------------------------
# Edits


def _only_difference(a, b) -> set[str]:
    return {f for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)}


def check_edit_graph(edit) -> None:
    """The target differs from the source exactly as the instruction says."""
    src, tgt, ins = edit.source, edit.target, edit.instruction
    changed = [(a, b) for a, b in zip(src.objects, tgt.objects) if a != b]
    if edit.kind in ("recolor", "move", "replace_text", "restyle"):
        assert len(src.objects) == len(tgt.objects) and len(changed) == 1 and src.background == tgt.background
        a, b = changed[0]
        field = {"recolor": {"color"}, "move": {"cell", "offset"}, "replace_text": {"text"}, "restyle": {"font"}}
        assert _only_difference(a, b) <= field[edit.kind] and _only_difference(a, b) & field[edit.kind]
        if edit.kind == "recolor":
            assert ins.endswith(b.color) and a.shape in ins
        elif edit.kind == "move":
            assert b.cell != a.cell and (MOVE_PHRASES[b.cell] in ins or CELL_PHRASES[b.cell] in ins)
        elif edit.kind == "replace_text":
            assert f'"{b.text}"' in ins and b.text.upper() != a.text.upper()
        else:
            assert FONT_STYLES[b.font] in ins
    elif edit.kind == "add":
        assert len(tgt.objects) == len(src.objects) + 1 and set(src.objects) < set(tgt.objects)
        (new,) = set(tgt.objects) - set(src.objects)
        assert f"{new.color} {new.shape}" in ins and CELL_PHRASES[new.cell] in ins
    elif edit.kind == "remove":
        assert len(tgt.objects) == len(src.objects) - 1 and set(tgt.objects) < set(src.objects)
        (gone,) = set(src.objects) - set(tgt.objects)
        assert gone.shape in ins
    else:
        assert src.objects == tgt.objects and src.background.color != tgt.background.color
        assert tgt.background.color in ins


def test_edit_pairs_change_exactly_what_the_instruction_says():
    for i in range(140):
        kind = list(EDIT_KINDS)[i % len(EDIT_KINDS)]
        edit = sample_edit(random.Random(100 + i), kind=kind, split=("train", "heldout")[i % 2])
        assert edit.kind == kind
        check_edit_graph(edit)
        src, tgt = render(edit.source), render(edit.target)
        assert judges.edit_success(src, tgt, edit)["success"], edit
        # Unchanged output, or the source's own render: the edit did not happen.
        assert not judges.edit_success(src, src, edit)["success"]


def test_edit_judge_rejects_a_wrong_edit():
    rejected = []
    for i in range(30):
        edit = sample_edit(random.Random(300 + i), kind="recolor")
        (index, (a, b)), = [(j, p) for j, p in enumerate(zip(edit.source.objects, edit.target.objects)) if p[0] != p[1]]
        wrong = next(c for c in PALETTE if c not in (a.color, b.color) and contrasts(c, edit.source.background))
        objects = list(edit.target.objects)
        objects[index] = replace(b, color=wrong)
        wrong_img = render(replace(edit.target, objects=tuple(objects)))
        rejected.append(not judges.edit_success(render(edit.source), wrong_img, edit)["success"])
    assert all(rejected)


# ---------------------------------------------------------------------------------------------------------------
# Judges on clean renders


def test_shape_judge_on_clean_renders():
    results = {64: [], 128: []}
    for size, n in ((64, 320), (128, 80)):
        for scene in scenes(SHAPE_KINDS, n, seed=10 + size):
            results[size].append(judges.judge_composition(render(scene, size), scene))
    for size, res in results.items():
        acc = judges.composition_accuracy(res)
        assert set(acc) == set(judges.CATEGORIES)
        assert min(acc.values()) >= 0.98, (size, acc)


def test_shape_judge_on_blurred_renders():
    res = []
    rng = np.random.default_rng(0)
    for scene in scenes(SHAPE_KINDS, 120, seed=11):
        arr = np.asarray(render(scene, 64)).astype(np.float32)
        arr = judges.cv2.GaussianBlur(arr, (0, 0), 0.6) + rng.normal(0, 6, arr.shape)
        res.append(judges.judge_composition(np.clip(arr, 0, 255).astype(np.uint8), scene))
    acc = judges.composition_accuracy(res)
    assert min(acc.values()) >= 0.95, acc


def test_shape_judge_survives_slivers():
    """A generated image can hold a 1-px-wide sliver; blurred templates vanish at that width (it crashed the judge
    in the middle of an evaluation once)."""
    from glmimage.world.judges import classify_shape, detect_objects, shape_template

    for blur in (0.0, 1.0, 2.0):
        assert shape_template("star", 1, 6, blur).shape == (6, 1)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:16, 30] = True
    assert classify_shape(mask) in SHAPES
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:16, 30] = (215, 30, 35)
    detect_objects(img)


def test_ocr_judge_on_clean_renders_at_64px():
    reads, targets, neds = [], [], []
    for scene in scenes(TEXT_KINDS, 300, seed=12):
        (r,) = judges.judge_text(render(scene, 64), scene)
        reads.append(r["read"]), targets.append(r["target"]), neds.append(r["ned"])
    assert judges.word_accuracy(reads, targets) >= 0.98
    assert np.mean(neds) <= 0.01


def test_judges_fail_on_wrong_images():
    failures = {"blank": [], "recolor": [], "move": [], "reshape": [], "noise": [], "text": [], "no_text": []}
    rng = np.random.default_rng(1)
    for scene in scenes(SHAPE_KINDS, 60, seed=13):
        blank = render(Scene(background=scene.background, objects=scene.texts))
        failures["blank"].append(not judges.judge_composition(blank, scene)["count"])
        noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        failures["noise"].append(not all(judges.judge_composition(noise, scene).values()))
        first = scene.shapes[0]
        index = scene.objects.index(first)
        color = next(c for c in PALETTE if c != first.color and contrasts(c, scene.background))
        shape = next(s for s in SHAPES if s != first.shape)
        cell = free_cells(scene)
        for name, obj in (("recolor", replace(first, color=color)), ("reshape", replace(first, shape=shape)),
                          ("move", replace(first, cell=cell[0], offset=(0.0, 0.0)) if cell else None)):
            if obj is None:
                continue
            wrong = replace(scene, objects=scene.objects[:index] + (obj,) + scene.objects[index + 1:])
            verdict = judges.judge_composition(render(wrong), scene)
            category = {"recolor": "colour", "reshape": "object", "move": "position"}[name]
            failures[name].append(not verdict[category])
    for scene in scenes(TEXT_KINDS, 40, seed=14):
        t = scene.texts[0]
        other = next(w for w in TRAIN_WORDS if w[0] != t.text.upper()[0])
        wrong = replace(scene, objects=tuple(replace(o, text=other) if o is t else o for o in scene.objects))
        failures["text"].append(not judges.judge_text(render(wrong), scene)[0]["exact"])
        blank = render(replace(scene, objects=scene.shapes))
        (r,) = judges.judge_text(blank, scene)
        failures["no_text"].append(not r["exact"] and r["ned"] > 0.5)
    for name, rejected in failures.items():
        assert rejected and np.mean(rejected) >= 0.98, (name, np.mean(rejected))


def test_text_scores():
    assert judges.normalize_text(" Moon! ") == "MOON"
    assert judges.normalize_text("SuUP") == "SUP"  # tesseract's doubled-case artefact
    assert judges.normalized_edit_distance("MOON", "moon") == 0.0
    assert judges.normalized_edit_distance("", "MOON") == 1.0
    assert judges.normalized_edit_distance("MOOD", "MOON") == 0.25
    assert judges.word_accuracy(["open", "stqp"], ["OPEN", "STOP"]) == 0.5
    assert judges.composition_accuracy([{"count": True}, {"count": False, "relation": True}]) == {
        "count": 0.5, "relation": 1.0}
    assert judges.read_text(Image.new("RGB", (64, 64), (255, 255, 255))) == ""


def test_glyph_canvas_is_laid_out_from_the_plan_as_the_scene_draws_it():
    """The world model's glyph canvas: inference reads the text row and font off the semantic ids (right for every
    text scene) and draws the prompt's quoted text there, where the training canvas (the scene graph's) has it."""
    from glmimage.train.data import token_codes
    from glmimage.world.canvas import plan_canvas, plan_layout, scene_canvas

    n = 0
    for i in range(120):
        scene = sample_scene(random.Random(i), split="heldout" if i % 2 else "train")
        if not scene.texts:
            assert plan_layout(token_codes(scene, 4)) is None
            continue
        n += 1
        text, prompt = scene.texts[0], all_captions(scene)[0]
        ids = token_codes(scene, 4)
        assert plan_layout(ids) == (text.row, text.font)
        truth, planned = scene_canvas(scene, prompt, 64)[0], plan_canvas(prompt, ids, 64, 64)[0]
        assert truth.max() > 0.9 and planned.max() > 0.9
        # the same word in the same place, up to the scene's offset of at most 1.3 px
        ink = lambda m: np.argwhere(m > 0.5).mean(0)  # noqa: E731
        assert np.abs(ink(truth) - ink(planned)).max() < 2.0
        assert np.abs((truth > 0.5).sum() - (planned > 0.5).sum()) < 0.2 * (truth > 0.5).sum()
        # no quoted text in the prompt, or a non-square image: no canvas
        assert not scene_canvas(scene, "a sign", 64).any() and not plan_canvas("a sign", ids, 64, 64).any()
        assert not plan_canvas(prompt, ids, 64, 96).any()
        assert not plan_canvas(prompt, np.zeros(24, np.int64), 64, 96).any()  # a 4×6 grid of a 64×96 image
    assert n >= 20
    with pytest.raises(ValueError, match="square grid"):
        plan_layout(np.zeros(15, np.int64))


def test_canvas_writes_the_text_an_edit_asks_for():
    """An instruction that quotes the old and the new text ('replace "OLD" with "NEW"', 'write "NEW" instead of
    "OLD"') gets the new one on its inference canvas, as its training canvas (the target scene's text) has it; the
    canvas once wrote the first quoted string, the old word, for half of the replace-text phrasings."""
    from glmimage.train.data import token_codes
    from glmimage.world.canvas import canvas_text, plan_canvas, scene_canvas, text_mask

    for i in range(200):
        edit = sample_edit(random.Random(i), kind="replace_text", split="heldout" if i % 2 else "train")
        assert canvas_text(edit.instruction) == edit.target.texts[0].text, edit.instruction
    edit = next(e for e in (sample_edit(random.Random(i), kind="replace_text") for i in range(100))
                if e.instruction.startswith("replace"))
    ids = token_codes(edit.target, 4)
    planned, truth = plan_canvas(edit.instruction, ids, 64, 64)[0], scene_canvas(edit.target, edit.instruction, 64)[0]
    old = text_mask([replace(edit.target.texts[0], text=edit.source.texts[0].text)], 64)
    iou = lambda a, b: ((a > 0.5) & (b > 0.5)).sum() / ((a > 0.5) | (b > 0.5)).sum()  # noqa: E731
    assert iou(planned, truth) > 0.6 > iou(planned, old)
    assert canvas_text('change "A" to "B"') == "B" and canvas_text('a sign that says "OPEN"') == "OPEN"
    assert canvas_text('replace "A" with ""') is None and canvas_text("a red circle") is None
    assert canvas_text('replace "A"') == "A"  # nothing else quoted: the only string


def test_an_edit_that_keeps_the_text_gets_its_source_ink_on_the_canvas():
    """An edit that quotes nothing ('use a black background') and keeps the text on its row in its font: the
    inference canvas traces the source image's ink, within 3 % of the mask its training canvas draws (the
    target's text); a plan that restyles the text (another font), a prompt that quotes a word, or no source keeps
    the old rule. Before, such an edit had no text canvas and the DiT repainted letters from the source latents."""
    from glmimage.train.data import token_codes
    from glmimage.world.canvas import plan_canvas, plan_canvases, scene_canvas, text_mask, traced_text

    edits = [e for e in (sample_edit(random.Random(i), kind="background") for i in range(300)) if e.source.texts][:30]
    assert len(edits) >= 20
    for e in edits:
        src, src_ids, ids = np.asarray(render(e.source, 64)), token_codes(e.source, 4), token_codes(e.target, 4)
        truth = scene_canvas(e.target, e.instruction, 64, source=e.source)[0]
        assert np.allclose(truth, text_mask(e.target.texts, 64))  # training draws the target's text
        assert not scene_canvas(e.target, e.instruction, 64)[0].any()  # a scene without its source: as before
        traced = plan_canvas(e.instruction, ids, 64, 64, source=src, source_ids=src_ids)[0]
        assert np.abs(traced - truth).mean() < 0.005 and np.abs(traced - truth)[truth > 0.5].mean() < 0.03
        assert np.array_equal(traced, traced_text(src, src_ids))
        assert not plan_canvas(e.instruction, ids, 64, 64)[0].any()
    e = edits[0]
    src, src_ids = render(e.source, 64), token_codes(e.source, 4)
    font = next(f for f in FONT_STYLES if f != e.source.texts[0].font)
    restyled = replace(e.target, objects=tuple(replace(o, font=font) if isinstance(o, Text) else o
                                               for o in e.target.objects))
    assert not plan_canvas("change the font", token_codes(restyled, 4), 64, 64, source=np.asarray(src),
                           source_ids=src_ids)[0].any()
    assert not scene_canvas(restyled, "change the font", 64, source=e.source)[0].any()
    batch = plan_canvases([e.instruction, 'write "NEW"'], np.stack([token_codes(e.target, 4)] * 2), 64, 64,
                          source=src.resize((32, 32)), source_ids=torch.from_numpy(src_ids))
    assert batch[0, 0].sum() > 20 and not np.allclose(batch[1, 0], batch[0, 0])  # the quoted word wins


def test_shape_canvas_is_decoded_from_the_plan_where_the_scene_draws_it():
    """The canvas's second channel: the shapes the semantic ids name, each in the cell whose centre the ids give,
    for every sampled scene but a rare one where text or another shape holds a centre's token; its silhouettes
    cover the scene's own (the size is mostly not in a 4×4 grid of ids: it is the one that fits them best)."""
    from glmimage.train.data import token_codes
    from glmimage.world.canvas import plan_canvas, plan_canvases, plan_shapes, scene_canvas

    key = lambda shapes: sorted((s.shape, s.color, s.cell) for s in shapes)  # noqa: E731
    n, exact, overlap = 300, 0, []
    prompts, grids = [], []
    for i in range(n):
        scene = sample_scene(random.Random(i), split="heldout" if i % 2 else "train")
        ids, prompt = token_codes(scene, 4), all_captions(scene)[0]
        exact += key(plan_shapes(ids)) == key(scene.shapes)
        truth, planned = scene_canvas(scene, prompt, 64, 2), plan_canvas(prompt, ids, 64, 64, 2)
        assert truth.shape == planned.shape == (2, 64, 64)
        np.testing.assert_array_equal(truth[0], scene_canvas(scene, prompt, 64)[0])  # channel 0: the text
        a, b = truth[1] > 0.5, planned[1] > 0.5
        assert a.any() == bool(scene.shapes) and b.any() == bool(scene.shapes)
        if scene.shapes:
            overlap.append((a & b).sum() / (a | b).sum())
        prompts.append(prompt)
        grids.append(ids)
    assert exact >= 0.99 * n
    assert np.mean(overlap) > 0.7 and np.percentile(overlap, 10) > 0.4
    batch = plan_canvases(prompts[:3], np.stack(grids[:3]), 64, 64, 2)
    assert batch.shape == (3, 2, 64, 64) and torch.equal(batch[1], torch.from_numpy(plan_canvas(prompts[1],
                                                                                                 grids[1], 64, 64, 2)))
    with pytest.raises(ValueError, match="channels"):
        plan_canvas(prompts[0], grids[0], 64, 64, 3)
    with pytest.raises(ValueError, match="prompts"):
        plan_canvases(prompts[:2], np.stack(grids[:3]), 64, 64, 2)
