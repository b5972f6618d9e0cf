"""Question–answer pairs about a scene, read off its graph: colour, shape, count, position, text and relations."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from glmimage.world.captions import CELL_PHRASES, NUMBER_WORDS, RELATION_PHRASES, article, noun, quoted
from glmimage.world.scene import INVERSE, SHAPES, Scene, relation_of, text_relation


@dataclass(frozen=True, kw_only=True)
class QA:
    """A question, its answer, and the category it tests."""

    category: str
    question: str
    answer: str


def _count_questions(scene: Scene) -> list[QA]:
    counts = Counter(s.shape for s in scene.shapes)
    asked = [s for s in SHAPES if counts[s]]
    # One absent shape too, so "zero" is a possible answer; chosen by a fixed rule so the list is deterministic.
    start = SHAPES.index(asked[0]) if asked else 0
    absent = next((SHAPES[(start + k) % len(SHAPES)] for k in range(len(SHAPES))
                   if not counts[SHAPES[(start + k) % len(SHAPES)]]), None)
    out = [QA(category="count", question=f"how many {s}s are there?", answer=NUMBER_WORDS[counts[s]])
           for s in asked + ([absent] if absent else [])]
    out.append(QA(category="count", question="how many shapes are there?", answer=NUMBER_WORDS[len(scene.shapes)]))
    return out


def all_qa(scene: Scene) -> list[QA]:
    """Every question the scene answers unambiguously, in a fixed order."""
    out = [QA(category="background", question="what color is the background?", answer=scene.background.color)]
    shapes = scene.shapes
    by_shape = Counter(s.shape for s in shapes)
    by_color = Counter(s.color for s in shapes)
    by_both = Counter((s.shape, s.color) for s in shapes)
    for s in shapes:
        if by_shape[s.shape] == 1:
            out.append(QA(category="color", question=f"what color is the {s.shape}?", answer=s.color))
        if by_color[s.color] == 1:
            out.append(QA(category="shape", question=f"what shape is the {s.color} object?", answer=s.shape))
        if by_both[(s.shape, s.color)] == 1:
            out.append(QA(category="position", question=f"where is the {noun(s)}?", answer=CELL_PHRASES[s.cell]))
    out += _count_questions(scene)
    for t in scene.texts:
        out.append(QA(category="text", question="what does the sign say?", answer=t.text))
        out.append(QA(category="text", question="what word is written in the image?", answer=t.text))
        out.append(QA(category="color", question="what color is the text?", answer=t.color))
    if len(shapes) == 2 and (rel := relation_of(*shapes)) and by_both[(shapes[0].shape, shapes[0].color)] == 1:
        a, b = shapes
        phrase, wrong = RELATION_PHRASES[rel][0], RELATION_PHRASES[INVERSE[rel]][0]
        out.append(QA(category="relation", question=f"is the {noun(a)} {phrase} the {noun(b)}?", answer="yes"))
        out.append(QA(category="relation", question=f"is the {noun(a)} {wrong} the {noun(b)}?", answer="no"))
        out.append(QA(category="relation", question=f"what is {phrase} the {noun(b)}?", answer=article(noun(a))))
    if len(shapes) == 1 and len(scene.texts) == 1:
        rel = text_relation(shapes[0], scene.texts[0])
        out.append(QA(category="relation", question=f"what is {rel} the word {quoted(scene.texts[0])}?",
                      answer=article(noun(shapes[0]))))
    return out


def sample_qa(scene: Scene, rng: random.Random) -> QA:
    """One question: a category uniformly among those the scene supports, then a question within it."""
    qas = all_qa(scene)
    category = rng.choice(sorted({q.category for q in qas}))
    return rng.choice([q for q in qas if q.category == category])
