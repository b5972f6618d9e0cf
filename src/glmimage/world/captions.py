"""Captions of world scenes: several phrasings per scene kind; quoted text is exactly the rendered string."""

from __future__ import annotations

import random
from collections.abc import Callable

from glmimage.world.scene import (
    FONT_STYLES,
    INVERSE,
    Background,
    Scene,
    Shape,
    Text,
    relation_of,
    scene_kind,
    text_relation,
)

NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
CELL_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}


def article(phrase: str) -> str:
    """'a' or 'an' + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def quoted(text: Text) -> str:
    """The text in double quotes, exactly as rendered."""
    return f'"{text.text}"'


def noun(shape: Shape, *, sized: bool = False) -> str:
    """'red circle', or 'small red circle' when sized and the size is not medium."""
    size = f"{shape.size} " if sized and shape.size != "medium" else ""
    return f"{size}{shape.color} {shape.shape}"


def on_background(bg: Background, *, gradient: bool = False) -> str:
    """'on a white background' (or 'on a white gradient background')."""
    return f"on {article(bg.color)} {'gradient ' if gradient and bg.gradient else ''}background"


def _backgrounds(bg: Background) -> list[str]:
    return [on_background(bg)] + ([on_background(bg, gradient=True)] if bg.gradient else [])


def _empty(scene: Scene) -> list[str]:
    color = scene.background.color
    return [f"a plain {color} background", f"an empty {color} background", f"nothing {on_background(scene.background)}"]


def _single(scene: Scene) -> list[str]:
    (s,) = scene.shapes
    a, sized, where = article(noun(s)), article(noun(s, sized=True)), CELL_PHRASES[s.cell]
    out = [a, sized, f"{a} {where}", f"{sized} {where}", f"a picture of {a}", f"one {noun(s)}"]
    out += [f"{a} {bg}" for bg in _backgrounds(scene.background)]
    out += [f"{sized} {where} {bg}" for bg in _backgrounds(scene.background)]
    return out


def _count(scene: Scene) -> list[str]:
    s, n = scene.shapes[0], NUMBER_WORDS[len(scene.shapes)]
    plural, sized = noun(s) + "s", noun(s, sized=True) + "s"
    out = [f"{n} {plural}", f"{n} {sized}", f"a group of {n} {plural}", f"there are {n} {plural}"]
    out += [f"{n} {plural} {bg}" for bg in _backgrounds(scene.background)]
    return out


def _relation(scene: Scene) -> list[str]:
    a, b = scene.shapes
    rel = relation_of(a, b)
    assert rel is not None
    na, nb = article(noun(a)), article(noun(b))
    out = [f"{na} {phrase} {nb}" for phrase in RELATION_PHRASES[rel]]
    out += [f"{nb} {phrase} {na}" for phrase in RELATION_PHRASES[INVERSE[rel]]]
    out += [f"{article(noun(a, sized=True))} {RELATION_PHRASES[rel][0]} {article(noun(b, sized=True))}"]
    out += [f"{na} {RELATION_PHRASES[rel][0]} {nb} {bg}" for bg in _backgrounds(scene.background)]
    if a.shape != b.shape:
        out.append(f"{na} and {nb}, the {a.shape} {RELATION_PHRASES[rel][0]} the {b.shape}")
    return out


def _text(scene: Scene) -> list[str]:
    (t,) = scene.texts
    q, bg = quoted(t), on_background(scene.background)
    return [f"a sign that says {q}", f"the word {q}", f"the text {q} {bg}", f"{q} written in {t.color}",
            f"a sign that says {q} in {t.color} letters {bg}", f"the word {q} in {FONT_STYLES[t.font]} letters",
            f"{q} in {t.color} {FONT_STYLES[t.font]} letters"]


def _object_text(scene: Scene) -> list[str]:
    (s,), (t,) = scene.shapes, scene.texts
    rel = text_relation(s, t)
    a, q = article(noun(s)), quoted(t)
    out = [f"{a} {rel} the word {q}", f"the word {q} {INVERSE[rel]} {a}", f"{a} {rel} the text {q}"]
    out += [f"{a} {rel} the word {q} {bg}" for bg in _backgrounds(scene.background)]
    out += [f"a sign that says {q} with {a} {rel} it", f"{article(noun(s, sized=True))} {rel} the word {q} in "
            f"{t.color} letters"]
    return out


def _group(scene: Scene) -> list[str]:
    parts = [f"{article(noun(s))} {CELL_PHRASES[s.cell]}" for s in scene.shapes]
    parts += [f"the word {quoted(t)}" for t in scene.texts]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return [listed, f"{listed} {on_background(scene.background)}"]


CAPTIONERS: dict[str, Callable[[Scene], list[str]]] = {
    "empty": _empty,
    "single": _single,
    "count": _count,
    "relation": _relation,
    "text": _text,
    "object_text": _object_text,
    "group": _group,
}


def all_captions(scene: Scene) -> list[str]:
    """Every phrasing of a scene's caption, in a fixed order, without duplicates."""
    return list(dict.fromkeys(CAPTIONERS[scene_kind(scene)](scene)))


def caption(scene: Scene, rng: random.Random) -> str:
    """One phrasing, chosen with rng."""
    return rng.choice(all_captions(scene))
