"""Print commands/ablation.sh's tables: mean over seeds and a 95 % interval for every cell.

Usage: python commands/ablation_table.py OUT --seeds 0 1 2 [--curve 250 1000 --triplets 4000]

Each run was evaluated with ``--submission``, so its ranking of every query is on disk. A
cell is the mean over seeds of the share of queries whose target is in the top k, and its
interval is a percentile bootstrap (``--samples`` replicates, seeded) that resamples both
sources of noise at once: the benchmark's queries (one draw per split, shared by every row
and seed, so rows stay paired) and the training seeds (drawn with replacement, the same
draw for every row, since a seed's rows share its stage-1 model). With three seeds the
seed part is coarse (at most 10 distinct seed draws); the per-seed values are printed too.

A row differs from ``full`` ("higher"/"lower") only where the two intervals do not overlap;
otherwise it is "within noise". The script checks that its own recall equals the one
``evaluate`` wrote in metrics.json, so the two can never disagree silently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLS = [("test", 1), ("test", 10), ("compositional", 1), ("compositional", 10)]
ROWS = [  # label, eval folder, mode
    ("full (s1 + s2 + eq. 3 combiner)", "full", "composed"),
    ("no EMA", "noema", "composed"),
    ("no cross-attention", "noxattn", "composed"),
    ("gated cross-attention (g0 = 0)", "gated", "composed"),
    ("no combiner", "nocomb", "composed"),
    ("per-query combiner gate", "gatecomb", "composed"),
    ("stage 1 only (composed)", "stage1", "composed"),
    ("stage 1: image only", "stage1", "image"),
    ("stage 1: text only", "stage1", "text"),
    ("stage 1: image+text sum", "stage1", "sum"),
]


def targets_of(bench: Path, split: str) -> dict[str, set[str]]:
    rows = [json.loads(x) for x in (bench / split / "queries.jsonl").read_text().splitlines() if x.strip()]
    return {r["id"]: set(r["targets"]) for r in rows}


def hits(run: Path, mode: str, split: str, targets: dict[str, set[str]], modes: int) -> dict[int, np.ndarray]:
    """Per query (in ``targets`` order): 1 if a target is in the top k, for k in COLS."""
    folder = run / "rankings" / (mode if modes > 1 else "")
    ranked = {}
    for line in (folder / f"synth-{split}-rankings.jsonl").read_text().splitlines():
        r = json.loads(line)
        ranked[r["id"]] = [h["id"] for h in r["hits"]]
    out = {}
    for k in sorted({k for _, k in COLS}):
        out[k] = np.array([float(bool(set(ranked[q][:k]) & t)) for q, t in targets.items()])
    return out


def load(out: Path, seeds: list[str], names: list[tuple[str, str]]):
    """values[(name, mode)][split][k] -> (seeds, queries) array of 0/1, checked against metrics.json."""
    bench = out / "synth" / "benchmark"
    splits = sorted({s for s, _ in COLS})
    targets = {s: targets_of(bench, s) for s in splits}
    values = {}
    for name, mode in names:
        per = {s: {k: [] for _, k in COLS} for s in splits}
        for seed in seeds:
            run = out / f"seed{seed}" / "eval" / name
            metrics = json.loads((run / "metrics.json").read_text())
            for s in splits:
                h = hits(run, mode, s, targets[s], len(metrics["modes"]))
                for k, v in h.items():
                    want = metrics[f"{mode}/{s}/R@{k}"]
                    if abs(100 * v.mean() - want) > 1e-3:
                        raise SystemExit(f"{run}: recall from the rankings {100 * v.mean():.4f} != metrics.json {want}")
                    per[s][k].append(v)
        values[(name, mode)] = {s: {k: np.stack(v) for k, v in ks.items()} for s, ks in per.items()}
    return values


def bootstrap(values, samples: int, seed: int):
    """cell -> (mean, lo, hi) for every (name, mode) and column, from shared seed and query draws."""
    rng = np.random.default_rng(seed)
    some = next(iter(values.values()))
    n_seeds = next(iter(next(iter(some.values())).values())).shape[0]
    n_q = {s: next(iter(ks.values())).shape[1] for s, ks in some.items()}
    reps = {key: {c: [] for c in COLS} for key in values}
    for _ in range(samples):
        sd = rng.integers(0, n_seeds, n_seeds)
        qi = {s: rng.integers(0, n, n) for s, n in n_q.items()}
        for key, per in values.items():
            for s, k in COLS:
                reps[key][(s, k)].append(100 * per[s][k][sd][:, qi[s]].mean())
    cells = {}
    for key, per in values.items():
        for s, k in COLS:
            lo, hi = np.quantile(reps[key][(s, k)], [0.025, 0.975])
            cells[(key, (s, k))] = (100 * per[s][k].mean(), float(lo), float(hi))
    return cells


def table(title: str, rows: list[tuple[str, tuple[str, str]]], cells, values, ref: tuple[str, str] | None):
    head = f"{title:34s}" + "".join(f"{s[:5] + ' R@' + str(k):>22s}" for s, k in COLS)
    print(head)
    print("-" * len(head))
    for label, key in rows:
        print(f"{label:34s}" + "".join(f"{m:8.1f} [{lo:5.1f}, {hi:5.1f}]" for m, lo, hi in (cells[(key, c)] for c in COLS)))
    print()
    print("per seed (" + ", ".join(f"{s[:5]} R@{k}" for s, k in COLS) + "):")
    for label, key in rows:
        per = values[key]
        seeds = per[COLS[0][0]][COLS[0][1]].shape[0]
        print(f"  {label:32s}" + " | ".join(
            " ".join(f"{100 * per[s][k][i].mean():5.1f}" for s, k in COLS) for i in range(seeds)))
    if ref is None:
        return
    print()
    for label, key in rows:
        if key == ref:
            continue
        verdicts = []
        for c in COLS:
            m, lo, hi = cells[(key, c)]
            rm, rlo, rhi = cells[(ref, c)]
            verdicts.append("higher" if lo > rhi else "lower" if hi < rlo else "within noise")
        print(f"  {label:32s} vs full: " + ", ".join(f"{c[0][:5]} R@{c[1]} {v}" for c, v in zip(COLS, verdicts,
                                                                                                 strict=True)))
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--curve", nargs="*", default=[])
    ap.add_argument("--triplets", default="all")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=int, default=None)
    a = ap.parse_args()
    names = list(dict.fromkeys((name, mode) for _, name, mode in ROWS))
    curve = [(f"{n} triplets", (f"n{n}", "composed")) for n in a.curve] + [(f"{a.triplets} triplets (= full)",
                                                                            ("full", "composed"))]
    names += [key for _, key in curve if key not in names]
    values = load(a.out, a.seeds, names)
    cells = bootstrap(values, a.samples, a.seed)
    print(f"synth recall (%), mean over seeds {', '.join(a.seeds)} [95 % bootstrap interval over queries and seeds, "
          f"{a.samples} resamples]\n")
    table("variant", [(label, (name, mode)) for label, name, mode in ROWS], cells, values, ("full", "composed"))
    if a.curve:
        table("stage-2 triplets (seed Table IV)", curve, cells, values, None)
        print()
    steps = {}
    for n in ("stage1", "full-s2", "noema-s2", "full-comb"):
        f = a.out / f"seed{a.seeds[0]}" / f"{n}.train.json"
        if f.exists():
            steps[n] = json.loads(f.read_text())["counts"]["steps"]
    when = f"; wall time of this run: {a.seconds}s (stages reused from earlier runs not counted)" if a.seconds else ""
    print(f"steps per seed: {steps}{when}")


if __name__ == "__main__":
    main()
