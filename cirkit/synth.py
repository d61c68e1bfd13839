"""``cirkit synth``: a procedural Composed Image Retrieval benchmark that needs no downloads.

Scenes are 1-3 non-overlapping flat shapes on a coloured background, drawn with PIL at
4x and box-downsampled (anti-aliased). A scene is fully described by its canonical
caption, which is also its identity: two scenes with the same caption are the same image.

Caption grammar (objects in reading order: top row left to right, then middle, then bottom)::

    caption  := object ("" | " and " object | ", " object " and " object) ", on a " BG " background"
    object   := "a " SIZE " " COLOUR " " SHAPE " " PLACE
    PLACE    := "in the top left" | "at the top" | "in the top right" | "on the left" | "in the center"
              | "on the right" | "in the bottom left" | "at the bottom" | "in the bottom right"

e.g. "a large red circle on the left and a small blue star on the right, on a gray background".

Edits (``EDIT_TYPES``) change exactly one thing; every other attribute is kept. The
modification text names the object with a referring expression that is unique in the
reference scene (by shape, colour + shape, size + shape, ..., or shape + place).

Layout written under OUT (see docs/architecture.md "Synth benchmark layout")::

    images/<id>.png, captions.jsonl (train images), all_captions.jsonl (every image, with
    its structured ``scene`` and ``splits``), triplets.jsonl (train), benchmark/meta.json,
    benchmark/{test,compositional}/{gallery,queries}.jsonl (generic format).

The compositional split's targets each contain a held-out (colour, shape) combination
that appears in no training image; no test scene equals a training scene.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cirkit.config import check_settings, setting, wait_setting
from cirkit.errors import CirkitError
from cirkit.summary import Rate, StageResult, make_progress, timed

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 35),
    "green": (50, 180, 70),
    "blue": (45, 100, 240),
    "yellow": (245, 220, 50),
    "purple": (155, 70, 210),
    "orange": (250, 145, 35),
    "white": (250, 250, 250),
    "pink": (250, 150, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "navy": (25, 30, 85),
    "beige": (225, 210, 175),
    "brown": (100, 65, 40),
}
SIZES = ("small", "large")
# Half-extent of a shape as a fraction of the image side; a grid cell is 1/3 wide.
SIZE_RADIUS = {"small": 0.095, "large": 0.155}
# 3x3 grid, reading order. Names are what JSON stores; phrases are what text says.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACE = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
DEST = {
    "top left": "to the top left", "top": "to the top", "top right": "to the top right",
    "left": "to the left", "center": "to the center", "right": "to the right",
    "bottom left": "to the bottom left", "bottom": "to the bottom", "bottom right": "to the bottom right",
}
EDIT_TYPES = ("colour", "shape", "size", "move", "add", "remove", "background")
DEFAULT_HELD_OUT = ("purple star", "green triangle", "yellow square", "blue hexagon")
# An object colour must stand out from its background by this RGB distance.
MIN_CONTRAST = 100.0
SPLITS = ("test", "compositional")
MIN_NEGATIVES = 3  # hard negatives to aim for per query (more when a scene offers them)

# {obj} is a determiner phrase ("the red circle", "the star on the left", or "it").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "make {obj} {colour}",
        "change {obj} to {colour}",
        "turn {obj} {colour}",
        "paint {obj} {colour}",
        "recolor {obj} {colour}",
        "{obj} should be {colour}",
        "I want {obj} in {colour}",
        "can you make {obj} {colour}?",
        "give {obj} a {colour} colour",
        "colour {obj} {colour} instead",
    ),
    "shape": (
        "swap {obj} for a {shape}",
        "replace {obj} with a {shape}",
        "turn {obj} into a {shape}",
        "make {obj} a {shape}",
        "change {obj} into a {shape}",
        "{obj} should be a {shape} instead",
        "same colour and size, but a {shape} instead of {obj}",
        "I'd rather have a {shape} than {obj}",
        "reshape {obj} into a {shape}",
    ),
    "size_large": (
        "make {obj} bigger",
        "enlarge {obj}",
        "make {obj} larger",
        "scale {obj} up",
        "{obj} should be large",
        "blow {obj} up",
        "grow {obj}",
        "increase the size of {obj}",
    ),
    "size_small": (
        "shrink {obj}",
        "make {obj} smaller",
        "make {obj} small",
        "scale {obj} down",
        "{obj} should be small",
        "reduce the size of {obj}",
        "make {obj} tiny",
        "shrink {obj} down",
    ),
    "move": (
        "move {obj} {dest}",
        "put {obj} {place}",
        "shift {obj} {dest}",
        "place {obj} {place}",
        "{obj} should be {place}",
        "slide {obj} {dest}",
        "drag {obj} {dest}",
        "relocate {obj} {dest}",
    ),
    "add": (
        "add {new} {place}",
        "put {new} {place}",
        "place {new} {place}",
        "insert {new} {place}",
        "there should also be {new} {place}",
        "include {new} {place} too",
        "{place}, add {new}",
        "draw {new} {place} as well",
        "also {new} {place}",
    ),
    "remove": (
        "remove {obj}",
        "get rid of {obj}",
        "delete {obj}",
        "take {obj} away",
        "take {obj} out",
        "erase {obj}",
        "drop {obj}",
        "{obj} should go",
        "same picture without {obj}",
    ),
    "background": (
        "put it on a {bg} background",
        "change the background to {bg}",
        "make the background {bg}",
        "use a {bg} background",
        "same objects on a {bg} background",
        "swap the background for {bg}",
        "{bg} background instead",
        "set the background to {bg}",
        "recolor the background {bg}",
    ),
}


@dataclass(frozen=True)
class Obj:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def combo(self) -> str:
        return f"{self.colour} {self.shape}"

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PLACE[self.position]}"

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> Obj:
        return cls(d["shape"], d["colour"], d["size"], d["position"])


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 objects at distinct grid cells (kept in reading order)."""

    background: str
    objects: tuple[Obj, ...]

    @classmethod
    def make(cls, background: str, objects: Iterable[Obj]) -> Scene:
        return cls(background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))

    def caption(self) -> str:
        """The exact, canonical caption (see the module docstring for the grammar)."""
        parts = [o.phrase() for o in self.objects]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{body}, on {_a(self.background)} {self.background} background"

    @property
    def key(self) -> str:
        return self.caption()

    @property
    def image_id(self) -> str:
        return "s" + hashlib.sha1(self.key.encode()).hexdigest()[:12]

    def combos(self) -> set[str]:
        return {o.combo for o in self.objects}

    def at(self, position: str) -> Obj:
        for o in self.objects:
            if o.position == position:
                return o
        raise KeyError(position)

    def valid(self, max_objects: int = 3) -> bool:
        pos = [o.position for o in self.objects]
        return (
            1 <= len(self.objects) <= max_objects
            and len(set(pos)) == len(pos)
            and all(_contrast_ok(o.colour, self.background) for o in self.objects)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls.make(d["background"], [Obj.from_dict(o) for o in d["objects"]])


@dataclass(frozen=True)
class Edit:
    """One change: ``position`` names the edited object (None for add/background)."""

    type: str
    position: str | None = None
    value: Any = None  # colour / shape / size / position name / Obj (add) / background

    def to_dict(self) -> dict[str, Any]:
        value = self.value.to_dict() if isinstance(self.value, Obj) else self.value
        return {"type": self.type, "position": self.position, "value": value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Edit:
        value = Obj.from_dict(d["value"]) if d["type"] == "add" else d.get("value")
        return cls(d["type"], d.get("position"), value)


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after ``edit``; everything the edit does not name is unchanged."""
    t = edit.type
    if t == "background":
        return Scene.make(edit.value, scene.objects)
    if t == "add":
        return Scene.make(scene.background, [*scene.objects, edit.value])
    target = scene.at(edit.position)
    rest = [o for o in scene.objects if o is not target]
    if t == "remove":
        return Scene.make(scene.background, rest)
    attr = {"colour": "colour", "shape": "shape", "size": "size", "move": "position"}[t]
    return Scene.make(scene.background, [*rest, replace(target, **{attr: edit.value})])


@dataclass
class SynthConfig:
    """Settings of ``cirkit synth``; sizes are per split where they concern the benchmark."""

    out: Path = setting(positional=True, metavar="OUT", flag="--output", short="-o",
                        help="Output folder; must be new or empty unless --overwrite.")
    seed: int = setting(0, help="Random seed; same seed, same bytes.")
    train_triplets: int = setting(2000, ge=0, help="Training triplets to generate.")
    test_queries: int = setting(200, ge=0, help="Queries per benchmark split (test, compositional).")
    distractors: int = setting(200, ge=0, help="Extra random gallery images per split.")
    image_size: int = setting(64, ge=16, le=1024, help="Image side in pixels.")
    max_objects: int = setting(3, ge=2, le=3, help="Most objects in a scene (add/remove need room).")
    held_out: tuple[str, ...] | list[str] = setting(
        DEFAULT_HELD_OUT,
        help="A 'COLOUR SHAPE' combination kept out of training for the compositional split; repeat or "
        "comma-separate.")
    overwrite: bool = setting(False, help="Replace OUT if it holds a previous synth output.")
    wait: bool = wait_setting()

    def __post_init__(self) -> None:
        check_settings(self)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _contrast_ok(colour: str, background: str) -> bool:
    c, b = COLOURS[colour], BACKGROUNDS[background]
    return sum((x - y) ** 2 for x, y in zip(c, b, strict=True)) ** 0.5 >= MIN_CONTRAST


def parse_held_out(values: Iterable[str] | str) -> tuple[str, ...]:
    """Normalise held-out combinations ("purple star", comma lists allowed) and check the names."""
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for item in str(value).split(","):
            words = item.strip().lower().split()
            if not words:
                continue
            if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
                raise CirkitError(
                    f"held-out combination {item.strip()!r} must be 'COLOUR SHAPE' with a colour in "
                    f"{', '.join(COLOURS)} and a shape in {', '.join(SHAPES)} (e.g. 'purple star')"
                )
            combo = " ".join(words)
            if combo not in out:
                out.append(combo)
    if len(out) >= len(COLOURS) * len(SHAPES):
        raise CirkitError("held-out combinations cover every colour-shape pair; leave some for training")
    return tuple(out)


# ----------------------------------------------------------------------------- sampling


class _Sampler:
    """Random scenes and edits under a set of allowed (colour, shape) combinations."""

    def __init__(self, rng: random.Random, allowed: set[str], max_objects: int):
        self.rng, self.allowed, self.max_objects = rng, allowed, max_objects

    def combos_for(self, background: str) -> list[tuple[str, str]]:
        return [
            (c, s) for c in COLOURS for s in SHAPES
            if f"{c} {s}" in self.allowed and _contrast_ok(c, background)
        ]

    def scene(self, n: int | None = None, force: list[str] | None = None) -> Scene:
        rng = self.rng
        while True:
            k = n if n is not None else rng.randint(1, self.max_objects)
            bg = rng.choice(list(BACKGROUNDS))
            positions = rng.sample(POSITIONS, k)
            combos = self.combos_for(bg)
            if not combos:
                continue
            objs = []
            for pos in positions:
                c, s = rng.choice(combos)
                objs.append(Obj(s, c, rng.choice(SIZES), pos))
            if force:
                forced = [tuple(f.split()) for f in force if _contrast_ok(f.split()[0], bg)]
                if not forced:
                    continue
                c, s = rng.choice(forced)
                objs[0] = replace(objs[0], colour=c, shape=s)
            return Scene.make(bg, objs)

    def edit(self, scene: Scene, etype: str) -> Edit | None:
        """A random valid edit of type ``etype``, or None when the scene allows none."""
        rng, objs, bg = self.rng, scene.objects, scene.background
        if etype == "background":
            bgs = [b for b in BACKGROUNDS if b != bg and all(_contrast_ok(o.colour, b) for o in objs)]
            return Edit("background", None, rng.choice(bgs)) if bgs else None
        free = [p for p in POSITIONS if p not in {o.position for o in objs}]
        if etype == "add":
            if len(objs) >= self.max_objects or not free:
                return None
            c, s = rng.choice(self.combos_for(bg))
            return Edit("add", None, Obj(s, c, rng.choice(SIZES), rng.choice(free)))
        if etype == "remove":
            return Edit("remove", rng.choice(objs).position) if len(objs) >= 2 else None
        o = rng.choice(objs)
        if etype == "size":
            return Edit("size", o.position, "small" if o.size == "large" else "large")
        if etype == "move":
            return Edit("move", o.position, rng.choice(free)) if free else None
        if etype == "colour":
            opts = [c for c in COLOURS if c != o.colour and _contrast_ok(c, bg) and f"{c} {o.shape}" in self.allowed]
        elif etype == "shape":
            opts = [s for s in SHAPES if s != o.shape and f"{o.colour} {s}" in self.allowed]
        else:
            raise ValueError(etype)
        return Edit(etype, o.position, rng.choice(opts)) if opts else None


def referring_expressions(scene: Scene, position: str) -> list[str]:
    """Determiner phrases that pick out the object at ``position`` and no other."""
    o = scene.at(position)
    out = []
    for attrs in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        same = [p for p in scene.objects if all(getattr(p, a) == getattr(o, a) for a in attrs)]
        if len(same) == 1:
            out.append("the " + " ".join(getattr(o, a) for a in attrs))
    if sum(p.colour == o.colour for p in scene.objects) == 1 and len(scene.objects) > 1:
        out.append(f"the {o.colour} one")
    out.append(f"the {o.shape} {PLACE[o.position]}")
    return out


def edit_text(rng: random.Random, scene: Scene, edit: Edit) -> str:
    """A human-like modification text that determines ``edit`` given ``scene``."""
    t = edit.type
    if t == "background":
        return rng.choice(TEMPLATES["background"]).format(bg=edit.value)
    if t == "add":
        new: Obj = edit.value
        text = rng.choice(TEMPLATES["add"]).format(
            new=f"a {new.size} {new.colour} {new.shape}", place=PLACE[new.position]
        )
        return text
    refs = referring_expressions(scene, edit.position)
    obj = "it" if len(scene.objects) == 1 and rng.random() < 0.25 else rng.choice(refs)
    key = f"size_{edit.value}" if t == "size" else t
    value = edit.value
    templates = TEMPLATES[key]
    if obj == "it":  # "rather have a star than it", "the size of it": not how people talk
        templates = tuple(t for t in templates if "than {obj}" not in t and "of {obj}" not in t)
    return rng.choice(templates).format(
        obj=obj,
        colour=value,
        shape=value,
        dest=DEST.get(value, ""),
        place=PLACE.get(value, ""),
    )


def hard_negatives(rng: random.Random, ref: Scene, edit: Edit, target: Scene, sampler: _Sampler) -> list[Scene]:
    """Near misses of ``target``: the same edit on another object, the wrong value, a partial edit."""
    t, objs = edit.type, ref.objects
    cands: list[Scene] = []
    others = [o for o in objs if o.position != edit.position]
    # 1. the same edit applied to a different object (or, for add, at a different place)
    if t in ("colour", "shape", "size", "move", "remove") and others:
        cands.append(apply_edit(ref, replace(edit, position=rng.choice(others).position)))
    free = [p for p in POSITIONS if p not in {o.position for o in objs}]
    if t == "add":
        elsewhere = [p for p in free if p != edit.value.position]
        if elsewhere:
            cands.append(apply_edit(ref, replace(edit, value=replace(edit.value, position=rng.choice(elsewhere)))))
    # 2. the right object, the wrong value (e.g. right shape, wrong colour)
    if t in ("colour", "shape", "move", "background"):
        old = getattr(ref.at(edit.position), {"colour": "colour", "shape": "shape", "move": "position"}[t]) \
            if t != "background" else ref.background
        pool = {"colour": list(COLOURS), "shape": list(SHAPES), "move": free, "background": list(BACKGROUNDS)}[t]
        wrong = [v for v in pool if v not in (old, edit.value)]
        if wrong:
            cands.append(apply_edit(ref, replace(edit, value=rng.choice(wrong))))
    if t == "add":
        new: Obj = edit.value
        cands.append(apply_edit(ref, replace(edit, value=replace(new, colour=rng.choice([c for c in COLOURS if c != new.colour])))))
        cands.append(apply_edit(ref, replace(edit, value=replace(new, shape=rng.choice([s for s in SHAPES if s != new.shape])))))
    # 3. the edit done, but something else changed too (right colour, wrong size, ...)
    if target.objects:
        where = edit.value if t == "move" else edit.value.position if t == "add" else edit.position
        touched = [o for o in target.objects if o.position == where]
        o = touched[0] if touched else rng.choice(target.objects)
        attr = rng.choice([a for a in ("colour", "shape", "size") if a != t])
        pool = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
        value = rng.choice([v for v in pool if v != getattr(o, attr)])
        rest = [p for p in target.objects if p is not o]
        cands.append(Scene.make(target.background, [*rest, replace(o, **{attr: value})]))
    # 4. a different edit of the reference
    other = sampler.edit(ref, rng.choice([e for e in EDIT_TYPES if e != t]))
    if other is not None:
        cands.append(apply_edit(ref, other))
    return cands


# ----------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    import math

    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + 2 * math.pi * k / n), cy + radius * math.sin(start + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, r * 1.1, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "star":
        outer, inner = ring(5, r * 1.05, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    raise ValueError(shape)


def render(scene: Scene, size: int = 64, supersample: int | None = None):
    """Draw ``scene`` as a ``size`` x ``size`` RGB PIL image (drawn large, box-downsampled)."""
    from PIL import Image, ImageDraw

    if supersample is None:  # 4x for small images, less where the canvas would get huge
        supersample = max(1, min(4, 512 // size))
    big = size * supersample
    im = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    cell = big / 3
    for o in scene.objects:
        idx = POSITIONS.index(o.position)
        cx, cy = (idx % 3 + 0.5) * cell, (idx // 3 + 0.5) * cell
        r = SIZE_RADIUS[o.size] * big
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95), fill=colour)
        else:
            pts = _shape_points(o.shape, cx, cy + (r * 0.12 if o.shape == "triangle" else 0.0), r)
            draw.polygon(pts, fill=colour)
    return im.reduce(supersample) if supersample > 1 else im


def png_bytes(scene: Scene, size: int) -> bytes:
    """The PNG file of ``scene``; fixed encoder settings and no metadata, so bytes are reproducible."""
    buf = io.BytesIO()
    render(scene, size).save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- generation


@dataclass
class _Split:
    name: str
    queries: list[dict[str, Any]] = field(default_factory=list)
    gallery: dict[str, Scene] = field(default_factory=dict)


def is_synth_output(folder: Path) -> bool:
    """A folder ``cirkit synth`` wrote: its ownership marker, or (before markers) a synth ``benchmark/meta.json``.

    The name in meta.json is checked: a user's own benchmark folder also has a meta.json.
    """
    from cirkit.io.atomic import read_marker, read_small_json

    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") == "synth"
    meta = read_small_json(folder / "benchmark" / "meta.json")
    return isinstance(meta, dict) and meta.get("name") == "synth" and (folder / "images").is_dir()


def _check(config: SynthConfig) -> tuple[str, ...]:
    for name in ("train_triplets", "test_queries", "distractors"):
        if getattr(config, name) < 0:
            raise CirkitError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.train_triplets + config.test_queries == 0:
        raise CirkitError("nothing to generate: --train-triplets and --test-queries are both 0")
    if not 16 <= config.image_size <= 1024:
        raise CirkitError(f"--image-size must be between 16 and 1024 pixels, got {config.image_size}")
    if not 2 <= config.max_objects <= 3:
        raise CirkitError(f"--max-objects must be 2 or 3 (add/remove need room), got {config.max_objects}")
    held = parse_held_out(config.held_out)
    if config.test_queries and not held:
        raise CirkitError("the compositional split needs at least one --held-out combination")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CirkitError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise CirkitError(f"{out}: folder exists and is not empty; pass --overwrite to replace it or choose another OUT")
        if not is_synth_output(out):
            raise CirkitError(
                f"{out}: --overwrite only replaces a previous synth output (no synth marker or benchmark/meta.json here); "
                "remove the folder yourself or choose another OUT"
            )
    return held


def _train(config: SynthConfig, held: tuple[str, ...], progress, task) -> tuple[list[dict], dict[str, Scene]]:
    rng = random.Random(f"cirkit-synth-{config.seed}-train")
    allowed = {f"{c} {s}" for c in COLOURS for s in SHAPES} - set(held)
    sampler = _Sampler(rng, allowed, config.max_objects)
    triplets, scenes, seen = [], {}, set()
    i = 0
    while len(triplets) < config.train_triplets:
        etype = EDIT_TYPES[i % len(EDIT_TYPES)]
        i += 1
        for _ in range(1000):
            ref = sampler.scene()
            edit = sampler.edit(ref, etype)
            if edit is not None and (ref.key, edit) not in seen:
                break
        else:
            raise CirkitError(f"could not sample a new '{etype}' edit; use fewer --train-triplets")
        seen.add((ref.key, edit))
        tgt = apply_edit(ref, edit)
        scenes[ref.image_id], scenes[tgt.image_id] = ref, tgt
        triplets.append({"ref": ref, "edit": edit, "target": tgt, "text": edit_text(rng, ref, edit)})
        progress.advance(task)
    rng.shuffle(triplets)
    return triplets, scenes


def _split(config: SynthConfig, name: str, held: tuple[str, ...], train_keys: set[str], progress, task) -> _Split:
    rng = random.Random(f"cirkit-synth-{config.seed}-{name}")
    every = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    compositional = name == "compositional"
    sampler = _Sampler(rng, every if compositional else every - set(held), config.max_objects)
    held_set = set(held)

    def usable(s: Scene) -> bool:
        return (
            s.valid(config.max_objects)
            and s.key not in train_keys
            and (compositional or not (s.combos() & held_set))
        )

    split, seen = _Split(name), set()
    for i in range(config.test_queries):
        etype = EDIT_TYPES[i % len(EDIT_TYPES)]
        for _ in range(20000):
            # compositional: either the reference already holds a held-out object that the
            # edit keeps ("carry"), or the edit creates one (colour / shape / add only)
            carry = compositional and (etype not in ("colour", "shape", "add") or rng.random() < 0.3)
            ref = sampler.scene(force=list(held) if carry else None)
            if compositional and not carry and ref.combos() & held_set:
                continue
            edit = sampler.edit(ref, etype)
            if edit is None or (ref.key, edit) in seen:
                continue
            tgt = apply_edit(ref, edit)
            if not (usable(ref) and usable(tgt)):
                continue
            if compositional and not (tgt.combos() & held_set):
                continue
            break
        else:
            raise CirkitError(f"could not sample a new '{etype}' query for the {name} split; use fewer --test-queries")
        seen.add((ref.key, edit))
        negs: dict[str, Scene] = {}
        for _ in range(4):  # near misses of small scenes often are training scenes: try again
            for s in hard_negatives(rng, ref, edit, tgt, sampler):
                if usable(s) and s.key not in (ref.key, tgt.key):
                    negs.setdefault(s.image_id, s)
            if len(negs) >= MIN_NEGATIVES:
                break
        negs = list(negs.values())
        for s in (ref, tgt, *negs):
            split.gallery[s.image_id] = s
        split.queries.append({
            "id": f"{name}-{i:05d}",
            "ref": ref,
            "edit": edit,
            "target": tgt,
            "text": edit_text(rng, ref, edit),
            "hard_negatives": [s.image_id for s in negs],
        })
        progress.advance(task)
    added = 0
    for _ in range(config.distractors * 50):
        if added >= config.distractors:
            break
        s = sampler.scene()
        if usable(s) and s.image_id not in split.gallery:
            split.gallery[s.image_id] = s
            added += 1
    return split


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    # Plain writes: every file lives inside the atomic_dir temp folder, swapped in whole.
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _img(k: str, prefix: str = "") -> str:
    return f"{prefix}images/{k}.png"


def _render(folder: Path, scenes: dict[str, Scene], size: int, progress) -> None:
    """Every scene as ``folder/images/<id>.png``."""
    (folder / "images").mkdir()
    rate = Rate("img")
    ids = sorted(scenes)
    task = progress.add_task("rendering", total=len(ids), rate="")
    for n, k in enumerate(ids, 1):
        (folder / "images" / f"{k}.png").write_bytes(png_bytes(scenes[k], size))
        speed = rate.add(1)
        if n % 64 == 0 or n == len(ids):
            progress.update(task, completed=n, rate=speed)


def _write_training(folder: Path, train_scenes: dict[str, Scene], scenes: dict[str, Scene],
                    membership: dict[str, list[str]], triplets: list[dict[str, Any]]) -> int:
    """captions.jsonl (training images), all_captions.jsonl (every image) and triplets.jsonl."""
    from cirkit.records import Caption, Triplet

    n_caps = _write_jsonl(folder / "captions.jsonl", (
        Caption(id=k, image=_img(k), caption=train_scenes[k].caption(), model="synth").to_dict()
        for k in sorted(train_scenes)
    ))
    _write_jsonl(folder / "all_captions.jsonl", (
        Caption(id=k, image=_img(k), caption=scenes[k].caption(), model="synth",
                extra={"scene": scenes[k].to_dict(), "splits": membership[k]}).to_dict()
        for k in sorted(scenes)
    ))
    _write_jsonl(folder / "triplets.jsonl", (
        Triplet(
            id=f"synth-{i:06d}", reference=_img(t["ref"].image_id), instruction=t["text"],
            target=_img(t["target"].image_id), reference_caption=t["ref"].caption(),
            target_caption=t["target"].caption(), source="synth",
            extra={"edit": t["edit"].type, "edit_args": t["edit"].to_dict()},
        ).to_dict()
        for i, t in enumerate(triplets)
    ))
    return n_caps


def _write_split(folder: Path, sp) -> dict[str, int]:
    """One benchmark split: gallery.jsonl and queries.jsonl (paths relative to the split folder)."""
    from cirkit.records import GalleryItem, Query

    folder.mkdir(parents=True)
    _write_jsonl(folder / "gallery.jsonl", (
        GalleryItem(id=k, image=_img(k, "../../")).to_dict() for k in sorted(sp.gallery)
    ))
    _write_jsonl(folder / "queries.jsonl", (
        Query(
            id=q["id"], reference=_img(q["ref"].image_id, "../../"), text=q["text"],
            targets=[q["target"].image_id], reference_id=q["ref"].image_id,
            extra={
                "edit": q["edit"].type,
                "edit_args": q["edit"].to_dict(),
                "reference_caption": q["ref"].caption(),
                "target_caption": q["target"].caption(),
                "hard_negatives": q["hard_negatives"],
            },
        ).to_dict()
        for q in sp.queries
    ))
    return {"queries": len(sp.queries), "gallery": len(sp.gallery)}


def _meta(config: SynthConfig, held: tuple[str, ...], splits: list, counts: dict[str, Any]) -> dict[str, Any]:
    """benchmark/meta.json: what was generated, how, and the protocol switches evaluate reads."""
    from cirkit import __version__
    from cirkit.config import to_jsonable

    return {
        "name": "synth",
        "splits": [sp.name for sp in splits],
        "seed": config.seed,
        "held_out": list(held),
        "exclude_reference": False,
        "image_size": config.image_size,
        "edit_types": list(EDIT_TYPES),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "backgrounds": list(BACKGROUNDS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "counts": counts,
        "notes": (
            "The reference image is in each gallery and is NOT excluded when ranking "
            "(exclude_reference false): returning the unedited reference is a failure. "
            "Compositional targets each contain a held_out colour-shape combination that "
            "appears in no training image; no test scene equals a training scene."
        ),
        "cirkit": __version__,
        "config": {k: v for k, v in to_jsonable(config).items() if k not in ("out", "overwrite", "wait")}
        | {"held_out": list(held)},
    }


def run(config: SynthConfig) -> StageResult:
    """Generate the synth benchmark into ``config.out`` (atomically: all or nothing, one writer)."""
    from cirkit.io import atomic_dir
    from cirkit.io.lock import output_lock

    held = _check(config)
    result = StageResult("synth")
    out = Path(config.out)
    with timed(result), output_lock(out, wait=config.wait, what="synth folder"), make_progress() as progress:
        _check(config)  # again, under the lock: a run we queued behind (--wait) may have filled OUT
        task = progress.add_task("sampling", total=config.train_triplets + 2 * config.test_queries, rate="")
        triplets, train_scenes = _train(config, held, progress, task)
        train_keys = {s.key for s in train_scenes.values()}
        splits = [_split(config, name, held, train_keys, progress, task) for name in SPLITS] if config.test_queries else []

        scenes: dict[str, Scene] = dict(train_scenes)
        membership: dict[str, list[str]] = {k: ["train"] for k in train_scenes}
        for sp in splits:
            for k, sc in sp.gallery.items():
                scenes[k] = sc
                membership.setdefault(k, []).append(sp.name)

        with atomic_dir(out, "synth", is_synth_output) as tmp:
            _render(tmp, scenes, config.image_size, progress)
            n_caps = _write_training(tmp, train_scenes, scenes, membership, triplets)
            bench = tmp / "benchmark"
            split_counts = {sp.name: _write_split(bench / sp.name, sp) for sp in splits}
            counts = {"images": len(scenes), "train_triplets": len(triplets), "train_captions": n_caps, **split_counts}
            bench.mkdir(exist_ok=True)
            (bench / "meta.json").write_text(json.dumps(_meta(config, held, splits, counts), indent=2,
                                                        ensure_ascii=False) + "\n", encoding="utf-8")

    result.counts = {"images": len(scenes), "train_triplets": len(triplets), "train_captions": n_caps}
    for sp in splits:
        result.counts[f"{sp.name}_queries"] = len(sp.queries)
        result.counts[f"{sp.name}_gallery"] = len(sp.gallery)
    result.outputs = {"out": str(out)}
    edits = Counter(t["edit"].type for t in triplets)
    result.details = {"held_out": list(held), "seed": config.seed, "train_edits": dict(sorted(edits.items()))}
    return result
