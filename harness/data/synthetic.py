"""The embedded synthetic visual-QA benchmark ("shapes").

Every image is 96x96 px: a 3x3 grid of 32 px cells on a noisy grey background, 2-4 coloured
shapes and one white letter, each in its own cell. Questions each depend on a small image region
(the generator knows which 8x8 patches hold the objects a question is about: the `oracle` method
uses that), so pruning the wrong visual tokens costs accuracy.

Splits are fixed by name: sample i of split s is drawn from ``random.Random(f"{s}-{i}")``, so
the same (split, index) always gives the same image, question and answer on any machine.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
PATCH = 8
GRID = 3
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH
NUM_PATCHES = PATCHES_PER_SIDE**2  # 144 visual tokens

COLORS = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 15, "large": 25}
LETTERS = ("a", "e", "h", "k", "m", "r", "t", "x")
# Cell names in reading order (row-major); "top" alone is the top-centre cell.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("attribute", "count", "exist", "position", "text", "describe")
# the four forms of an attribute question, in the order ask() draws them
ATTRIBUTE_FORMS = ("color-at", "shape-of-color-at", "size", "shape-at")
SPLITS = ("train", "val", "test")

# Per-patch label vocabularies (training-only auxiliary targets; index 0 = background).
PATCH_COLOR_CLASSES = ("none", *COLORS, "white")
PATCH_SHAPE_CLASSES = ("none", *SHAPES, "letter")
PATCH_LETTER_CLASSES = ("none", *LETTERS)
MIN_PATCH_OVERLAP = 10  # pixels of an 8x8 patch an object must cover to label the patch


@dataclass
class SceneObject:
    kind: str  # "shape" or "letter"
    cell: int  # 0..8, row-major
    color: str  # colour name; "white" for letters
    shape: str  # shape name; "letter" for letters
    size: str = ""  # "small"/"large" for shapes
    letter: str = ""
    patch_pixels: np.ndarray = field(default=None, repr=False)  # (144,) pixels covered per patch (canvas's patches)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        if self.kind == "letter":
            return f"letter {self.letter} at {self.position}"
        return f"{self.size} {self.color} {self.shape} at {self.position}"


@dataclass
class Sample:
    uid: str
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject]
    relevant: list[int]  # indices into objects the question is about

    def patch_relevance(self) -> np.ndarray:
        """Pixels of question-relevant objects covered in each patch, shape (144,)."""
        out = np.zeros(NUM_PATCHES, dtype=np.float32)
        for i in self.relevant:
            out += self.objects[i].patch_pixels
        return out

    def patch_priority(self) -> np.ndarray:
        """Oracle order of the patches, shape (144,), higher first: patches of the question's
        objects, then of the other objects, then background. Within a group the objects take
        turns (every object's best-covered patch, then every object's second best, ...), so a
        small budget still sees each object rather than only the largest one's interior."""
        score = np.zeros(NUM_PATCHES, dtype=np.float64)
        for group, members in ((2, set(self.relevant)), (1, set(range(len(self.objects))) - set(self.relevant))):
            for i in members:
                pix = self.objects[i].patch_pixels
                order = np.argsort(-pix, kind="stable")[: int((pix > 0).sum())]
                for rank, p in enumerate(order):
                    value = group * 1e6 - rank * 1e3 + pix[p]
                    score[p] = max(score[p], value)
        return score

    def patch_objectness(self) -> np.ndarray:
        """Pixels of any object covered in each patch, shape (144,)."""
        return sum((o.patch_pixels for o in self.objects), np.zeros(NUM_PATCHES, np.float32))


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=22)
    return _FONT


def _shape_mask(shape: str, side: int, cx: int, cy: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
                ) -> Image.Image:
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    h = side / 2
    box = (cx - h, cy - h, cx + h - 1, cy + h - 1)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h - 1, cy + h - 1)], fill=255)
    elif shape == "cross":
        t = max(2, side // 3) / 2
        d.rectangle((cx - t, cy - h, cx + t - 1, cy + h - 1), fill=255)
        d.rectangle((cx - h, cy - t, cx + h - 1, cy + t - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _letter_mask(letter: str, cx: int, cy: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    text = letter.upper()
    left, top, right, bottom = d.textbbox((0, 0), text, font=_font())
    d.text((cx - (left + right) / 2, cy - (top + bottom) / 2), text, font=_font(), fill=255)
    return mask


def _patch_pixels(mask: Image.Image) -> np.ndarray:
    m = (np.asarray(mask) > 127).astype(np.float32)
    h, w = m.shape
    return m.reshape(h // PATCH, PATCH, w // PATCH, PATCH).sum(axis=(1, 3)).reshape(-1)


def textured_background(g: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) a grey background with structure, as a photograph's has (training only):
    a random base shade plus one or two of smooth blobs, stripes at a random angle and a gradient,
    each of random contrast, in greys from 0 to 150 (darker than the white letters, and without the
    objects' saturated hues)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    canvas = np.full((height, width), g.uniform(15, 100))
    for kind in g.choice(3, size=g.integers(1, 3), replace=False):
        amp = g.uniform(10, 45)
        if kind == 0:  # blobs: coarse random grid, bilinearly upsampled
            cells = g.integers(2, 7)
            coarse = g.uniform(-1, 1, (cells + 1, cells + 1))
            gy, gx = y / height * cells, x / width * cells
            iy, ix = np.minimum(gy.astype(int), cells - 1), np.minimum(gx.astype(int), cells - 1)
            fy, fx = gy - iy, gx - ix
            field = (coarse[iy, ix] * (1 - fy) * (1 - fx) + coarse[iy + 1, ix] * fy * (1 - fx)
                     + coarse[iy, ix + 1] * (1 - fy) * fx + coarse[iy + 1, ix + 1] * fy * fx)
        elif kind == 1:  # stripes
            angle, period = g.uniform(0, np.pi), g.uniform(6, 40)
            field = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + g.uniform(0, 2 * np.pi))
        else:  # gradient
            angle = g.uniform(0, 2 * np.pi)
            field = (x * np.cos(angle) + y * np.sin(angle)) / max(width, height)
        canvas = canvas + amp * field
    grey = np.clip(canvas + g.normal(0, 6, (height, width)), 0, 150)
    return np.repeat(grey[..., None], 3, axis=2)


def render_scene(rng: random.Random, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE),
                 texture_seed: int | None = None) -> tuple[Image.Image, list[SceneObject]]:
    """Draw a random scene: 2-4 shapes with distinct (colour, shape) pairs and one letter.

    `size` (width, height; multiples of PATCH, training only) changes the canvas, not the
    objects: the 3x3 grid of cells stretches over it while shapes and letters keep their pixel
    sizes, so a larger canvas has more background patches and the same object patches.
    `texture_seed` (training only) paints a textured_background from that seed instead of the
    flat shade; the objects and their places are the same as without it."""
    width, height = size
    if width % PATCH or height % PATCH:
        raise ValueError(f"canvas {width}x{height}: sides must be multiples of the {PATCH}-pixel patch")
    n_shapes = rng.randint(2, 4)
    cells = rng.sample(range(GRID * GRID), n_shapes + 1)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_shapes)
    shade = rng.randint(20, 60)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (height, width, 3))
    canvas = np.clip(shade + noise, 0, 255)
    if texture_seed is not None:
        canvas = textured_background(np.random.default_rng(texture_seed), width, height)
    cell_w, cell_h = width // GRID, height // GRID
    objects = []
    for k, cell in enumerate(cells):
        row, col = divmod(cell, GRID)
        jx, jy = max(0, cell_w // 2 - 13), max(0, cell_h // 2 - 13)
        cx = col * cell_w + cell_w // 2 + rng.randint(-jx, jx)
        cy = row * cell_h + cell_h // 2 + rng.randint(-jy, jy)
        if k < n_shapes:
            color, shape = pairs[k]
            size_word = rng.choice(tuple(SIZES))
            mask = _shape_mask(shape, SIZES[size_word], cx, cy, size)
            obj = SceneObject("shape", cell, color, shape, size=size_word)
            rgb = COLORS[color]
        else:
            letter = rng.choice(LETTERS)
            mask = _letter_mask(letter, cx, cy, size)
            obj = SceneObject("letter", cell, "white", "letter", letter=letter)
            rgb = (245, 245, 245)
        m = (np.asarray(mask) > 127)[..., None]
        canvas = np.where(m, np.asarray(rgb, dtype=np.float64), canvas)
        obj.patch_pixels = _patch_pixels(mask)
        objects.append(obj)
    objects.sort(key=lambda o: o.cell)
    return Image.fromarray(canvas.astype(np.uint8)), objects


def describe(objects: list[SceneObject]) -> str:
    """The reference long description: every object in reading order."""
    return " ; ".join(o.phrase() for o in objects)


def ask(qtype: str, objects: list[SceneObject], rng: random.Random,
        attribute_forms: dict[str, float] | None = None) -> tuple[str, str, list[int]]:
    """One question of the given type about the scene: (question, answer, relevant objects).
    `attribute_forms` (ATTRIBUTE_FORMS name -> relative frequency, 1 when not named; training
    only) skews the mix of attribute forms; None draws them uniformly, as every split does."""
    shapes = [i for i, o in enumerate(objects) if o.kind == "shape"]
    letter = next(i for i, o in enumerate(objects) if o.kind == "letter")
    if qtype == "attribute":
        i = rng.choice(shapes)
        o = objects[i]
        form = rng.randrange(4) if attribute_forms is None else \
            rng.choices(range(4), [attribute_forms.get(f, 1.0) for f in ATTRIBUTE_FORMS])[0]
        if form == 0:
            return f"what color is the {o.shape} at the {o.position} ?", o.color, [i]
        if form == 1:
            return f"what shape is the {o.color} object at the {o.position} ?", o.shape, [i]
        if form == 2:
            return f"what size is the {o.color} {o.shape} ?", o.size, [i]
        return f"what shape is at the {o.position} ?", o.shape, [i]
    if qtype == "count":
        # Draw the answer first (0-3, balanced) so that no count dominates, then a colour or a
        # shape that has that many objects (the nearest count when none has exactly that many).
        want = rng.randrange(4)
        options = [(f"how many {c} objects are there ?", [i for i in shapes if objects[i].color == c])
                   for c in COLORS]
        options += [(f"how many {s} shapes are there ?", [i for i in shapes if objects[i].shape == s])
                    for s in SHAPES]
        gap = min(abs(len(h) - want) for _, h in options)
        question, hits = rng.choice([(q, h) for q, h in options if abs(len(h) - want) == gap])
        return question, COUNT_WORDS[len(hits)], hits
    if qtype == "exist":
        if rng.random() < 0.5:
            i = rng.choice(shapes)
            return f"is there a {objects[i].color} {objects[i].shape} ?", "yes", [i]
        present = {(objects[i].color, objects[i].shape) for i in shapes}
        # Hard negatives: an absent pair sharing the colour or the shape of a present object.
        near = sorted({(c, s) for c in COLORS for s in SHAPES
                       if (c, s) not in present and any(c == pc or s == ps for pc, ps in present)})
        color, shape = rng.choice(near)
        hits = [i for i in shapes if objects[i].color == color or objects[i].shape == shape]
        return f"is there a {color} {shape} ?", "no", hits
    if qtype == "position":
        if rng.random() < 0.8:
            i = rng.choice(shapes)
            return f"where is the {objects[i].color} {objects[i].shape} ?", objects[i].position, [i]
        return "where is the letter ?", objects[letter].position, [letter]
    if qtype == "text":
        return "what letter is written in the image ?", objects[letter].letter, [letter]
    if qtype == "describe":
        return "describe the image .", describe(objects), list(range(len(objects)))
    raise ValueError(f"unknown question type {qtype!r}; allowed: {', '.join(QUESTION_TYPES)}")


def make_sample(split: str, index: int, qtype: str | None = None) -> Sample:
    """Sample `index` of `split`; the question type cycles through QUESTION_TYPES unless given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = random.Random(f"{split}-{index}")
    image, objects = render_scene(rng)
    qtype = qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer, relevant = ask(qtype, objects, rng)
    return Sample(f"{split}-{index}", image, question, answer, qtype, objects, relevant)


def short_answer_samples(split: str, start: int, n: int) -> list[Sample]:
    """The first `n` samples of `split` from index `start` on that are not descriptions."""
    return [s for s in (make_sample(split, start + i) for i in range(n * 6 // 5 + 6)) if s.qtype != "describe"][:n]


def make_conversation(index: int, max_turns: int = 4, type_weights: dict[str, float] | None = None,
                      size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), texture: bool = False,
                      attribute_forms: dict[str, float] | None = None
                      ) -> tuple[Image.Image, list[tuple[str, str]], list[SceneObject], list[list[int]]]:
    """A training conversation: one scene, several independent questions (for training only).

    Returns the image, the (question, answer) turns, the objects and, per turn, the indices of the
    objects that turn is about. `type_weights` (question type -> relative frequency, 1 when not
    named) skews the mix of question types; None draws them uniformly. `size` is the canvas
    (render_scene); the objects' patch_pixels then hold (width/8) x (height/8) patches. `texture`
    paints a textured background (textured_background) under the same objects and questions.
    `attribute_forms` skews the attribute questions' forms (ask).
    """
    rng = random.Random(f"train-conv-{index}")
    image, objects = render_scene(rng, size, texture_seed=index if texture else None)
    weights = None if type_weights is None else [type_weights.get(t, 1.0) for t in QUESTION_TYPES]
    turns, relevant = [], []
    for _ in range(rng.randint(1, max_turns)):
        qtype = rng.choice(QUESTION_TYPES) if weights is None else rng.choices(QUESTION_TYPES, weights)[0]
        q, a, hits = ask(qtype, objects, rng, attribute_forms)
        turns.append((q, a))
        relevant.append(hits)
    return image, turns, objects, relevant


def patch_labels(objects: list[SceneObject]) -> dict[str, np.ndarray]:
    """Per-patch class labels (colour, shape, letter) of the object covering most of each patch."""
    cover = np.stack([o.patch_pixels for o in objects])  # (n_obj, 144)
    best = cover.argmax(0)
    hit = cover.max(0) >= MIN_PATCH_OVERLAP
    labels = {}
    for name, classes, attr in (("color", PATCH_COLOR_CLASSES, "color"),
                                ("shape", PATCH_SHAPE_CLASSES, "shape"),
                                ("letter", PATCH_LETTER_CLASSES, "letter")):
        ids = np.array([classes.index(getattr(o, attr)) if getattr(o, attr) else 0 for o in objects])
        labels[name] = np.where(hit, ids[best], 0).astype(np.int64)
    return labels


# ----------------------------------------------------------------------------- scoring

def normalize(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _items(text: str) -> list[str]:
    return [normalize(t) for t in text.split(";") if normalize(t)]


def description_f1(prediction: str, reference: str) -> float:
    """Per-object F1: an object counts when its whole phrase (size colour shape at cell) matches."""
    pred, ref = _items(prediction), _items(reference)
    if not pred and not ref:
        return 1.0
    remaining = list(ref)
    tp = 0
    for p in pred:
        if p in remaining:
            remaining.remove(p)
            tp += 1
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(qtype: str, prediction: str, reference: str) -> float:
    """Exact match for short answers (yes/no accuracy is exact match), per-object F1 for descriptions."""
    if qtype == "describe":
        return description_f1(prediction, reference)
    return float(normalize(prediction) == normalize(reference))
