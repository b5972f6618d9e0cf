"""Edit pairs (source scene, instruction, target scene) for image-to-image training and judging.

Each edit kind is a function that changes one thing in a scene graph and phrases the instruction; everything else in
the scene (other objects, their offsets, the background) is kept exactly, so the target differs from the source only
as the instruction says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from glmimage.world.captions import CELL_PHRASES, article, noun
from glmimage.world.scene import (
    FONT_STYLES,
    PALETTE,
    SHAPES,
    SIZES,
    SPLITS,
    Background,
    Scene,
    Shape,
    Text,
    contrasts,
    free_cells,
    heldout_items,
    place,
    sample_scene,
    sample_word,
    text_contrasts,
)

MAX_SHAPES = 4
# (edit kind, shape acted on): never in train edits, only in held-out ones.
HELDOUT_EDITS = frozenset({("recolor", "heart"), ("move", "triangle"), ("remove", "star"), ("add", "diamond")})
MOVE_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "to the top left corner", (0, 1): "to the top", (0, 2): "to the top right corner",
    (1, 0): "to the left", (1, 1): "to the center", (1, 2): "to the right",
    (2, 0): "to the bottom left corner", (2, 1): "to the bottom", (2, 2): "to the bottom right corner",
}


@dataclass(frozen=True, kw_only=True)
class Edit:
    """An instruction and the scenes before and after it."""

    kind: str
    instruction: str
    source: Scene
    target: Scene


def references(scene: Scene, index: int) -> list[str]:
    """Unambiguous ways to name the shape scene.objects[index]: 'the circle', 'the red circle', '... in the center'."""
    s = scene.objects[index]
    assert isinstance(s, Shape)
    shapes = scene.shapes
    out = [f"the {noun(s)} {CELL_PHRASES[s.cell]}"]  # cells are unique, so this one always works
    if sum((o.shape, o.color) == (s.shape, s.color) for o in shapes) == 1:
        out.append(f"the {noun(s)}")
    if sum(o.shape == s.shape for o in shapes) == 1:
        out.append(f"the {s.shape}")
    return out


def _shape_indices(scene: Scene) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if isinstance(o, Shape)]


def _text_index(scene: Scene) -> int | None:
    return next((i for i, o in enumerate(scene.objects) if isinstance(o, Text)), None)


def _set(scene: Scene, index: int, obj: Shape | Text) -> Scene:
    return replace(scene, objects=scene.objects[:index] + (obj,) + scene.objects[index + 1:])


def _recolor(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    indices = _shape_indices(scene)
    if not indices:
        return None
    i = rng.choice(indices)
    old = scene.objects[i]
    colors = [c for c in PALETTE if c != old.color and contrasts(c, scene.background)]
    new = rng.choice(colors)
    ref = rng.choice(references(scene, i))
    phrasing = rng.choice([f"make {ref} {new}", f"change the color of {ref} to {new}", f"paint {ref} {new}",
                           f"turn {ref} {new}", f"recolor {ref} to {new}"])
    return phrasing, _set(scene, i, replace(old, color=new))


def _move(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    indices, cells = _shape_indices(scene), free_cells(scene)
    if not indices or not cells:
        return None
    i, cell = rng.choice(indices), rng.choice(cells)
    old = scene.objects[i]
    others = [s for j, s in enumerate(scene.objects) if j != i and isinstance(s, Shape)]
    refs = references(scene, i)
    ref = rng.choice(refs)
    phrasings = [f"move {ref} {MOVE_PHRASES[cell]}", f"shift {ref} {MOVE_PHRASES[cell]}"]
    if ref != refs[0]:  # "put the star in the top left corner" reads badly after "the star in the center"
        phrasings += [f"put {ref} {CELL_PHRASES[cell]}", f"place {ref} {CELL_PHRASES[cell]} instead"]
    phrasing = rng.choice(phrasings)
    return phrasing, _set(scene, i, place(rng, replace(old, cell=cell, offset=(0.0, 0.0)), others))


def _add(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    cells = free_cells(scene)
    if not cells or len(scene.shapes) >= MAX_SHAPES:
        return None
    colors = [c for c in PALETTE if contrasts(c, scene.background)]
    new = Shape(shape=rng.choice(SHAPES), color=rng.choice(colors), size=rng.choice(list(SIZES)),
                cell=rng.choice(cells))
    new = place(rng, new, scene.shapes)
    a, where = article(noun(new, sized=True)), CELL_PHRASES[new.cell]
    phrasing = rng.choice([f"add {a} {where}", f"put {a} {where}", f"draw {a} {where}", f"also show {a} {where}"])
    n = len(scene.shapes)  # new shapes go after the existing shapes, before any text
    return phrasing, replace(scene, objects=scene.objects[:n] + (new,) + scene.objects[n:])


def _remove(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    indices = _shape_indices(scene)
    if not indices:
        return None
    i = rng.choice(indices)
    ref = rng.choice(references(scene, i))
    phrasing = rng.choice([f"remove {ref}", f"delete {ref}", f"take away {ref}", f"erase {ref}"])
    return phrasing, replace(scene, objects=scene.objects[:i] + scene.objects[i + 1:])


def _replace_text(rng: random.Random, scene: Scene, split: str) -> tuple[str, Scene] | None:
    i = _text_index(scene)
    if i is None:
        return None
    old = scene.objects[i]
    word = old.text
    while word.upper() == old.text.upper():
        word = sample_word(rng, split if rng.random() < 0.5 else "train")
    o, n = f'"{old.text}"', f'"{word}"'
    phrasing = rng.choice([f"change the text to {n}", f"replace {o} with {n}", f"make the sign say {n}",
                           f"write {n} instead of {o}"])
    return phrasing, _set(scene, i, replace(old, text=word))


def _background(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    def ok(color: str) -> bool:
        bg = Background(color=color, gradient=scene.background.gradient)
        return all(contrasts(s.color, bg) for s in scene.shapes) and all(text_contrasts(t.color, bg)
                                                                          for t in scene.texts)
    colors = [c for c in PALETTE if c != scene.background.color and ok(c)]
    if not colors:
        return None
    new = rng.choice(colors)
    phrasing = rng.choice([f"make the background {new}", f"change the background to {new}",
                           f"put it on {article(new)} background", f"use {article(new)} background"])
    return phrasing, replace(scene, background=Background(color=new, gradient=scene.background.gradient))


def _restyle(rng: random.Random, scene: Scene) -> tuple[str, Scene] | None:
    i = _text_index(scene)
    if i is None:
        return None
    old = scene.objects[i]
    font = rng.choice([f for f in FONT_STYLES if f != old.font])
    style, q = FONT_STYLES[font], f'"{old.text}"'
    phrasing = rng.choice([f"write {q} in {style} letters", f"change the font to {style}",
                           f"use a {style} font for the text"])
    return phrasing, _set(scene, i, replace(old, font=font))


# Edit kind → (function, scene kinds a source is drawn from).
EDIT_KINDS: dict[str, tuple[Callable[..., tuple[str, Scene] | None], tuple[str, ...]]] = {
    "recolor": (_recolor, ("single", "count", "relation", "object_text")),
    "move": (_move, ("single", "count", "relation", "object_text")),
    "add": (_add, ("single", "count", "relation", "object_text")),
    "remove": (_remove, ("single", "count", "relation", "object_text")),
    "replace_text": (_replace_text, ("text", "object_text")),
    "background": (_background, ("single", "count", "relation", "text", "object_text")),
    "restyle": (_restyle, ("text", "object_text")),
}


def edited_shapes(edit: Edit) -> set[Shape]:
    """The shapes that the edit removes, adds or changes (in either scene)."""
    return set(edit.source.shapes) ^ set(edit.target.shapes)


def edit_heldout_items(edit: Edit) -> set[str]:
    """Held-out items in either scene, plus the held-out (edit kind, shape) type if this is one."""
    items = heldout_items(edit.source) | heldout_items(edit.target)
    items |= {f"edit:{edit.kind} {s.shape}" for s in edited_shapes(edit) if (edit.kind, s.shape) in HELDOUT_EDITS}
    return items


def sample_edit(rng: random.Random, *, kind: str | None = None, split: str = "train") -> Edit:
    """A random edit of the given kind (None: any) whose scenes and type belong to the split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    if kind is None:
        kind = rng.choice(list(EDIT_KINDS))
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; valid: {list(EDIT_KINDS)}")
    fn, source_kinds = EDIT_KINDS[kind]
    for _ in range(500):
        # A held-out edit may come from a held-out scene or from a train scene given a held-out edit type / word.
        source_split = rng.choice(SPLITS) if split == "heldout" else "train"
        source = sample_scene(rng, kind=rng.choice(source_kinds), split=source_split)
        result = fn(rng, source, split) if kind == "replace_text" else fn(rng, source)
        if result is None:
            continue
        edit = Edit(kind=kind, instruction=result[0], source=source, target=result[1])
        if bool(edit_heldout_items(edit)) == (split == "heldout"):
            return edit
    raise RuntimeError(f"could not sample a {split} edit of kind {kind!r}")  # unreachable with the current tables
