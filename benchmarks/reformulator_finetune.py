"""Seed 001 §II-A's fine-tuned reformulator on synth: LoRA on SmolLM2-135M, zero-shot vs tuned, one run.

The paper LoRA-fine-tunes its reformulation LLM on seed (caption A, caption B -> instruction)
data. Here the seed data are the exact edits of synth *training* triplets: the first
``--train`` whose text passes ``reformulate``'s post-filters (synth writes a few "?" texts
that the special-character filter would reject). The model then writes instructions for the
next ``--heldout`` triplets, none of whose (reference, target) pairs it was trained on, and
:mod:`cirkit.instruction_score` checks each against the true edit (value, object, kind).

* zero-shot: ``reformulate``'s default prompt with its three worked examples (what the quick
  start runs today), on ``--zero-shot`` engines;
* tuned: a compact prompt without examples (the tuned model has learned the task), LoRA
  rank ``--r`` on the q/k/v/o and MLP projections of the top ``--layers`` layers, trained
  with transformers on the GGUF dequantized to float32 (loss on the answer tokens only, and
  logits computed only there: the 49k-word output layer over every prompt token is most of a
  step's memory), then run on ``--tuned`` engines: ``hf`` (adapter merged) and ``llama-cpp``
  (the same adapter written as a llama.cpp GGUF adapter over the Q4_1 base).

Wall and CPU seconds are of this process. On a machine shared with other jobs, run it niced
with ``--threads 1``: a single thread never spin-waits for a descheduled sibling, so its
CPU-seconds measure the work itself.

    nice python benchmarks/reformulator_finetune.py --threads 1 --json out.json
    python benchmarks/reformulator_finetune.py --train 128 --heldout 64 --epochs 1    # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

TUNED_SYSTEM = "Edit A into B."
TUNED_PROMPT = "A: {reference}\nB: {target}"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """``with timer("name"):`` records (wall s, CPU s) under ``timer.rows[name]``."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, float]] = {}
        self._start: tuple[str, float, float] | None = None

    def __call__(self, name: str) -> Timer:
        self._start = (name, time.perf_counter(), cpu_seconds())
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        name, t, c = self._start
        self.rows[name] = (round(time.perf_counter() - t, 1), round(cpu_seconds() - c, 1))
        print(f"[time] {name}: {self.rows[name][0]} s wall, {self.rows[name][1]} s CPU", flush=True)


def synth_triplets(n: int, seed: int) -> list[dict]:
    from cirkit.synth import SynthConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        run(SynthConfig(out=out, seed=seed, train_triplets=n, test_queries=0, distractors=0, image_size=16))
        return [json.loads(x) for x in (out / "triplets.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synth", default=None, help="a `cirkit synth` OUT folder (default: draw 2,000 triplets, seed 0)")
    ap.add_argument("--train", type=int, default=256, help="seed examples (exact edits of training triplets)")
    ap.add_argument("--heldout", type=int, default=200, help="pairs to write for, none trained on")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--layers", type=int, default=None, help="LoRA on the top this many layers (default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's choice)")
    ap.add_argument("--zero-shot", default="llama-cpp", help="engines for the zero-shot baseline: hf, llama-cpp, none")
    ap.add_argument("--tuned", default="hf,llama-cpp", help="engines for the tuned model")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the adapters and the outputs in this folder")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from cirkit.generation import (
        GenerationSettings,
        chat_prompt,
        generate_texts,
        load_causal_lm,
        load_llama_cpp,
        shared_prefix,
        write_lora_gguf,
    )
    from cirkit.instruction_score import score_triplet, summarize
    from cirkit.reformulate import DEFAULT_EXAMPLES, DEFAULT_PROMPT, DEFAULT_SYSTEM, check, clean_output

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="reformulator-"))
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    recs = ([json.loads(x) for x in (Path(args.synth) / "triplets.jsonl").read_text().splitlines()]
            if args.synth else synth_triplets(2000, args.seed))
    passing = [i for i, r in enumerate(recs) if check(r["instruction"], r["reference_caption"], r["target_caption"], 12) is None]
    train = [recs[i] for i in passing[: args.train]]
    seen = {(r["reference"], r["target"]) for r in train}
    held = [r for r in recs[passing[args.train - 1] + 1:] if (r["reference"], r["target"]) not in seen][: args.heldout]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    report: dict = {"args": vars(args), "train_examples": len(train), "heldout_pairs": len(held), "rows": {}}

    def record(name: str, texts: list[str], seconds: tuple[float, float]) -> None:
        cleaned = [clean_output(t) for t in texts]
        acc = summarize([score_triplet({**r, "instruction": c}) for r, c in zip(held, cleaned, strict=True)])
        acc["pass_filters"] = round(sum(check(c, r["reference_caption"], r["target_caption"], 12) is None
                                        for r, c in zip(held, cleaned, strict=True)) / len(held), 4)
        report["rows"][name] = {"accuracy": acc, "wall_s": seconds[0], "cpu_s": seconds[1],
                                "items_per_s": round(len(held) / seconds[0], 3),
                                "cpu_s_per_item": round(seconds[1] / len(held), 3)}
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"id": r["id"], "truth": r["instruction"], "output": t})
                                                   + "\n" for r, t in zip(held, texts, strict=True)))

    def write_all(lm, system, prompt, examples) -> list[str]:
        prompts = [chat_prompt(lm.tokenizer, prompt.format(reference=r["reference_caption"], target=r["target_caption"]),
                               system, examples) for r in held]
        prefix = shared_prefix(lm.tokenizer, system, examples, prompt)
        texts: list[str] = []
        for s in range(0, len(prompts), 16):  # reformulate's default batch size
            texts += generate_texts(lm, prompts[s: s + 16], settings, prefix)
        return texts

    # ---- zero-shot: reformulate's default prompt and worked examples
    shots = [(DEFAULT_PROMPT.format(reference=a, target=b), c) for a, b, c in DEFAULT_EXAMPLES]
    for engine in [e for e in args.zero_shot.split(",") if e in ("hf", "llama-cpp")]:
        lm = load_llama_cpp(None, workers=args.threads) if engine == "llama-cpp" else load_causal_lm(None)
        with timer(f"zero-shot {engine}"):
            texts = write_all(lm, DEFAULT_SYSTEM, DEFAULT_PROMPT, shots)
        record(f"zero-shot {engine}", texts, timer.rows[f"zero-shot {engine}"])
        del lm

    # ---- LoRA fine-tune on the exact edits
    lm = load_causal_lm(None)
    tok, model = lm.tokenizer, lm.model
    rows = []
    for r in train:
        p = chat_prompt(tok, TUNED_PROMPT.format(reference=r["reference_caption"], target=r["target_caption"]), TUNED_SYSTEM)
        a = r["instruction"] + tok.eos_token
        rows.append((tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"]))
    n_layers = model.config.num_hidden_layers
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                     layers_to_transform=list(range(n_layers - (args.layers or n_layers), n_layers)))
    pm = get_peft_model(model, cfg)
    pm.train()
    body, head = pm.get_base_model().model, pm.get_base_model().lm_head
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = round(args.epochs * -(-len(rows) // args.batch_size))
    warmup = max(1, total // 10)  # linear warm-up, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup + 1))))
    rng = random.Random(args.seed)
    losses: list[float] = []
    with timer("fine-tune"):
        order: list[int] = []
        for step in range(total):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch = [rows[i] for i in order[: args.batch_size]]
            order = order[args.batch_size:]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for i, (p, a) in enumerate(batch):
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                mask[i, : len(p) + len(a)] = 1
                labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            where = labels[:, 1:] != -100
            loss = F.cross_entropy(head(hidden[:, :-1][where]).float(), labels[:, 1:][where])
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
            if (step + 1) % 5 == 0 or step + 1 == total:
                print(f"step {step + 1}/{total} loss {sum(losses[-5:]) / len(losses[-5:]):.3f}", flush=True)
    report.update(steps=total, lora_params=sum(p.numel() for p in params), losses=losses,
                  tokens_per_example=round(sum(len(p) + len(a) for p, a in rows) / len(rows), 1),
                  fine_tune_s=timer.rows["fine-tune"])
    pm.eval()
    pm.save_pretrained(out / "adapter")
    adapter_gguf = write_lora_gguf(pm, out / "adapter.gguf")

    # ---- the tuned model writes for the held-out pairs
    for engine in [e for e in args.tuned.split(",") if e in ("hf", "llama-cpp")]:
        if engine == "hf":
            lm.model = pm.merge_and_unload().eval()
            tlm = lm
        else:
            tlm = load_llama_cpp(None, lora_path=adapter_gguf, workers=args.threads)  # as many cores as torch
        with timer(f"tuned {engine}"):
            texts = write_all(tlm, TUNED_SYSTEM, TUNED_PROMPT, ())
        record(f"tuned {engine}", texts, timer.rows[f"tuned {engine}"])
    names = list(report["rows"])
    outputs = {n: [json.loads(x)["output"] for x in (out / f"{n}.jsonl").read_text().splitlines()] for n in names}
    if "tuned hf" in outputs and "tuned llama-cpp" in outputs:
        report["tuned_engines_same_output"] = f"{sum(a == b for a, b in zip(outputs['tuned hf'], outputs['tuned llama-cpp'], strict=True))}/{len(held)}"

    ft = report["fine_tune_s"]
    print(f"\nfine-tune: {len(train)} exact edits, {total} steps of {args.batch_size}, {ft[0]} s wall, {ft[1]} s CPU; "
          f"loss {losses[0]:.2f} -> {sum(losses[-5:]) / len(losses[-5:]):.2f}; {report['tokens_per_example']} tokens/example")
    print(f"{'writer (' + str(len(held)) + ' held-out pairs)':28s}{'correct':>8s}{'value':>7s}{'object':>8s}{'kind':>6s}"
          f"{'filters':>9s}{'items/s':>9s}{'CPU-s/item':>12s}")
    for n in names:
        row, acc = report["rows"][n], report["rows"][n]["accuracy"]
        print(f"{n:28s}{acc['correct']:8.3f}{acc['value']:7.3f}{acc['object']:8.3f}{acc['kind']:6.3f}"
              f"{acc['pass_filters']:9.3f}{row['items_per_s']:9.2f}{row['cpu_s_per_item']:12.3f}")
    for n in names:
        print(f"  {n}: correct by edit {report['rows'][n]['accuracy']['correct_by_edit']}")
    if "tuned_engines_same_output" in report:
        print(f"tuned hf and tuned llama-cpp write the same text for {report['tuned_engines_same_output']} pairs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
