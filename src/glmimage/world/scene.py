"""Scene graphs of the synthetic world and a deterministic sampler with train / held-out splits.

A scene is a background plus up to four objects: shapes on a 3×3 layout, and at most one line of text. Everything
else (the scene kind, the spatial relation, what a caption says) is derived from the graph, so an edit only has to
change the graph. All randomness comes from the `random.Random` passed in, so a seed fixes the scene.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from glmimage.world.colors import MIN_CONTRAST, MIN_TEXT_LIGHTNESS, PALETTE, color_rgb, lab_distance, mix, rgb_to_lab

SHAPES = ("circle", "square", "triangle", "star", "diamond", "heart")
# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.11, "large": 0.13}
# Centres of the 3×3 layout (x of columns, y of rows), fractions of the image side. Not thirds: the outer centres sit
# inward so that a large shape keeps a margin from the image border.
CELL_CENTERS = (0.18, 0.5, 0.82)
CELLS = tuple((r, c) for r in range(3) for c in range(3))
MAX_JITTER = 0.015  # per-axis random offset of a shape centre
MIN_GAP = 0.03  # minimum box separation between two shapes; same-coloured shapes must not merge in the judge
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Text rows: 1 is a sign alone in the middle; 0 / 2 is a line of text above / below a row of shapes.
TEXT_ROWS = (0, 1, 2)
# Font names and the style word captions and edits use for them; render.FONT_FILES maps them to files.
FONT_STYLES: dict[str, str] = {
    "aileron": "thin",
    "dejavu-sans": "sans-serif",
    "dejavu-sans-bold": "bold",
    "dejavu-serif": "serif",
    "dejavu-mono": "typewriter",
}
SPLITS = ("train", "heldout")

# 3–6 letter words for signs. No colour, shape, number or position words, so captions stay unambiguous.
TRAIN_WORDS = tuple(
    """OPEN STOP EXIT SALE CAFE HOTEL BOOK MOON SUN FISH BIRD TREE HOME SHOP BANK PARK FOOD MILK BREAD CAKE TEA
    COFFEE RAIN WIND FIRE WATER EARTH LIGHT NIGHT DAY LOVE HOPE PEACE HAPPY SMILE HELLO WORLD YES PLAY GAME MUSIC
    DANCE SING READ WRITE DRAW PAINT CITY TOWN ROAD TRAIN BUS CAR BIKE SHIP BOAT PLANE CLOCK TIME DOOR ROOM BED
    CHAIR TABLE LAMP PHONE MAIL NEWS INFO HELP SAFE FREE FAST SLOW HOT COLD NEW OLD BIG TINY GOOD BEST KING QUEEN
    CROWN APPLE PEAR GRAPE MANGO BERRY PIZZA SOUP RICE CORN SALT SUGAR BEACH OCEAN LAKE HILL FARM BARN HORSE SHEEP
    GOAT CAT DOG BEAR LION DUCK MOUSE CROW OWL BEE ANT SPRING SUMMER AUTUMN WINTER EAST WEST NORTH SOUTH BAKERY
    MARKET GARDEN SCHOOL CLASS LEARN SMART IDEA DREAM SLEEP WAKE JUMP SWIM WALK CALM WILD KIND NICE COOL WARM SOFT
    LOUD TICKET TAXI METRO GUITAR DRUM ROCK FOLK RADIO VIDEO PHOTO FILM ART PARTY CARD WIN LUCK CANDY COOKIE PASTA
    BURGER SNACK LUNCH DINNER MENU PRICE DEAL CASH COIN TOKEN ZERO EXPO ZONE AREA GATE PORT DOCK BRIDGE TOWER
    CASTLE""".split()
)

# Held-out items: never sampled with split="train" (nor produced by a train edit), only with split="heldout".
HELDOUT_WORDS = tuple(
    "ZEBRA CLOUD PIANO TIGER LEMON MAGIC RIVER SNOW JAZZ WOLF QUIET BRAVE HONEY FROG GIFT PLUM".split()
)
HELDOUT_PAIRS = frozenset(  # (shape, colour), one per shape
    {("circle", "purple"), ("square", "orange"), ("triangle", "cyan"), ("star", "red"), ("diamond", "green"),
     ("heart", "blue")}
)
HELDOUT_RELATIONS = frozenset(  # canonical (relation, shape, shape): "a circle left of a star", however phrased
    {("left of", "circle", "star"), ("left of", "heart", "triangle"), ("above", "square", "heart"),
     ("above", "diamond", "circle"), ("above", "star", "triangle")}
)


@dataclass(frozen=True, kw_only=True)
class Background:
    """A named colour, flat or fading vertically toward white (gradient > 0) or black (< 0) at the bottom."""

    color: str
    gradient: float = 0.0

    def __post_init__(self) -> None:
        color_rgb(self.color)
        if not -0.5 <= self.gradient <= 0.5:
            raise ValueError(f"gradient must be in [-0.5, 0.5], got {self.gradient}")

    @property
    def top_rgb(self) -> tuple[int, int, int]:
        """Colour of the top row."""
        return color_rgb(self.color)

    @property
    def bottom_rgb(self) -> tuple[int, int, int]:
        """Colour of the bottom row."""
        end = (255, 255, 255) if self.gradient > 0 else (0, 0, 0)
        return mix(self.top_rgb, end, abs(self.gradient))


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A filled shape centred in a cell (row, col) of the 3×3 layout, moved by a small offset (dx, dy)."""

    shape: str
    color: str
    size: str = "medium"
    cell: tuple[int, int] = (1, 1)
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid: {list(SHAPES)}")
        color_rgb(self.color)
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {list(SIZES)}")
        if tuple(self.cell) not in CELLS:
            raise ValueError(f"cell must be (row, col) with row, col in 0..2, got {self.cell}")

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) as fractions of the image side."""
        row, col = self.cell
        return (CELL_CENTERS[col] + self.offset[0], CELL_CENTERS[row] + self.offset[1])

    @property
    def radius(self) -> float:
        """Half-extent as a fraction of the image side."""
        return SIZES[self.size]


@dataclass(frozen=True, kw_only=True)
class Text:
    """One line of text, centred on a text row; the renderer picks the largest font size that fits."""

    text: str
    font: str
    color: str
    row: int = 1
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not self.text or '"' in self.text:
            raise ValueError(f"text must be non-empty and hold no double quote, got {self.text!r}")
        if self.font not in FONT_STYLES:
            raise ValueError(f"unknown font {self.font!r}; valid: {list(FONT_STYLES)}")
        color_rgb(self.color)
        if self.row not in TEXT_ROWS:
            raise ValueError(f"unknown text row {self.row}; valid: {list(TEXT_ROWS)}")


@dataclass(frozen=True, kw_only=True)
class Scene:
    """Background plus objects; shapes come first in sampled scenes and the first shape is a caption's subject."""

    background: Background
    objects: tuple[Shape | Text, ...] = ()

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The shape objects, in order."""
        return tuple(o for o in self.objects if isinstance(o, Shape))

    @property
    def texts(self) -> tuple[Text, ...]:
        """The text objects, in order."""
        return tuple(o for o in self.objects if isinstance(o, Text))


# ---------------------------------------------------------------------------------------------------------------
# Derived facts


def relation_of(a: Shape, b: Shape) -> str | None:
    """Where a is relative to b when they share a row or a column ('left of', 'above', ...), else None."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    if ra == rb and ca != cb:
        return "left of" if ca < cb else "right of"
    if ca == cb and ra != rb:
        return "above" if ra < rb else "below"
    return None


def text_relation(shape: Shape, text: Text) -> str:
    """'above' or 'below': where a shape is relative to a line of text."""
    return "above" if shape.cell[0] < text.row else "below"


def relation_key(relation: str, a: str, b: str) -> tuple[str, str, str]:
    """Canonical (relation, shape, shape) using only 'left of' / 'above', so both phrasings map to one key."""
    if relation in ("right of", "below"):
        return (INVERSE[relation], b, a)
    return (relation, a, b)


def scene_kind(scene: Scene) -> str:
    """One of 'empty', 'single', 'count', 'relation', 'text', 'object_text', 'group'."""
    shapes, texts = scene.shapes, scene.texts
    if not texts:
        if not shapes:
            return "empty"
        if len(shapes) == 1:
            return "single"
        if len({(s.shape, s.color, s.size) for s in shapes}) == 1:
            return "count"
        if len(shapes) == 2 and relation_of(*shapes) is not None:
            return "relation"
    elif len(texts) == 1:
        if not shapes:
            return "text"
        if len(shapes) == 1 and shapes[0].cell[0] != texts[0].row:
            return "object_text"
    return "group"


def heldout_items(scene: Scene) -> set[str]:
    """The held-out words, (colour, shape) pairs and relation configurations present in a scene."""
    items = {f"word:{t.text.upper()}" for t in scene.texts if t.text.upper() in HELDOUT_WORDS}
    items |= {f"pair:{s.color} {s.shape}" for s in scene.shapes if (s.shape, s.color) in HELDOUT_PAIRS}
    shapes = scene.shapes
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            rel = relation_of(a, b)
            key = relation_key(rel, a.shape, b.shape) if rel else None
            if key in HELDOUT_RELATIONS:
                items.add(f"relation:{key[1]} {key[0]} {key[2]}")
    return items


def contrasts(color: str, background: Background) -> bool:
    """True if a shape of this colour stands out from both ends of the background (ΔE ≥ MIN_CONTRAST)."""
    rgb = color_rgb(color)
    return min(lab_distance(rgb, background.top_rgb), lab_distance(rgb, background.bottom_rgb)) >= MIN_CONTRAST


def text_contrasts(color: str, background: Background) -> bool:
    """True if text of this colour differs in lightness from both ends of the background (OCR needs it)."""
    light = rgb_to_lab(color_rgb(color))[0]
    ends = (rgb_to_lab(background.top_rgb)[0], rgb_to_lab(background.bottom_rgb)[0])
    return min(abs(light - e) for e in ends) >= MIN_TEXT_LIGHTNESS and contrasts(color, background)


def blocked_rows(scene: Scene) -> set[int]:
    """Rows of the 3×3 layout that text occupies: a sign (row 1) takes all, a text line its row and the middle."""
    rows: set[int] = set()
    for t in scene.texts:
        rows |= {0, 1, 2} if t.row == 1 else {t.row, 1}
    return rows


def free_cells(scene: Scene) -> list[tuple[int, int]]:
    """Cells where a new shape can go: not taken by a shape and not overlapped by text."""
    taken = {s.cell for s in scene.shapes}
    blocked = blocked_rows(scene)
    return [c for c in CELLS if c not in taken and c[0] not in blocked]


def box_gap(a: Shape, b: Shape) -> float:
    """Separation of the two shapes' boxes (negative when they overlap), fraction of the image side."""
    (ax, ay), (bx, by) = a.center, b.center
    return max(abs(ax - bx), abs(ay - by)) - (a.radius + b.radius)


def place(rng: random.Random, shape: Shape, others: Sequence[Shape]) -> Shape:
    """The shape with a random offset that keeps MIN_GAP to the others (zero offset always does)."""
    for _ in range(8):
        offset = (round(rng.uniform(-MAX_JITTER, MAX_JITTER), 4), round(rng.uniform(-MAX_JITTER, MAX_JITTER), 4))
        moved = replace(shape, offset=offset)
        if all(box_gap(moved, o) >= MIN_GAP for o in others):
            return moved
    return replace(shape, offset=(0.0, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")


def sample_background(rng: random.Random, ok: Callable[[Background], bool] = lambda bg: True) -> Background:
    """A background (white about a third of the time, a gradient a third of the time) that satisfies ok."""
    names = [n for n in PALETTE if ok(Background(color=n))]
    if not names:
        raise ValueError("no background colour satisfies the constraint")
    color = "white" if "white" in names and rng.random() < 0.35 else rng.choice(names)
    if rng.random() < 0.33:
        lightness = rgb_to_lab(color_rgb(color))[0]
        amount = round(rng.uniform(0.15, 0.35), 3)
        graded = Background(color=color, gradient=-amount if lightness > 60 else amount)
        if ok(graded):
            return graded
    return Background(color=color)


def sample_word(rng: random.Random, split: str = "train") -> str:
    """A word (upper, Title or lower case) or, in train, sometimes a random upper-case letter string."""
    _check_split(split)
    if split == "heldout":
        word = rng.choice(HELDOUT_WORDS)
    elif rng.random() < 0.25:
        word = ""
        while not word or word in HELDOUT_WORDS:
            word = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 5)))
        return word
    else:
        word = rng.choice(TRAIN_WORDS)
    case = rng.random()
    return word if case < 0.6 else word.title() if case < 0.8 else word.lower()


def _shape_color(rng: random.Random, bg: Background, split: str, shape: str | None = None) -> tuple[str, str]:
    """A (shape, colour) pair that contrasts with bg and is allowed in the split."""
    shape = shape or rng.choice(SHAPES)
    colors = [c for c in PALETTE if contrasts(c, bg) and (split == "heldout" or (shape, c) not in HELDOUT_PAIRS)]
    return shape, rng.choice(colors)


def _heldout_pair_scene(rng: random.Random) -> tuple[Background, str, str]:
    """A held-out (shape, colour) pair and a background it contrasts with."""
    shape, color = rng.choice(sorted(HELDOUT_PAIRS))
    return sample_background(rng, lambda bg: contrasts(color, bg)), shape, color


def _sample_single(rng: random.Random, split: str) -> Scene:
    if split == "heldout":
        bg, shape, color = _heldout_pair_scene(rng)
    else:
        bg = sample_background(rng)
        shape, color = _shape_color(rng, bg, split)
    obj = Shape(shape=shape, color=color, size=rng.choice(list(SIZES)), cell=rng.choice(CELLS))
    return Scene(background=bg, objects=(place(rng, obj, ()),))


def _sample_count(rng: random.Random, split: str) -> Scene:
    if split == "heldout":
        bg, shape, color = _heldout_pair_scene(rng)
    else:
        bg = sample_background(rng)
        shape, color = _shape_color(rng, bg, split)
    size = rng.choice(list(SIZES))
    objects: list[Shape] = []
    for cell in sorted(rng.sample(CELLS, rng.randint(2, 4))):
        objects.append(place(rng, Shape(shape=shape, color=color, size=size, cell=cell), objects))
    return Scene(background=bg, objects=tuple(objects))


def _relation_cells(rng: random.Random, relation: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells of subject and object for a relation: same row for left/right, same column for above/below."""
    line, (first, second) = rng.randrange(3), sorted(rng.sample(range(3), 2))
    if relation in ("left of", "right of"):
        a, b = (line, first), (line, second)
    else:
        a, b = (first, line), (second, line)
    return (a, b) if relation in ("left of", "above") else (b, a)


def _sample_relation(rng: random.Random, split: str) -> Scene:
    bg = sample_background(rng)
    while True:
        if split == "heldout":  # a held-out configuration, phrased either way round
            rel, first, second = rng.choice(sorted(HELDOUT_RELATIONS))
            relation, shapes = (rel, (first, second)) if rng.random() < 0.5 else (INVERSE[rel], (second, first))
        else:
            relation, shapes = rng.choice(RELATIONS), (rng.choice(SHAPES), rng.choice(SHAPES))
            if relation_key(relation, *shapes) in HELDOUT_RELATIONS:
                continue
        (sa, ca), (sb, cb) = (_shape_color(rng, bg, split, shapes[0]), _shape_color(rng, bg, split, shapes[1]))
        if (sa, ca) != (sb, cb):
            break
    cell_a, cell_b = _relation_cells(rng, relation)
    a = place(rng, Shape(shape=sa, color=ca, size=rng.choice(list(SIZES)), cell=cell_a), ())
    b = place(rng, Shape(shape=sb, color=cb, size=rng.choice(list(SIZES)), cell=cell_b), (a,))
    return Scene(background=bg, objects=(a, b))


def _sample_text_object(rng: random.Random, bg: Background, split: str, row: int) -> Text:
    colors = [c for c in PALETTE if text_contrasts(c, bg)]
    offset = (round(rng.uniform(-0.02, 0.02), 4), round(rng.uniform(-0.02, 0.02), 4))
    return Text(text=sample_word(rng, split), font=rng.choice(list(FONT_STYLES)), color=rng.choice(colors), row=row,
                offset=offset)


def _text_background(rng: random.Random) -> Background:
    return sample_background(rng, lambda bg: any(text_contrasts(c, bg) for c in PALETTE))


def _sample_text(rng: random.Random, split: str) -> Scene:
    bg = _text_background(rng)
    return Scene(background=bg, objects=(_sample_text_object(rng, bg, split, row=1),))


def _sample_object_text(rng: random.Random, split: str) -> Scene:
    bg = _text_background(rng)
    text = _sample_text_object(rng, bg, split, row=rng.choice((0, 2)))
    shape, color = _shape_color(rng, bg, "train")  # the held-out part of this kind is the word
    obj = Shape(shape=shape, color=color, size=rng.choice(list(SIZES)), cell=(2 - text.row, rng.randrange(3)))
    return Scene(background=bg, objects=(place(rng, obj, ()), text))


SCENE_KINDS: dict[str, Callable[[random.Random, str], Scene]] = {
    "single": _sample_single,
    "count": _sample_count,
    "relation": _sample_relation,
    "text": _sample_text,
    "object_text": _sample_object_text,
}
KIND_WEIGHTS: dict[str, float] = {"single": 0.2, "count": 0.2, "relation": 0.2, "text": 0.2, "object_text": 0.2}


def sample_scene(rng: random.Random, *, kind: str | None = None, split: str = "train") -> Scene:
    """A random scene of the given kind (None: any kind) from the train or held-out split."""
    _check_split(split)
    if kind is None:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; valid: {list(SCENE_KINDS)}")
    return SCENE_KINDS[kind](rng, split)
