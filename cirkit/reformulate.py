"""``cirkit reformulate``: pair captioned images and write a modification instruction per pair.

Stage 2 of the paper's data pipeline (section II-A): from ``captions.jsonl`` to
``triplets.jsonl`` with no human annotation.

1. **Pairing** (deterministic given the captions file, ``seed`` and ``count``):
   ``random`` (any two images), ``same-group`` (images sharing ``--group-field``, or the
   record's ``group``, or else the image's parent folder: like the paper's Fashion200k meta
   classes) and ``similar`` (caption cosine similarity within ``[min_sim, max_sim]``, from a
   sentence embedding model; the paper notes pairs that are too dissimilar give poor
   instructions). Pairs are drawn round-robin over a shuffled image order, at most
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

Exactly-once: the triplet id is ``<reference id>__<target id>``; accepted and rejected pairs
are both appended record by record through :class:`~cirkit.io.JsonlAppender`, so a re-run
after a crash regenerates only pairs that are in neither file.

Prompt: the paper's Table I text could not be retrieved here, so :data:`DEFAULT_PROMPT` is
our own wording in its spirit (two captions in, one short edit instruction of at most 12
words out), preceded by three worked examples as chat turns (:data:`DEFAULT_EXAMPLES`);
``--prompt`` replaces both (placeholders ``{reference}`` and ``{target}``).
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError, RecordError
from cirkit.io.jsonl import JsonlAppender, read_jsonl, read_records
from cirkit.records import Caption, Triplet, relative_path, resolve_path
from cirkit.summary import Rate, StageResult, make_progress, timed

log = logging.getLogger("cirkit")

PAIRINGS = ("random", "same-group", "similar")
GENERATORS = ("llm", "template")
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


@dataclass
class ReformulateConfig:
    """Settings of ``cirkit reformulate`` (CLI flags, recipe keys and Python arguments alike)."""

    captions: Path | None = None
    output: Path = Path("triplets.jsonl")
    generator: str = "llm"
    model: str | None = None
    gguf_file: str | None = None
    prompt: str | None = None
    system: str | None = None
    pairing: str = "random"
    group_field: str | None = None
    min_sim: float = 0.5
    max_sim: float = 0.95
    embed_model: str | None = None
    count: int = 1000
    seed: int = 0
    max_pairs_per_image: int = 2
    max_words: int = 12
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    # Decoding engine for --generator llm: hf (transformers; every model) or llama-cpp (GGUF files
    # only, CPU, needs llama-cpp-python). Same prompts, greedy decoding, stop token and filters.
    engine: str = "hf"

    def validate(self) -> None:
        if self.captions is None:
            raise CirkitError("give a captions.jsonl to reformulate (e.g. the output of `cirkit caption`)")
        if self.pairing not in PAIRINGS:
            raise CirkitError(f"--pairing {self.pairing!r}: choose one of {', '.join(PAIRINGS)}")
        if self.generator not in GENERATORS:
            raise CirkitError(f"--generator {self.generator!r}: choose one of {', '.join(GENERATORS)}")
        if self.count < 1 or self.max_pairs_per_image < 1 or self.batch_size < 1 or self.max_words < 1:
            raise CirkitError("--count, --max-pairs-per-image, --batch-size and --max-words must be at least 1")
        if not -1.0 <= self.min_sim <= self.max_sim <= 1.0:
            raise CirkitError(f"--min-sim {self.min_sim} / --max-sim {self.max_sim}: need -1 <= min <= max <= 1")
        if self.prompt is not None:
            for ph in ("{reference}", "{target}"):
                if ph not in self.prompt:
                    raise CirkitError(f"--prompt must contain the placeholders {{reference}} and {{target}} (missing {ph})")


def rejected_path(output: Path) -> Path:
    """Where rejected generations go: ``triplets.jsonl`` -> ``triplets.rejected.jsonl``."""
    return output.with_name(output.name[: -len(".jsonl")] + ".rejected.jsonl" if output.name.endswith(".jsonl")
                            else output.name + ".rejected.jsonl")


def pair_id(ref_id: str, tgt_id: str) -> str:
    return f"{ref_id}__{tgt_id}"


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


def sample_pairs(captions: list[Caption], pairing: str, count: int, seed: int, max_pairs_per_image: int,
                 group_field: str | None = None, vectors=None, min_sim: float = 0.5,
                 max_sim: float = 0.95) -> list[tuple[int, int]]:
    """Deterministic ``(reference index, target index)`` pairs; a larger ``count`` extends a smaller one."""
    rng = random.Random(seed)
    n = len(captions)
    norm = [normalize(c.caption) for c in captions]
    candidates: list[list[int]] | None = None
    if pairing == "same-group":
        groups: dict[str, list[int]] = defaultdict(list)
        keys = [_group_of(c, group_field) for c in captions]
        for i, g in enumerate(keys):
            if g is not None:
                groups[g].append(i)
        candidates = [[j for j in groups[keys[i]] if j != i] if keys[i] is not None else [] for i in range(n)]
    elif pairing == "similar":
        if vectors is None:
            raise ValueError("pairing 'similar' needs caption vectors")
        candidates = _similar_candidates(vectors, min_sim, max_sim, random.Random(seed + 1))

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
                    if k != i and k not in used[i] and norm[k] != norm[i]:
                        j = k
                        break
            else:
                free = [k for k in candidates[i] if k not in used[i] and norm[k] != norm[i]]
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


def _check_same_generator(paths: list[Path], generator: dict[str, Any]) -> None:
    """Refuse to resume outputs written by another generator: the union would be inconsistent."""
    for path in paths:
        if not path.exists() or not path.stat().st_size:
            continue
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, "expected a JSON object")
            prev = obj.get("generator") or {}
            for key in ("type", "model", "prompt", "pairing"):
                if key in prev and prev.get(key) != generator.get(key):
                    raise CirkitError(
                        f"{path}:{lineno}: written with {key} {prev.get(key)!r}, not {generator.get(key)!r}; "
                        f"write to a new -o file (or delete it and its .rejected.jsonl) instead of resuming"
                    )
            break


def run(config: ReformulateConfig) -> StageResult:
    """Pair captions, generate instructions, filter them and append triplets (resumable)."""
    from cirkit.generation import GenerationSettings

    config.validate()
    result = StageResult("reformulate")
    settings = GenerationSettings.from_config(config)
    settings.validate()
    captions_path = Path(config.captions)
    out = Path(config.output)
    rej = rejected_path(out)
    with timed(result):
        caps = _load_captions(captions_path)
        vectors = None
        if config.pairing == "similar":
            from cirkit.text_embed import TextEmbedder

            embedder = TextEmbedder(config.embed_model, config.device, config.trust_remote_code)
            vectors = embedder.encode([c.caption for c in caps])
        pairs = sample_pairs(caps, config.pairing, config.count, config.seed, config.max_pairs_per_image,
                             config.group_field, vectors, config.min_sim, config.max_sim)
        result.counts["pairs"] = len(pairs)
        if not pairs:
            raise CirkitError(
                f"{captions_path}: no pairs could be drawn with --pairing {config.pairing}"
                + (" (no two images share a group; set --group-field)" if config.pairing == "same-group" else "")
                + (f" (no caption pair has a similarity in [{config.min_sim}, {config.max_sim}])"
                   if config.pairing == "similar" else "")
            )
        if len(pairs) < config.count:
            log.warning("only %d of the %d requested pairs exist under these settings", len(pairs), config.count)

        prompt = config.prompt or DEFAULT_PROMPT
        system = config.system if config.system is not None else (DEFAULT_SYSTEM if config.prompt is None else None)
        examples = [(prompt.format(reference=a, target=b), c) for a, b, c in DEFAULT_EXAMPLES] \
            if config.prompt is None else []
        src_dir, out_dir = captions_path.parent, out.parent.resolve()
        counts = {"generated": 0, "written": 0, **{f"rejected_{f}": 0 for f in FILTERS}}
        with JsonlAppender(out) as writer, JsonlAppender(rej) as rejected:
            todo = [(i, j) for i, j in pairs
                    if pair_id(caps[i].id, caps[j].id) not in writer and pair_id(caps[i].id, caps[j].id) not in rejected]
            result.counts["already_done"] = len(pairs) - len(todo)
            lm = None
            if config.generator == "llm":
                from cirkit.generation import causal_lm_ref, load_causal_lm

                _, gguf_file, name = causal_lm_ref(config.model, config.gguf_file)
                generator = {"type": "llm", "model": name, **({"gguf_file": gguf_file} if gguf_file else {}),
                             "prompt": prompt, "system": system,
                             "examples": [list(e) for e in DEFAULT_EXAMPLES] if examples else [],
                             "settings": settings.to_dict()}
            else:
                generator = {"type": "template", "model": "template", "prompt": None}
            generator.update(pairing=config.pairing, seed=config.seed)
            _check_same_generator([out, rej], generator)
            if config.generator == "llm" and todo:  # nothing left to write: no model to load
                lm = load_causal_lm(config.model, config.gguf_file, config.device, config.dtype, config.trust_remote_code,
                                    engine=config.engine)
            accepted = set()
            for lineno, obj in read_jsonl(out) if out.stat().st_size else ():
                if not isinstance(obj, dict):
                    raise RecordError(out, lineno, "expected a JSON object")
                accepted.add((obj.get("reference"), normalize(obj.get("instruction", ""))))

            prefix = None

            def texts_for(batch):
                if lm is None:
                    return [template_instruction(caps[i].caption, caps[j].caption) or "" for i, j in batch]
                from cirkit.generation import chat_prompt, generate_texts, shared_prefix

                nonlocal prefix
                if prefix is None:  # system + examples: prefilled once, reused by every batch
                    prefix = shared_prefix(lm.tokenizer, system, examples, prompt)

                prompts = [chat_prompt(lm.tokenizer, prompt.format(reference=caps[i].caption.strip(),
                                                                   target=caps[j].caption.strip()),
                                       system, examples)
                           for i, j in batch]
                return generate_texts(lm, prompts, settings, prefix)

            if lm is not None:  # similar lengths in a batch waste less compute on padding
                todo.sort(key=lambda p: len(caps[p[0]].caption) + len(caps[p[1]].caption))
            rate = Rate("pair")
            bs = config.batch_size if lm is not None else 256
            with make_progress() as progress:
                task = progress.add_task("reformulating", total=len(todo), rate="")
                for start in range(0, len(todo), bs):
                    batch = todo[start : start + bs]
                    raw = texts_for(batch)
                    for (i, j), text in zip(batch, raw, strict=True):
                        ref, tgt = caps[i], caps[j]
                        counts["generated"] += 1
                        instruction = clean_output(text)
                        reason = check(instruction, ref.caption, tgt.caption, config.max_words)
                        ref_img = relative_path(resolve_path(ref.image, src_dir), out_dir)
                        key = (ref_img, normalize(instruction))
                        if reason is None and key in accepted:
                            reason = "duplicate"
                        tid = pair_id(ref.id, tgt.id)
                        if reason is not None:
                            counts[f"rejected_{reason}"] += 1
                            rejected.write({"id": tid, "reference_id": ref.id, "target_id": tgt.id, "reason": reason,
                                            "output": text, "instruction": instruction,
                                            "reference_caption": ref.caption, "target_caption": tgt.caption,
                                            "generator": generator})
                            continue
                        accepted.add(key)
                        writer.write(Triplet(
                            id=tid, reference=ref_img, instruction=instruction,
                            target=relative_path(resolve_path(tgt.image, src_dir), out_dir),
                            reference_caption=ref.caption, target_caption=tgt.caption, source=f"reformulate-{config.generator}",
                            generator=generator, extra={"reference_id": ref.id, "target_id": tgt.id},
                        ))
                        counts["written"] += 1
                    progress.update(task, advance=len(batch), rate=rate.add(len(batch)))
        result.counts.update(counts)
        result.metrics["pass_rate"] = round(counts["written"] / counts["generated"], 4) if counts["generated"] else None
        result.details["generator"] = generator
        result.outputs = {"triplets": str(out), "rejected": str(rej)}
    return result
