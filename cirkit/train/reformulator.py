"""Fine-tuning the reformulator: LoRA on a causal LM, (caption A, caption B -> edit) examples.

Seed 001 §II-A LoRA-fine-tunes its reformulation LLM on seed data before it writes the
training instructions; ``cirkit train --backbone reformulator triplets.jsonl`` does that for
any transformers causal LM (default: the offline SmolLM2-135M-Instruct GGUF, dequantized
to float32 by transformers' GGUF path). The examples are triplet records: their
``reference_caption``, ``target_caption`` and ``instruction`` fields (synth's ground truth
has them). Examples whose instruction ``reformulate``'s post-filters would reject are left
out (counted): the model should not learn to write what is then thrown away.

The tuned model is asked with a short prompt and no worked examples (:data:`TUNED_SYSTEM`,
:data:`TUNED_PROMPT`): it has learned the task, and a prompt of ~40 tokens instead of
~250 makes every pair's prefill cheap. The loss is cross-entropy on the answer tokens
only, and the 49k-word output layer is applied at those positions only (over every prompt
token it would be most of a step's memory and time).

The checkpoint folder holds the peft adapter (``adapter_config.json``,
``adapter_model.safetensors``) and a ``config.json`` of backbone ``reformulator`` naming the
base model, the prompt and system message it was tuned with, and the caption pairs it
was trained on: ``cirkit reformulate -m <folder>`` uses that prompt and never writes for
those pairs, so the pairs it writes for stay apart from its seed data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cirkit.errors import CirkitError, RecordError
from cirkit.train.plugin import TrainConfig, TrainPlugin

log = logging.getLogger("cirkit")

TUNED_SYSTEM = "Edit A into B."
TUNED_PROMPT = "A: {reference}\nB: {target}"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIELDS = ("reference_caption", "target_caption", "instruction")
# TrainConfig's --model default names the vit backbone's architecture; for the reformulator
# it means "no model given": the offline SmolLM2.
VIT_DEFAULT_MODEL = "cirkit-small"


def seed_pair(reference_caption: str, target_caption: str) -> list[str]:
    """How a trained (caption A, caption B) pair is recorded and recognised (case/punctuation-free)."""
    from cirkit.reformulate import normalize

    return [normalize(reference_caption), normalize(target_caption)]


class ReformulatorTrainModel(torch.nn.Module):
    """The peft causal LM with a forward that returns the answer-token loss (all work inside ``forward`` for DDP)."""

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.lm = peft_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        base = self.lm.get_base_model()
        hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        where = labels[:, 1:] != -100
        logits = base.lm_head(hidden[:, :-1][where]).float()
        return F.cross_entropy(logits, labels[:, 1:][where])


class ReformulatorTrainPlugin(TrainPlugin):
    """LoRA fine-tuning of a causal LM that writes edit instructions (``--backbone reformulator``)."""

    name = "reformulator"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        if config.stage != "2":
            raise CirkitError(f"--stage {config.stage}: the reformulator trains on triplets only; drop --stage "
                              "(or pass --stage 2)")
        if config.init:
            raise CirkitError("--init: the reformulator starts from its base model (--model); drop --init")
        if config.full_finetune:
            raise CirkitError("--full-finetune: the reformulator is LoRA-tuned only; drop --full-finetune")
        model = config.model if config.model != VIT_DEFAULT_MODEL else None
        from cirkit.generation import causal_lm_ref

        self.model_arg = model
        base, self.gguf_file, self.model_name = causal_lm_ref(model)  # locates it, loads nothing
        # A local folder is recorded absolute: `reformulate -m` may run from another directory.
        self.base_model = str(Path(base).resolve()) if base and Path(base).is_dir() else base
        self.tokenizer: Any = None
        self.seed_pairs: list[list[str]] = []

    def build(self) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        from cirkit.backbones.mllm import peft_quiet
        from cirkit.generation import load_causal_lm

        c = self.config
        # float32 on the CPU: the GGUF is dequantized, and LoRA needs real gradients.
        lm = load_causal_lm(self.base_model, self.gguf_file, device="cpu", precision="fp32",
                            trust_remote_code=c.trust_remote_code)
        self.tokenizer = lm.tokenizer
        model = lm.model
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        wanted = list(c.lora_target_modules or DEFAULT_LORA_TARGETS)
        use = [w for w in wanted if w in present and w != "lm_head"]
        if not use:
            raise CirkitError(f"none of the LoRA target modules {', '.join(wanted)} exist in {self.model_name}; "
                              f"choose from {', '.join(sorted(present - {'lm_head'}))} with --lora-target-modules")
        n_layers = int(model.config.num_hidden_layers)
        if c.lora_layers and c.lora_layers > n_layers:
            raise CirkitError(f"--lora-layers {c.lora_layers}: {self.model_name} has {n_layers} layers")
        # Only the top layers adapted: no parameter below them needs a gradient, so autograd stops
        # there and a step costs a forward pass plus the backward of those layers only.
        layers = list(range(n_layers - c.lora_layers, n_layers)) if c.lora_layers else None
        cfg = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=use,
                         layers_to_transform=layers, task_type="CAUSAL_LM")
        self.layers = layers
        with peft_quiet():
            pm = get_peft_model(model, cfg)
        self.targets = use
        return ReformulatorTrainModel(pm)

    def dataset(self):
        from cirkit.io import read_jsonl
        from cirkit.reformulate import ReformulateConfig, check

        c = self.config
        if c.data is None:
            raise CirkitError("no training data: pass DATA (a triplets.jsonl with reference_caption, "
                              "target_caption and instruction) or set 'data' in the recipe")
        path, tok = Path(c.data), self.tokenizer
        from cirkit.generation import chat_prompt

        rows: list[tuple[list[int], list[int]]] = []
        seen: set[tuple[str, str]] = set()
        rejected = 0
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj, dict):
                raise RecordError(path, lineno, "expected a JSON object")
            for f in FIELDS:
                if not isinstance(obj.get(f), str) or not obj[f].strip():
                    raise RecordError(path, lineno, "missing or empty; the reformulator learns "
                                      "(reference_caption, target_caption -> instruction)", f)
            a, b, text = obj["reference_caption"].strip(), obj["target_caption"].strip(), obj["instruction"].strip()
            if check(text, a, b, ReformulateConfig.max_words) is not None:  # reformulate's filters would reject it
                rejected += 1
                continue
            prompt = chat_prompt(tok, TUNED_PROMPT.format(reference=a, target=b), TUNED_SYSTEM)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            ans = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
            if len(p) + len(ans) > c.max_length:
                raise RecordError(path, lineno, f"{len(p) + len(ans)} tokens with the prompt, more than "
                                  f"--max-length {c.max_length}; raise --max-length", "instruction")
            rows.append((p, ans))
            key = tuple(seed_pair(a, b))
            if key not in seen:
                seen.add(key)
                self.seed_pairs.append(list(key))
        if rejected:
            log.warning("%s: %d examples left out: their instruction fails reformulate's filters", path, rejected)
        if not rows:
            raise CirkitError(f"{path}: no usable (caption A, caption B -> instruction) examples")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def collate(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for i, (p, a) in enumerate(batch):
                n = len(p) + len(a)
                ids[i, :n] = torch.tensor(p + a)
                mask[i, :n] = 1
                labels[i, len(p):n] = torch.tensor(a)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        return rows, collate

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return model(**batch), {}

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        from cirkit.backbones.mllm import peft_quiet
        from cirkit.checkpoint import write_config

        c = self.config
        wrapper = getattr(model, "module", model)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with peft_quiet():
            wrapper.lm.save_pretrained(str(folder), save_embedding_layers=False)  # LoRA only: no vocab check
        (folder / "README.md").unlink(missing_ok=True)  # peft's model card template, not ours
        write_config(
            folder, "reformulator",
            base_model=self.base_model, gguf_file=self.gguf_file, model_name=self.model_name,
            system=TUNED_SYSTEM, prompt=TUNED_PROMPT,
            lora={"r": c.lora_r, "alpha": c.lora_alpha, "target_modules": self.targets, "layers": self.layers},
            seed_pairs=self.seed_pairs,
        )


def load_reformulator(folder: str | Path, cfg: dict[str, Any], device: str | None = None,
                      precision: str | None = None, trust_remote_code: bool = False, engine: str = "hf"):
    """A reformulator checkpoint ready to generate: on ``hf`` its base model with the adapter merged
    in (decoding at the base model's speed); on ``llama-cpp`` the base GGUF with the adapter written
    as a llama.cpp GGUF adapter (applied at run time over the quantized weights)."""
    import tempfile

    from peft import PeftModel

    from cirkit.backbones.mllm import peft_quiet
    from cirkit.checkpoint import check_folder
    from cirkit.generation import load_causal_lm, load_llama_cpp, write_lora_gguf

    check_folder(folder, "reformulator")
    if engine == "llama-cpp" and not cfg.get("gguf_file"):
        raise CirkitError(f"{folder}: tuned on {cfg['base_model']}, not a GGUF file: --engine llama-cpp cannot run it; "
                          "use --engine hf")
    lm = load_causal_lm(cfg["base_model"], cfg.get("gguf_file"), device if engine == "hf" else "cpu",
                        precision if engine == "hf" else None, trust_remote_code)
    try:
        with peft_quiet():
            model = PeftModel.from_pretrained(lm.model, str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CirkitError(f"{folder}: cannot apply its adapter to {cfg['base_model']} ({msg}); "
                          "was it trained on that base model?") from None
    if engine == "llama-cpp":
        with tempfile.TemporaryDirectory(prefix="cirkit-adapter-") as tmp:  # read once, at load
            adapter = write_lora_gguf(model, Path(tmp) / "adapter.gguf")
            cpp = load_llama_cpp(cfg["base_model"], cfg["gguf_file"], lora_path=adapter)
        cpp.model_id = str(folder)
        return cpp
    lm.model = model.merge_and_unload().eval()
    lm.model_id = str(folder)
    return lm
