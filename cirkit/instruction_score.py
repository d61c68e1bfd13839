"""Does an instruction name the synth edit it stands for? Pure functions, no models.

Synth captions are exact (see :mod:`cirkit.synth`): a pair of them that differs by one edit
says which object changed, which attribute and to what. :func:`score_instruction` checks
an instruction against that edit by the words it uses:

* ``value``: it names the new value: the new colour / shape, a size word of the right
  direction (bigger, shrink, ...), the destination place, the added object's colour and
  shape, a removal verb, or the new background colour with the word "background".
* ``object``: it picks out the edited object: the colours, shapes and places it mentions
  (other than the new value) fit that object and no other object of the reference scene
  ("it" or no mention is enough only when the scene has one object). Not asked of add and
  background edits, which name no existing object.
* ``kind``: it describes no other kind of change: no "background" for an object edit, no
  removal or addition words unless the edit is one, no move verb or destination unless it
  is a move, no size verb (bigger, shrink, ...) unless it is a resize.
* ``correct``: all three. This is the "attributes named correctly" rate of seed 001 §II-A's
  reformulator, measured against the truth instead of by eye.

:func:`edit_between` finds the single edit between two scenes (``None`` when they differ by
more or nothing), :func:`parse_caption` reads a synth caption back into a scene, and
:func:`score_triplet` / :func:`summarize` score a ``triplets.jsonl`` record / a list of scores.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from cirkit.synth import BACKGROUNDS, COLOURS, PLACE, POSITIONS, SHAPES, SIZES, Edit, Obj, Scene

_PLACE_TO_POS = {v: k for k, v in PLACE.items()}
_OBJ = re.compile(
    rf"^an? (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?P<place>{'|'.join(sorted(PLACE.values(), key=len, reverse=True))})$"
)
_CAPTION = re.compile(rf"^(?P<body>.+), on an? (?P<bg>{'|'.join(BACKGROUNDS)}) background$")

# Words that signal a kind of change (lower-case whole words; phrases are matched on the text).
_REMOVE = {"remove", "removed", "removing", "delete", "erase", "rid", "drop", "without", "eliminate"}
_REMOVE_PHRASES = re.compile(r"\btake\b(?: \w+){0,10} (?:away|out)\b|\bshould go\b|\bget rid\b")
_ADD = {"add", "added", "adding", "insert", "include", "additional", "extra"}
_ADD_PHRASES = ("as well", "there should also be")
_MOVE = {"move", "moved", "shift", "slide", "drag", "relocate", "reposition"}
_BIGGER = {"bigger", "larger", "enlarge", "enlarged", "grow", "increase", "big", "blow"}
_SMALLER = {"smaller", "shrink", "shrunk", "tiny", "reduce", "decrease", "little"}
_SIZE_VERBS = (_BIGGER | _SMALLER | {"scale", "resize"}) - {"big", "little"}
_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "colour": "color", "circles": "circle",
             "squares": "square", "triangles": "triangle", "stars": "star", "diamonds": "diamond",
             "hexagons": "hexagon"}
# Place phrases people write, longest first so "top left" is not read as "top" + "left".
_PLACES = sorted({
    **{p: p for p in POSITIONS},
    **{p.replace(" ", "-"): p for p in POSITIONS if " " in p},
    "upper left": "top left", "upper right": "top right", "lower left": "bottom left", "lower right": "bottom right",
    "left side": "left", "right side": "right", "centre": "center", "middle": "center",
}.items(), key=lambda kv: -len(kv[0]))


@dataclass(frozen=True)
class InstructionScore:
    """How one instruction names one edit (see the module docstring)."""

    edit: str
    value: bool
    object: bool
    kind: bool

    @property
    def correct(self) -> bool:
        return self.value and self.object and self.kind

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}


def parse_caption(text: str) -> Scene | None:
    """The scene a synth caption describes (exactly: it must be the scene's own caption), else None."""
    m = _CAPTION.match(text.strip())
    if not m:
        return None
    objs = []
    for part in re.split(r", | and ", m.group("body")):
        o = _OBJ.match(part)
        if not o:
            return None
        objs.append(Obj(o.group("shape"), o.group("colour"), o.group("size"), _PLACE_TO_POS[o.group("place")]))
    if len({o.position for o in objs}) != len(objs):
        return None
    scene = Scene.make(m.group("bg"), objs)
    return scene if scene.caption() == text.strip() else None


def edit_between(ref: Scene, tgt: Scene) -> Edit | None:
    """The one synth edit that turns ``ref`` into ``tgt``; None if they differ by more than one, or not at all."""
    if ref.background != tgt.background:
        return Edit("background", None, tgt.background) if set(ref.objects) == set(tgt.objects) else None
    r_only = [o for o in ref.objects if o not in tgt.objects]
    t_only = [o for o in tgt.objects if o not in ref.objects]
    if not r_only and len(t_only) == 1:
        return Edit("add", None, t_only[0])
    if not t_only and len(r_only) == 1:
        return Edit("remove", r_only[0].position)
    if len(r_only) != 1 or len(t_only) != 1:
        return None
    r, t = r_only[0], t_only[0]
    changed = [a for a in ("colour", "shape", "size", "position") if getattr(r, a) != getattr(t, a)]
    if len(changed) != 1:
        return None
    kind = {"position": "move"}.get(changed[0], changed[0])
    return Edit(kind, r.position, getattr(t, changed[0]))


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]


def _places(text: str) -> list[str]:
    """Place names mentioned in ``text``, longest phrase first (each stretch of text read once)."""
    t = " " + " ".join(re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower())) + " "
    found = []
    for phrase, pos in _PLACES:
        pat = f" {phrase} "
        while pat in t:
            found.append((t.index(pat), pos))
            t = t.replace(pat, " " + "#" * len(phrase) + " ", 1)
    return [p for _, p in sorted(found)]


def score_instruction(instruction: str, ref: Scene, edit: Edit) -> InstructionScore:
    """Score ``instruction`` against ``edit`` applied to ``ref`` (see the module docstring)."""
    words = _words(instruction)
    ws = set(words)
    text = " ".join(words)
    places = _places(instruction)
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    bgs = [w for w in words if w in BACKGROUNDS]
    t = edit.type
    removes = bool(ws & _REMOVE) or bool(_REMOVE_PHRASES.search(text))
    if ws & {"scale", "shrink"}:  # "scale it up", "shrink it down": the particle gives the direction
        ws |= {"bigger"} if "up" in ws else {"smaller"} if "down" in ws else set()
    adds = bool(ws & _ADD) or any(p in text for p in _ADD_PHRASES)
    resizes = bool(ws & _SIZE_VERBS)

    # the value
    if t == "colour":
        value = edit.value in colours
    elif t == "shape":
        value = edit.value in shapes
    elif t == "size":
        want, other = (_BIGGER | {"large"}, _SMALLER | {"small"}) if edit.value == "large" else \
            (_SMALLER | {"small"}, _BIGGER | {"large"})
        value = bool(ws & want) and not (ws & other - {"small", "large"})
    elif t == "move":
        value = edit.value in places
    elif t == "add":
        new: Obj = edit.value
        value = new.colour in colours and new.shape in shapes
    elif t == "remove":
        value = removes
    else:  # background
        value = "background" in ws and edit.value in bgs

    # the object: the attribute words left once the new value is set aside must single it out.
    # Only words some object of the reference has can refer to one; the others are claimed new
    # values ("make the star green": green is a wrong value, the star is still the right object).
    if t in ("add", "background"):
        obj_ok = True
    else:
        target = ref.at(edit.position)
        have = {a: {getattr(o, a) for o in ref.objects} for a in ("colour", "shape", "position", "size")}
        ref_colours = [c for c in colours if c in have["colour"] and not (t == "colour" and c == edit.value)]
        ref_shapes = [s for s in shapes if s in have["shape"] and not (t == "shape" and s == edit.value)]
        ref_places = [p for p in places if p in have["position"]]
        sizes = [w for w in words if w in SIZES and not (t == "size" and w == edit.value)]

        def fits(o: Obj) -> bool:
            return (all(c == o.colour for c in ref_colours) and all(s == o.shape for s in ref_shapes)
                    and all(p == o.position for p in ref_places) and all(z == o.size for z in sizes))

        named = bool(ref_colours or ref_shapes or ref_places or sizes)
        fitting = [o for o in ref.objects if fits(o)]
        obj_ok = fitting == [target] and (named or len(ref.objects) == 1)

    # the kind: no words of another kind of change
    kind = True
    if t != "background" and "background" in ws:
        kind = False
    if t != "remove" and removes:
        kind = False
    if t != "add" and adds:
        kind = False
    if t != "move" and (ws & _MOVE or (t != "add" and [p for p in places if p not in {o.position for o in ref.objects}])):
        kind = False  # a move verb, or a place no object of the reference occupies (a destination)
    if t != "size" and resizes:
        kind = False
    return InstructionScore(edit=t, value=bool(value), object=bool(obj_ok), kind=kind)


def score_triplet(record: dict[str, Any]) -> InstructionScore | None:
    """Score a ``triplets.jsonl`` record from its two synth captions (None: not one synth edit apart).

    synth's own triplets carry the edit in ``edit_args``; LLM triplets are scored against
    the edit their captions imply.
    """
    ref = parse_caption(record.get("reference_caption") or "")
    tgt = parse_caption(record.get("target_caption") or "")
    if ref is None or tgt is None:
        return None
    args = record.get("edit_args") or (record.get("extra") or {}).get("edit_args")
    edit = Edit.from_dict(args) if args else edit_between(ref, tgt)
    if edit is None:
        return None
    return score_instruction(record.get("instruction") or "", ref, edit)


def summarize(scores: list[InstructionScore | None]) -> dict[str, Any]:
    """Rates over the scored instructions (``None`` entries counted as ``not_one_edit``), overall and per edit type."""
    done = [s for s in scores if s is not None]
    out: dict[str, Any] = {"scored": len(done), "not_one_edit": len(scores) - len(done)}
    for key in ("correct", "value", "object", "kind"):
        out[key] = round(sum(getattr(s, key) for s in done) / len(done), 4) if done else None
    by_type: dict[str, list[InstructionScore]] = {}
    for s in done:
        by_type.setdefault(s.edit, []).append(s)
    out["correct_by_edit"] = {k: round(sum(s.correct for s in v) / len(v), 4) for k, v in sorted(by_type.items())}
    return out
