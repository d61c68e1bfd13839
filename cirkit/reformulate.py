"""``cirkit reformulate``: pair captioned images and write a modification instruction per pair.

Stage 2 of the paper's data pipeline (section II-A): from ``captions.jsonl`` to
``triplets.jsonl`` with no human annotation.

1. **Pairing** (deterministic given the captions file, ``seed`` and ``count``):
   ``random`` (any two images), ``same-group`` (images sharing ``--group-field``, or the
   record's ``group``, or else the image's parent folder; ``--group-depth N`` keeps the first
   N folders of that path, so a nested tree pairs at a chosen level: the paper pairs
   Fashion200k within its 5 meta classes, section IV-A, not within one product's photos) and ``similar`` (caption cosine similarity within ``[min_sim, max_sim]``, from a
   sentence embedding model; the paper notes pairs that are too dissimilar give poor
   instructions), and ``close`` (captions a few words apart: at most ``max_word_changes`` words
   replaced, or one phrase added or removed; seed 001 §V's fine-grained
   differences between images that share most of their content, found without any model).
   Pairs are drawn round-robin over a shuffled image order, at most
   ``max_pairs_per_image`` per reference image; pairs with identical captions are never drawn.
2. **Generation**: an instruction-tuned causal LM with its chat template (any transformers
   model by hub id or folder, or a GGUF file; offline default SmolLM2-135M-Instruct), batched
   and left-padded, or the rule-based ``template`` generator (a structured caption diff; the
   paper's "Temp." baseline).
3. **Post-filters**, in order, each counted: ``empty``, ``special_chars``, ``too_long``
   (more than ``max_words`` words), ``copy`` (the instruction equals either caption),
   ``duplicate`` (same reference image and same instruction as an accepted triplet: one
   query with two different targets is contradictory training data). Rejected outputs go to
   ``<output stem>.rejected.jsonl`` with the reason.

Exactly-once: the triplet id is ``<reference id>__<target id>`` with ``%`` and ``_`` escaped where
needed so two pairs never share one (:func:`cirkit.records.triplet_id`); accepted and rejected
pairs are both appended record by record through :class:`~cirkit.io.JsonlAppender`, so a re-run
after a crash regenerates only pairs that are in neither file. One run writes an output at a
time (its lock and its ``.rejected.jsonl``'s are held for the run), and what is done is read
before any model is loaded: a re-run with nothing left to do loads none (``--pairing similar``
keeps the pairs it drew in a hidden ``.<output>.pairs.json`` for that).

Prompt: ``--prompt`` names a preset of :data:`PROMPT_PRESETS` or gives the text (placeholders
``{reference}`` and ``{target}``; no system message or examples unless ``--system``). ``cirkit``
(the default) is :data:`DEFAULT_PROMPT`, our own wording (two captions in, one edit instruction
of at most 12 words out, starting with a verb) after a system message and three worked examples
as chat turns (:data:`DEFAULT_EXAMPLES`): small models need them. ``paper`` is Table I's
reformulation prompt verbatim (:data:`PAPER_PROMPT`), zero-shot as in section II-A: no system
message, no examples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirkit.config import (
    UsageError,
    batch_size_setting,
    check_settings,
    device_setting,
    num_beams_setting,
    precision_setting,
    sampling_temperature_setting,
    setting,
    top_p_setting,
    trust_remote_code_setting,
    wait_setting,
)
from cirkit.device import shard_of
from cirkit.errors import CirkitError, RecordError
from cirkit.io.atomic import check_file_output, is_stdio
from cirkit.io.jsonl import JsonlAppender, check_not_input, check_output_kind, iter_complete, read_records
from cirkit.io.shards import jsonl_shard, parts
from cirkit.records import Caption, Triplet, output_dir, relative_path, resolve_path, triplet_id
from cirkit.summary import Rate, StageResult, make_progress, timed

log = logging.getLogger("cirkit")

PAIRINGS = ("random", "same-group", "similar", "close")
GENERATORS = ("llm", "template")
ENGINES = ("hf", "llama-cpp")
FILTERS = ("empty", "special_chars", "too_long", "copy", "duplicate")

DEFAULT_SYSTEM = "You write short, precise image editing instructions."
# Our own wording (the paper's Table I prompt was not retrievable): see the module docstring.
# The task comes first and the captions last: the constant head is then part of the prompt
# prefix whose KV cache is shared by every pair (see generation.shared_prefix).
DEFAULT_PROMPT = (
    "In at most 12 words, tell an editor how to turn image A into image B. "
    "Start with a verb such as make, change, add, remove or move. Reply with the instruction only.\n"
    "Caption of image A: {reference}\n"
    "Caption of image B: {target}"
)
# Worked examples given as earlier chat turns with the default prompt. Small models (SmolLM2-135M)
# answer with a sentence about the task without them (all rejected as too long on synth), and
# copy the example text when it is inlined in the prompt instead.
DEFAULT_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("a cup and a plate on a table", "a plate on a table", "remove the cup"),
    ("a lamp on the left of a sofa", "a lamp on the right of a sofa", "move the lamp to the right"),
    ("a red car on a street", "a blue car on a street", "make the car blue"),
)
# Table I (bottom), verbatim; only its placeholders "{Caption A}" / "{ Caption B }" are spelled
# {reference} / {target}. The paper uses it zero-shot (section II-A), so no system message or examples.
PAPER_PROMPT = (
    "You have two captions for two images, image A and image B, you are supposed to write a reformulation text "
    "describing changing from image A to image B. caption A: {reference} caption B: {target} answer should be "
    "concise and within 12 words, only contain normal words, do not use special characters. Difference:"
)


@dataclass(frozen=True)
class PromptPreset:
    """A named prompt: the user message (with {reference}/{target}), its system message and worked examples."""

    prompt: str
    system: str | None = None
    examples: tuple[tuple[str, str, str], ...] = ()


# ``--prompt NAME``: the one place reformulation prompts are named (recipes say ``prompt: paper``).
PROMPT_PRESETS: dict[str, PromptPreset] = {
    "cirkit": PromptPreset(DEFAULT_PROMPT, DEFAULT_SYSTEM, DEFAULT_EXAMPLES),
    "paper": PromptPreset(PAPER_PROMPT),
}


@dataclass
class ReformulateConfig:
    """Settings of ``cirkit reformulate`` (CLI flags, recipe keys and Python arguments alike)."""

    captions: Path | None = setting(
        None, positional=True, metavar="CAPTIONS", stdio="in",
        help="captions.jsonl (from `cirkit caption` or `cirkit synth`).")
    output: Path = setting(Path("triplets.jsonl"), short="-o", stdio="out",
                           help="Triplets JSONL to write or resume (with '-', rejected pairs are counted, not written).")
    generator: str = setting("llm", short="-g", choices=GENERATORS,
                             help="llm, or template (rule-based, no model).")
    model: str | None = setting(None, short="-m", show_default="offline SmolLM2-135M-Instruct",
                                help="Causal LM hub id or folder.")
    gguf_file: str | None = setting(None, help="A GGUF file (path, or name inside --model).")
    prompt: str | None = setting(None, show_default="cirkit",
                                 help="A preset (cirkit: ours, with worked examples; paper: Table I's, zero-shot) "
                                      "or the user prompt with {reference} and {target} placeholders.")
    system: str | None = setting(None, help="System message for the chat template.")
    pairing: str = setting("random", choices=PAIRINGS,
                           help="How captions are paired: random, same-group, similar, close (a few words apart).")
    group_field: str | None = setting(None, show_default="group, else the parent folder",
                                      help="same-group: caption field to group by.")
    group_depth: int | None = setting(None, ge=1, show_default="the whole path",
                                      help="same-group: group by the first N folders of the group path (the folder "
                                           "below the image root that `cirkit caption FOLDER` records; 1 = top).")
    min_sim: float = setting(0.5, ge=-1, le=1, help="similar: lowest caption cosine.")
    max_sim: float = setting(0.95, ge=-1, le=1, help="similar: highest caption cosine.")
    embed_model: str | None = setting(None, show_default="offline all-MiniLM-L6-v2",
                                      help="similar: text embedding model.")
    # seed 001 §V: CIR queries name fine-grained differences between images that share most of
    # their content; a pair apart in many attributes gets an instruction naming one of them.
    max_word_changes: int = setting(1, ge=1, help="close: most words replaced between the two captions "
                                                  "(or else one phrase added or removed).")
    count: int = setting(1000, ge=1, short="-n", help="Pairs to draw.")
    seed: int = setting(0, ge=0, help="Pairing (and sampling) seed.")
    max_pairs_per_image: int = setting(2, ge=1, help="Most pairs with the same reference image.")
    max_words: int = setting(12, ge=1, help="Word limit of an instruction.")
    max_new_tokens: int = setting(32, ge=1, help="Longest reply in tokens.")
    temperature: float = sampling_temperature_setting()
    top_p: float = top_p_setting()
    num_beams: int = num_beams_setting()
    batch_size: int = batch_size_setting(16, "Prompts", aliases=("-b",))
    device: str | None = device_setting()
    precision: str | None = precision_setting(aliases=("--dtype",))
    trust_remote_code: bool = trust_remote_code_setting()
    wait: bool = wait_setting()
    # Same prompts, greedy decoding, stop token and filters on either engine; llama-cpp reads GGUF
    # files only, on CPU, and needs the optional llama-cpp-python (its wheel builds from source).
    engine: str = setting("hf", choices=ENGINES,
                          help="hf (transformers; every model) or llama-cpp (GGUF files on CPU; "
                               "pip install llama-cpp-python).")

    def __post_init__(self) -> None:
        check_settings(self)

    def validate(self) -> None:
        if self.captions is None:
            raise UsageError("give a captions.jsonl to reformulate (e.g. the output of `cirkit caption`)")
        if self.pairing not in PAIRINGS:
            raise CirkitError(f"--pairing {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")
        if self.generator not in GENERATORS:
            raise CirkitError(f"--generator {self.generator!r}: choose one of {', '.join(GENERATORS)}")
        if self.count < 1 or self.max_pairs_per_image < 1 or self.batch_size < 1 or self.max_words < 1:
            raise CirkitError("--count, --max-pairs-per-image, --batch-size and --max-words must be at least 1")
        if not -1.0 <= self.min_sim <= self.max_sim <= 1.0:
            raise CirkitError(f"--min-sim {self.min_sim} / --max-sim {self.max_sim}: need -1 <= min <= max <= 1")
        if self.group_depth is not None and self.pairing != "same-group":
            raise CirkitError(f"--group-depth applies to --pairing same-group only (got --pairing {self.pairing}); "
                              "leave --group-depth out, or remove group_depth from the recipe")
        if self.prompt is not None and self.prompt not in PROMPT_PRESETS:
            for ph in ("{reference}", "{target}"):
                if ph not in self.prompt:
                    raise CirkitError(f"--prompt must be a preset ({', '.join(PROMPT_PRESETS)}) or contain the "
                                      f"placeholders {{reference}} and {{target}} (missing {ph})")


def rejected_path(output: Path) -> Path:
    """Where rejected generations go: ``triplets.jsonl`` -> ``triplets.rejected.jsonl``."""
    return output.with_name(output.name[: -len(".jsonl")] + ".rejected.jsonl" if output.name.endswith(".jsonl")
                            else output.name + ".rejected.jsonl")


def pair_id(ref_id: str, tgt_id: str) -> str:
    """The triplet id of (reference, target): see :func:`cirkit.records.triplet_id` (never ambiguous)."""
    return triplet_id(ref_id, tgt_id)


# --------------------------------------------------------------------------- text helpers


_ARTICLE = re.compile(r"^(a|an|the)\s+", re.I)
_SPECIAL = re.compile(r"[^\w\s,.'\-]|_")


def normalize(text: str) -> str:
    """Lowercase, punctuation-free, single-spaced, without a leading article (for comparisons)."""
    t = re.sub(r"[^\w\s]", " ", text.lower())
    t = re.sub(r"\s+", " ", t).strip()
    return _ARTICLE.sub("", t)


def clean_output(text: str) -> str:
    """The instruction inside an LLM reply: first line, no label, no quotes, no final period."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    t = lines[0] if lines else ""
    t = re.sub(r"^(instruction|answer|output|edit|response)\s*:\s*", "", t, flags=re.I)
    t = t.strip().strip("\"'`“”‘’").strip()
    t = re.sub(r"^[-*•]\s*", "", t)
    return t.rstrip(".").strip()


def check(instruction: str, ref_caption: str, tgt_caption: str, max_words: int) -> str | None:
    """The first post-filter ``instruction`` fails (``duplicate`` is checked by the caller), or None."""
    if not instruction.strip():
        return "empty"
    if _SPECIAL.search(instruction):
        return "special_chars"
    if len(instruction.split()) > max_words:
        return "too_long"
    n = normalize(instruction)
    if n in (normalize(ref_caption), normalize(tgt_caption)):
        return "copy"
    return None


# --------------------------------------------------------------------------- pairing


def _group_of(rec: Caption, group_field: str | None) -> str | None:
    if group_field:
        value = getattr(rec, group_field, None) if group_field in ("group", "model") else rec.extra.get(group_field)
        return None if value is None else str(value)
    if rec.group is not None:
        return rec.group
    return Path(rec.image).parent.as_posix()


def group_keys(captions: list[Caption], group_field: str | None = None,
               group_depth: int | None = None) -> list[str | None]:
    """Each caption's ``same-group`` key (None: paired with nobody).

    ``group_depth`` N keeps the first N folders of the group path. It counts from the image root,
    so it needs a path that starts there: ``--group-field``'s value or the record's ``group`` (the
    folder below the root that ``cirkit caption FOLDER`` writes), never the image path as written
    in the captions file, which starts wherever that file lies. On Fashion200k
    (``women/<meta class>/<category>/<product>/``) N=2 pairs within a meta class as the paper
    did (section IV-A); the whole path pairs photos of one product.
    """
    if group_depth is None:
        return [_group_of(c, group_field) for c in captions]
    raw = [_group_of(c, group_field) if group_field else c.group for c in captions]
    if all(g is None for g in raw):
        where = f"a {group_field!r} field" if group_field else "a 'group' (the folder below the image root)"
        raise CirkitError(f"--group-depth {group_depth}: none of the {len(captions)} captions has {where} to count "
                          "folders in; caption the image folder with `cirkit caption FOLDER`, or give --group-field")
    keys: list[str | None] = []
    shallow: list[tuple[str, str | None]] = []
    for c, g in zip(captions, raw, strict=True):
        parts = [] if g is None else [part for part in g.split("/") if part not in ("", ".")]
        keys.append("/".join(parts[:group_depth]) if len(parts) >= group_depth else None)
        if keys[-1] is None:
            shallow.append((c.id, g))
    if len(shallow) == len(captions):
        raise CirkitError(f"--group-depth {group_depth}: no caption's group is {group_depth} folders deep (e.g. "
                          f"{shallow[0][0]!r} in group {shallow[0][1]!r}); give a smaller --group-depth")
    if shallow:
        log.warning("--group-depth %d: %d captions are not %d folders deep and are paired with nobody "
                    "(e.g. %r in group %r)", group_depth, len(shallow), group_depth, *shallow[0])
    return keys


def _similar_candidates(vectors, min_sim: float, max_sim: float, rng: random.Random, cap: int = 256,
                        chunk: int = 1024) -> list[list[int]]:
    """For each row, the other rows whose cosine similarity lies in the band (at most ``cap``, sampled)."""
    import torch

    n = vectors.shape[0]
    out: list[list[int]] = []
    for start in range(0, n, chunk):
        sims = vectors[start : start + chunk] @ vectors.T
        band = (sims >= min_sim) & (sims <= max_sim)
        rows = torch.arange(sims.shape[0])
        band[rows, rows + start] = False
        for r in range(sims.shape[0]):
            idx = torch.nonzero(band[r]).flatten().tolist()
            if len(idx) > cap:
                idx = sorted(rng.sample(idx, cap))
            out.append(idx)
    return out


_WORD = re.compile(r"[^\W_]+")


def caption_units(text: str) -> list[str]:
    """A caption's word bigrams (with start and end marks) as a multiset of units (``a b#k``: the k-th use).

    Bigrams keep word order: the same words in other phrases ("a red star and a blue circle"
    vs "a blue star and a red circle") are not close. One replaced word changes two bigrams.
    """
    words = ["<s>", *_WORD.findall(text.lower()), "</s>"]
    seen: dict[str, int] = defaultdict(int)
    units = []
    for a, b in zip(words, words[1:], strict=False):
        units.append(f"{a} {b}#{seen[a + ' ' + b]}")
        seen[a + " " + b] += 1
    return units


def _close_candidates(captions: list[str], max_changes: int, max_phrase: int = 10, rng: random.Random | None = None,
                      cap: int = 256, chunk: int = 1024) -> list[list[int]]:
    """For each caption, the others a few words away: at most ``max_changes`` words replaced, or
    else one phrase of up to ``max_phrase`` words (an object) added or removed, not both.

    Bigram counts by multiset overlap, all pairs at once as a product of 0/1 unit matrices.
    """
    import torch

    units = [caption_units(c) for c in captions]
    vocab = {u: k for k, u in enumerate(sorted({u for us in units for u in us}))}
    x = torch.zeros((len(units), max(1, len(vocab))))
    for i, us in enumerate(units):
        x[i, [vocab[u] for u in us]] = 1.0
    lens = x.sum(1)
    out: list[list[int]] = []
    for start in range(0, len(units), chunk):
        overlap = x[start : start + chunk] @ x.T
        only_a = lens[start : start + chunk, None] - overlap   # words of A not in B
        only_b = lens[None, :] - overlap                       # words of B not in A
        # A replaced word changes 2 bigrams on each side. An added phrase of n words adds about
        # n + 1 bigrams to one side and breaks at most 1 on the other (where it is spliced in).
        replaced = (only_a <= 2 * max_changes) & (only_b <= 2 * max_changes)
        phrase = (torch.minimum(only_a, only_b) <= 1) & (torch.maximum(only_a, only_b) <= max_phrase + 2)
        near = (replaced | phrase) & ((only_a + only_b) > 0)
        for r in range(near.shape[0]):
            idx = torch.nonzero(near[r]).flatten().tolist()
            if len(idx) > cap and rng is not None:
                idx = sorted(rng.sample(idx, cap))
            out.append(idx)
    return out


def sample_pairs(captions: list[Caption], pairing: str, count: int, seed: int, max_pairs_per_image: int,
                 group_field: str | None = None, vectors=None, min_sim: float = 0.5,
                 max_sim: float = 0.95, group_depth: int | None = None, skip: set[tuple[str, str]] | frozenset = frozenset(),
                 max_word_changes: int = 1) -> list[tuple[int, int]]:
    """Deterministic ``(reference index, target index)`` pairs; a larger ``count`` extends a smaller one.

    ``skip``: (caption A, caption B) pairs, :func:`normalize`-d, never drawn (a tuned
    reformulator's seed pairs: it writes only for pairs it was not trained on).
    """
    rng = random.Random(seed)
    n = len(captions)
    norm = [normalize(c.caption) for c in captions]
    candidates: list[list[int]] | None = None
    if pairing == "same-group":
        groups: dict[str, list[int]] = defaultdict(list)
        keys = group_keys(captions, group_field, group_depth)
        for i, g in enumerate(keys):
            if g is not None:
                groups[g].append(i)
        candidates = [[j for j in groups[keys[i]] if j != i] if keys[i] is not None else [] for i in range(n)]
    elif pairing == "similar":
        if vectors is None:
            raise ValueError("pairing 'similar' needs caption vectors")
        candidates = _similar_candidates(vectors, min_sim, max_sim, random.Random(seed + 1))
    elif pairing == "close":
        candidates = _close_candidates([c.caption for c in captions], max_word_changes, rng=random.Random(seed + 1))

    order = list(range(n))
    rng.shuffle(order)
    used: dict[int, set[int]] = defaultdict(set)
    pairs: list[tuple[int, int]] = []
    for _ in range(max_pairs_per_image):
        added = False
        for i in order:
            if len(pairs) >= count:
                return pairs
            j = None
            if candidates is None:  # random: rejection-sample, the full list would be n^2
                for _try in range(32):
                    k = rng.randrange(n)
                    if k != i and k not in used[i] and norm[k] != norm[i] and (norm[i], norm[k]) not in skip:
                        j = k
                        break
            else:
                free = [k for k in candidates[i]
                        if k not in used[i] and norm[k] != norm[i] and (norm[i], norm[k]) not in skip]
                if free:
                    j = rng.choice(free)
            if j is not None:
                used[i].add(j)
                pairs.append((i, j))
                added = True
        if not added:
            break
    return pairs


# --------------------------------------------------------------------------- template generator


_PREPS = {"in", "at", "on", "to", "with", "near", "under", "over", "beside", "behind", "next", "above", "below",
          "by", "inside", "outside", "against", "from", "of"}
_BG = re.compile(r",?\s+(?:on|against|in front of)\s+(?:a|an|the)\s+([^,]+?)\s+background$")


@dataclass(frozen=True)
class _Obj:
    attrs: tuple[str, ...]
    noun: str
    place: str = ""

    @property
    def np(self) -> str:
        return " ".join((*self.attrs, self.noun))


@dataclass
class _Scene:
    objects: list[_Obj] = field(default_factory=list)
    background: str | None = None


def parse_caption(text: str) -> _Scene | None:
    """Parse "a/an <attrs> <noun> [<place>]" phrases joined by ", " / " and ", plus ", on a X background"."""
    t = re.sub(r"\s+", " ", text.strip().lower().rstrip("."))
    scene = _Scene()
    m = _BG.search(t)
    if m:
        scene.background, t = m.group(1), t[: m.start()]
    for part in re.split(r",\s*(?:and\s+)?|\s+and\s+", t):
        words = re.findall(r"[\w'-]+", part)
        if words and words[0] in ("a", "an", "the", "one"):
            words = words[1:]
        if not words:
            continue
        k = next((i for i, w in enumerate(words) if w in _PREPS and i > 0), len(words))
        np_words, place = words[:k], " ".join(words[k:])
        scene.objects.append(_Obj(tuple(np_words[:-1]), np_words[-1], place))
    return scene if scene.objects or scene.background else None


def _a(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _dest(place: str) -> str:
    words = place.split()
    return " ".join(["to", *words[1:]]) if words and words[0] in _PREPS else place


def template_instruction(ref_caption: str, tgt_caption: str) -> str | None:
    """A rule-based instruction from a structured diff of two captions (None: no describable change)."""
    ref, tgt = parse_caption(ref_caption), parse_caption(tgt_caption)
    if ref is None or tgt is None:
        return None
    rest_r = list(ref.objects)
    rest_t = []
    for o in tgt.objects:
        if o in rest_r:
            rest_r.remove(o)
        else:
            rest_t.append(o)
    single = len(ref.objects) == 1
    clauses: list[str] = []

    def name(o: _Obj) -> str:
        if single:
            return "it"
        same_noun = sum(1 for x in ref.objects if x.noun == o.noun)
        return f"the {o.noun}" if same_noun == 1 else f"the {o.np}"

    if len(rest_r) == 1 and len(rest_t) == 1:
        r, t = rest_r[0], rest_t[0]
        who = name(r)
        new_attrs = [a for a in t.attrs if a not in r.attrs]
        if t.noun != r.noun:
            clauses.append(f"turn {who} into {_a(' '.join((*new_attrs, t.noun)))}" if who != "it"
                           else f"make it {_a(' '.join((*new_attrs, t.noun)))}")
        elif new_attrs:
            clauses.append(f"make {who} {' and '.join(new_attrs)}")
        elif set(t.attrs) != set(r.attrs):
            gone = [a for a in r.attrs if a not in t.attrs]
            clauses.append(f"make {who} not {' or '.join(gone)}")
        if t.place and t.place != r.place:
            it = who if not clauses else "it"
            clauses.append(f"move {it} {_dest(t.place)}" if r.place else f"put {it} {t.place}")
    else:
        # Pair removed and added objects only when they share a noun; the rest are add/remove.
        for r in rest_r:
            clauses.append(f"remove the {r.np}" if not single else f"remove the {r.noun}")
        for t in rest_t:
            clauses.append(f"add {_a(t.np)}" + (f" {t.place}" if t.place else ""))
    if tgt.background and tgt.background != ref.background:
        clauses.append(f"change the background to {tgt.background}")
    if not clauses:
        return None
    return " and ".join(clauses) if len(clauses) <= 2 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


# --------------------------------------------------------------------------- the stage


def _load_captions(path: Path) -> list[Caption]:
    caps = read_records(path, Caption)
    if not caps:
        raise CirkitError(f"{path}: no captions to pair")
    empty = [c.id for c in caps if not c.caption.strip()]
    if empty:
        log.warning("%d captions are empty and are left out (e.g. %s)", len(empty), empty[0])
    return [c for c in caps if c.caption.strip()]


@dataclass
class _Prompting:
    """What the LLM is asked: the user prompt, the system message and the worked examples."""

    prompt: str
    system: str | None
    examples: list[tuple[str, str]]
    shots: tuple[tuple[str, str, str], ...] = DEFAULT_EXAMPLES  # the examples as (caption A, caption B, answer)

    @classmethod
    def from_config(cls, config: ReformulateConfig) -> _Prompting:
        tuned = tuned_reformulator(config)
        if tuned is not None and config.prompt is None:  # the prompt it was tuned with, no worked examples
            return cls(tuned["prompt"], config.system if config.system is not None else tuned["system"], [], ())
        preset = PROMPT_PRESETS.get(config.prompt or "cirkit")
        if preset is None:  # the user's own text: no system message or examples unless --system
            return cls(config.prompt, config.system, [], ())
        system = config.system if config.system is not None else preset.system
        examples = [(preset.prompt.format(reference=a, target=b), c) for a, b, c in preset.examples]
        return cls(preset.prompt, system, examples, preset.examples)


def tuned_reformulator(config: ReformulateConfig) -> dict[str, Any] | None:
    """The ``config.json`` of ``--model`` when it is a fine-tuned reformulator (``cirkit train --backbone
    reformulator``), else None; another cirkit checkpoint there is an error naming it."""
    if config.generator != "llm" or not config.model or config.gguf_file:
        return None
    from cirkit.checkpoint import read_config

    cfg = read_config(config.model)
    if cfg is not None and cfg["backbone"] != "reformulator":
        raise CirkitError(f"{config.model}: a {cfg['backbone']} retrieval checkpoint, not a reformulator; pass a "
                          "causal LM or a folder from `cirkit train --backbone reformulator` as --model")
    return cfg


def _generator_record(config: ReformulateConfig, settings: Any, p: _Prompting) -> dict[str, Any]:
    """The ``generator`` field of every record: what made the instruction (checked on resume)."""
    if config.generator == "llm":
        from cirkit.generation import causal_lm_ref

        _, gguf_file, name = causal_lm_ref(config.model, config.gguf_file)  # names it, loads nothing
        tuned = tuned_reformulator(config)
        generator = {"type": "llm", "model": name, **({"gguf_file": gguf_file} if gguf_file else {}),
                     **({"base_model": tuned.get("model_name", tuned["base_model"]), "adapter": "lora"} if tuned else {}),
                     "prompt": p.prompt, "system": p.system,
                     "examples": [list(e) for e in p.shots],
                     "settings": settings.to_dict()}
    else:
        generator = {"type": "template", "model": "template", "prompt": None}
    generator.update(pairing=config.pairing, seed=config.seed)
    if config.pairing == "same-group":  # which groups the pairs come from (checked on resume)
        generator.update(group_field=config.group_field, group_depth=config.group_depth)
    if config.pairing == "close":
        generator.update(max_word_changes=config.max_word_changes)
    return generator


@dataclass
class _Done:
    """What the outputs already hold: pairs (by reference/target id), ids of records naming no pair, accepted keys."""

    pairs: set[tuple[str, str]] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    accepted: set[tuple[Any, str]] = field(default_factory=set)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair in self.pairs or pair_id(*pair) in self.ids


def _scan_outputs(out: Path, rej: Path | None, generator: dict[str, Any]) -> _Done:
    """Read both outputs once: refuse another generator's records, collect what is done.

    Pairs are recognised by the ``reference_id``/``target_id`` fields every record carries,
    not by parsing ids: ids written before :func:`~cirkit.records.triplet_id` escaped ``__``
    were ambiguous, and this way outputs of either scheme resume. A torn last line (a crash
    mid-write) is passed over here and cut when the output is opened for appending.
    """
    done = _Done()
    files = [p for p in (out, rej) if p is not None and not is_stdio(p)]  # stdout: nothing to resume
    for path in [f for base in files for f in (base, *parts(base))]:  # part files: a multi-process run's
        for n, (lineno, obj) in enumerate(iter_complete(path)):
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, "expected a JSON object")
            if n == 0:
                _check_same_generator(path, lineno, obj, generator)
            ref_id, tgt_id = obj.get("reference_id"), obj.get("target_id")
            if isinstance(ref_id, str) and isinstance(tgt_id, str):
                done.pairs.add((ref_id, tgt_id))
            elif "id" in obj:  # a record without them (made by hand): known by its id only
                done.ids.add(str(obj["id"]))
            if path.name.startswith(out.name) and isinstance(obj.get("instruction"), str):
                done.accepted.add((obj.get("reference"), normalize(obj["instruction"])))
    return done


def _check_same_generator(path: Path, lineno: int, obj: dict[str, Any], generator: dict[str, Any]) -> None:
    """Refuse to resume outputs written by another generator: the union would be inconsistent."""
    prev = obj.get("generator") or {}
    if not isinstance(prev, dict):
        raise RecordError(path, lineno, f"expected an object, got {prev!r:.60}", "generator")
    for key in ("type", "model", "prompt", "pairing", "group_field", "group_depth"):
        if key in prev and prev.get(key) != generator.get(key):
            raise CirkitError(
                f"{path}:{lineno}: written with {key} {prev.get(key)!r}, not {generator.get(key)!r}; "
                f"write to a new -o file (or delete it and its .rejected.jsonl) instead of resuming"
            )


def plan_path(output: Path) -> Path:
    """Where ``--pairing similar`` keeps the pairs it drew: a hidden file beside the output."""
    return output.with_name(f".{output.name}.pairs.json")


def _draw_pairs(config: ReformulateConfig, caps: list[Caption], out: Path) -> list[tuple[int, int]]:
    """The run's pairs. ``similar`` needs a text embedding model; the pairs it drew are kept beside
    the output, keyed by everything they depend on, so a re-run (after a crash, or with nothing
    left to do) neither loads that model nor embeds the captions again."""
    tuned = tuned_reformulator(config)
    skip = {(a, b) for a, b in tuned.get("seed_pairs", [])} if tuned else set()
    if skip:
        log.info("%s: leaving out the %d caption pairs it was tuned on", config.model, len(skip))
    if config.pairing != "similar":
        return sample_pairs(caps, config.pairing, config.count, config.seed, config.max_pairs_per_image,
                            config.group_field, group_depth=config.group_depth, skip=skip,
                            max_word_changes=config.max_word_changes)
    import hashlib

    from cirkit.io.atomic import atomic_write_json
    from cirkit.io.jsonl import read_json

    embed_model = config.embed_model
    if embed_model is None:
        from cirkit.text_embed import default_model_folder

        embed_model = default_model_folder()  # locates it, loads nothing
    key = hashlib.sha256(json.dumps({
        "captions": [[c.id, c.caption] for c in caps], "embed_model": embed_model, "count": config.count,
        "seed": config.seed, "max_pairs_per_image": config.max_pairs_per_image, "min_sim": config.min_sim,
        "max_sim": config.max_sim, **({"skip": sorted(skip)} if skip else {})}, ensure_ascii=False).encode("utf-8")).hexdigest()
    plan, index = plan_path(out), {c.id: n for n, c in enumerate(caps)}
    try:
        saved = read_json(plan) if plan.is_file() else None
    except CirkitError:
        saved = None  # ours and unreadable (a disk problem): drawn again below
    if isinstance(saved, dict) and saved.get("key") == key and not is_stdio(out):
        return [(index[r], index[t]) for r, t in saved["pairs"]]
    from cirkit.text_embed import TextEmbedder

    vectors = TextEmbedder(embed_model, config.device, config.trust_remote_code).encode([c.caption for c in caps])
    pairs = sample_pairs(caps, "similar", config.count, config.seed, config.max_pairs_per_image,
                         config.group_field, vectors, config.min_sim, config.max_sim, skip=skip)
    if not is_stdio(out):  # records streamed to stdout leave no files behind
        atomic_write_json(plan, {"key": key, "pairs": [[caps[i].id, caps[j].id] for i, j in pairs]}, indent=None)
    return pairs


def _no_pairs(config: ReformulateConfig, captions_path: Path) -> CirkitError:
    return CirkitError(
        f"{captions_path}: no pairs could be drawn with --pairing {config.pairing}"
        + (" (no two images share a group; set --group-field, or a smaller --group-depth)"
           if config.pairing == "same-group" else "")
        + (f" (no caption pair has a similarity in [{config.min_sim}, {config.max_sim}])"
           if config.pairing == "similar" else "")
        + (f" (no two captions are within {config.max_word_changes} replaced words; raise --max-word-changes)"
           if config.pairing == "close" else "")
    )


class _Instructions:
    """Raw instructions for batches of pairs: the template diff, or the LLM (loaded on first use)."""

    def __init__(self, config: ReformulateConfig, settings: Any, p: _Prompting, caps: list[Caption]):
        self.config, self.settings, self.p, self.caps = config, settings, p, caps
        self.lm: Any = None
        self.prefix: str | None = None

    def __call__(self, batch: list[tuple[int, int]]) -> list[str]:
        caps = self.caps
        if self.config.generator != "llm":
            return [template_instruction(caps[i].caption, caps[j].caption) or "" for i, j in batch]
        from cirkit.generation import chat_prompt, generate_texts, load_causal_lm, shared_prefix

        if self.lm is None:
            c = self.config
            tuned = tuned_reformulator(c)
            if tuned is not None:
                from cirkit.train.reformulator import load_reformulator

                self.lm = load_reformulator(c.model, tuned, c.device, c.precision, c.trust_remote_code, c.engine)
            else:
                self.lm = load_causal_lm(c.model, c.gguf_file, c.device, c.precision, c.trust_remote_code,
                                         engine=c.engine)
            # system + examples: prefilled once, reused by every batch
            self.prefix = shared_prefix(self.lm.tokenizer, self.p.system, self.p.examples, self.p.prompt)
        prompts = [chat_prompt(self.lm.tokenizer, self.p.prompt.format(reference=caps[i].caption.strip(),
                                                                       target=caps[j].caption.strip()),
                               self.p.system, self.p.examples)
                   for i, j in batch]
        return generate_texts(self.lm, prompts, self.settings, self.prefix)


def run(config: ReformulateConfig) -> StageResult:
    """Pair captions, generate instructions, filter them and append triplets (resumable).

    Holds the output's and its ``.rejected.jsonl``'s single-writer locks for the run (``wait``:
    queue behind another writer). What is already done is read before any model is loaded.

    Under ``accelerate launch`` every process draws the same pairs and writes those whose
    reference image falls to it (:func:`cirkit.device.shard_of`: all pairs of one reference in
    one process, so the duplicate filter sees what one process would) into its own part files,
    merged by the main process at the end (:func:`cirkit.io.shards.jsonl_shard`): the same
    records as one process, and a killed run continues every shard.
    """
    from cirkit.device import process_info
    from cirkit.generation import GenerationSettings

    config.validate()
    result = StageResult("reformulate")
    settings = GenerationSettings.from_config(config)
    settings.validate()
    captions_path, out = Path(config.captions), Path(config.output)
    rej = None if is_stdio(out) else rejected_path(out)  # -o -: rejects are counted, not written
    for path in (out, rej or out):  # before their lock files are made beside them
        check_file_output(path)
        check_not_input(path, captions_path)
    check_output_kind(out, Triplet)  # before its ids count as done
    proc = process_info()
    if is_stdio(out) and proc.world > 1:
        raise CirkitError("-o - streams triplets from one process; under accelerate launch write them to a file")
    wait = bool(config.wait)
    with timed(result), jsonl_shard(out, proc, wait, "triplets file") as shard, \
            (jsonl_shard(rej, proc, wait, "rejected-triplets file") if rej else contextlib.nullcontext()) as rshard:
        caps = _load_captions(captions_path)
        p = _Prompting.from_config(config)
        generator = _generator_record(config, settings, p)
        done = _scan_outputs(out, rej, generator)
        pairs = _shared_pairs(config, caps, out, proc)
        proc.wait()  # every process has read what is done before any appends
        result.counts["pairs"] = len(pairs)
        if not pairs:
            raise _no_pairs(config, captions_path)
        if len(pairs) < config.count:
            log.warning("only %d of the %d requested pairs exist under these settings", len(pairs), config.count)
        todo = [(i, j) for i, j in pairs if (caps[i].id, caps[j].id) not in done]
        result.counts["already_done"] = len(pairs) - len(todo)
        mine = [(i, j) for i, j in todo if shard_of(caps[i].id, proc.world) == proc.rank] if proc.world > 1 else todo
        counts = {"generated": 0, "written": 0, **{f"rejected_{f}": 0 for f in FILTERS}}
        duplicates: dict[str, int] = {}
        if mine:
            with JsonlAppender(shard.target) as writer, JsonlAppender(rshard.target if rshard else out) as rejected:
                _generate(config, caps, mine, _Instructions(config, settings, p, caps), done, writer,
                          rejected if rej else None, generator, captions_path.parent, output_dir(out), counts)
                for name, w in (("output", writer), ("rejected", rejected)):
                    if w.duplicates:
                        duplicates[f"duplicate_ids_in_{name}"] = len(w.duplicates)
        counts = _summed({**counts, **duplicates}, proc)
        if not todo:
            result.details["nothing_to_do"] = True
            log.info("%s: nothing to do: all %d pairs are already written or rejected", out, len(pairs))
        result.counts.update(counts)
        result.metrics["pass_rate"] = round(counts["written"] / counts["generated"], 4) if counts["generated"] else None
        result.details["generator"] = generator
        if proc.world > 1:
            result.details["processes"] = proc.world
        result.outputs = {"triplets": str(out), **({"rejected": str(rej)} if rej else {})}
    return result


def _shared_pairs(config: ReformulateConfig, caps: list[Caption], out: Path, proc: Any) -> list[tuple[int, int]]:
    """The run's pairs, drawn by the main process first (``similar`` keeps them in its plan file,
    which the other processes then read instead of embedding the captions again). ``random`` and
    ``same-group`` are cheap and deterministic: every process draws them, so a bad setting
    (``--group-depth`` deeper than the tree) is the same one-line error on every rank."""
    if config.pairing != "similar":
        return _draw_pairs(config, caps, out)
    pairs = _draw_pairs(config, caps, out) if proc.is_main else None
    proc.wait()
    return pairs if pairs is not None else _draw_pairs(config, caps, out)


def _summed(counts: dict[str, int], proc: Any) -> dict[str, int]:
    """Every process's counts added up (each counted its own share)."""
    if proc.world <= 1:
        return counts
    every = proc.gather(counts)
    return {k: sum(c.get(k, 0) for c in every) for k in dict.fromkeys(k for c in every for k in c)}


def _write_once(writer: JsonlAppender, record: Triplet | dict[str, Any]) -> None:
    """Append a record whose pair is not in the outputs; its id already being there is a collision."""
    if not writer.write(record):
        rid = record.id if isinstance(record, Triplet) else record["id"]
        raise CirkitError(
            f"{writer.path}: the id {rid!r} of a new pair is already used by another pair's record "
            "(written before ids were escaped); write to a new -o file"
        )


def _generate(config: ReformulateConfig, caps: list[Caption], todo: list[tuple[int, int]], instructions: _Instructions,
              done: _Done, writer: JsonlAppender, rejected: JsonlAppender | None, generator: dict[str, Any],
              src_dir: Path, out_dir: Path | None, counts: dict[str, int]) -> None:
    """Generate, filter and append every pair of ``todo``, adding to ``counts`` as records are written."""
    llm = config.generator == "llm"
    if llm:  # similar lengths in a batch waste less compute on padding
        todo = sorted(todo, key=lambda p: len(caps[p[0]].caption) + len(caps[p[1]].caption))
    rate = Rate("pair")
    bs = config.batch_size if llm else 256
    with make_progress() as progress:
        task = progress.add_task("reformulating", total=len(todo), rate="")
        for start in range(0, len(todo), bs):
            batch = todo[start : start + bs]
            for (i, j), text in zip(batch, instructions(batch), strict=True):
                ref, tgt = caps[i], caps[j]
                counts["generated"] += 1
                instruction = clean_output(text)
                reason = check(instruction, ref.caption, tgt.caption, config.max_words)
                ref_img = relative_path(resolve_path(ref.image, src_dir), out_dir)
                key = (ref_img, normalize(instruction))
                if reason is None and key in done.accepted:
                    reason = "duplicate"
                tid = pair_id(ref.id, tgt.id)
                if reason is not None:
                    counts[f"rejected_{reason}"] += 1
                    if rejected is None:  # -o -: counted only
                        continue
                    _write_once(rejected, {"id": tid, "reference_id": ref.id, "target_id": tgt.id, "reason": reason,
                                           "output": text, "instruction": instruction,
                                           "reference_caption": ref.caption, "target_caption": tgt.caption,
                                           "generator": generator})
                    continue
                done.accepted.add(key)
                _write_once(writer, Triplet(
                    id=tid, reference=ref_img, instruction=instruction,
                    target=relative_path(resolve_path(tgt.image, src_dir), out_dir),
                    reference_caption=ref.caption, target_caption=tgt.caption, source=f"reformulate-{config.generator}",
                    generator=generator, extra={"reference_id": ref.id, "target_id": tgt.id},
                ))
                counts["written"] += 1
            progress.update(task, advance=len(batch), rate=rate.add(len(batch)))
