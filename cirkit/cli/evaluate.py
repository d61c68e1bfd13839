"""``cirkit evaluate``: thin layer over :func:`cirkit.evaluate.run` (no torch at import time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.evaluate import EvaluateConfig


@command("cirkit.evaluate.EvaluateConfig", section="evaluate")
def evaluate(config: EvaluateConfig, json_out: bool) -> None:
    """Score a backbone on a CIR benchmark; print a table, write metrics.json and test-server files.

    The gallery is embedded once and every --mode is ranked against it (exact top-k),
    one table row per mode. Test splits without ground truth (CIRR test1, CIRCO test,
    FashionIQ test) need --submission and produce files only.

    Examples

      cirkit evaluate synth -d data/synth/benchmark --backbone clip -m ViT-B-32 --pretrained openai \\
          --mode image --mode text --mode sum -o metrics.json

      cirkit evaluate cirr -d data/cirr --images data/nlvr2 -m ViT-B-32 --pretrained openai

      cirkit evaluate cirr -d data/cirr --images data/nlvr2 --split test1 --submission subs/

      cirkit evaluate circo -d CIRCO --images coco/unlabeled2017 --split test --submission subs/

      cirkit evaluate -c recipes/eval-fashioniq.yaml --caption-join first
    """
    from cirkit.evaluate import run

    result = run(config)
    emit(result, json_out, render=lambda: print_table(result))


def print_table(result) -> None:
    """The metrics as rich tables on stderr: one row per mode (and split), then per task."""
    from rich.console import Console
    from rich.table import Table

    rows = result.details.get("rows") or []
    console = Console(stderr=True, highlight=False)
    if not rows:
        return
    splits = list(dict.fromkeys(r["split"] for r in rows))
    names = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    bench = result.metrics.get("benchmark", "")
    table = Table(title=f"{bench} ({result.metrics.get('backbone')} {result.metrics.get('checkpoint')})")
    table.add_column("mode")
    if len(splits) > 1:
        table.add_column("split")
    for n in names:
        table.add_column(n, justify="right")
    for r in rows:
        cells = [r["mode"]] + ([r["split"]] if len(splits) > 1 else [])
        table.add_row(*cells, *[_cell(r["metrics"], r.get("ci", {}), n) for n in names])
    console.print(table)
    task_rows = [(r["mode"], r["split"], t, m, r.get("task_ci", {}).get(t, {})) for r in rows for t, m in r["tasks"].items()]
    if task_rows:
        tnames = list(dict.fromkeys(n for _, _, _, m, _ in task_rows for n in m))
        tt = Table(title="per task")
        for c in ("mode", "split", "task"):
            tt.add_column(c)
        for n in tnames:
            tt.add_column(n, justify="right")
        for mode, split, t, m, ci in task_rows:
            tt.add_row(mode, split, t, *[_cell(m, ci, n) for n in tnames])
        console.print(tt)
    samples = result.metrics.get("bootstrap/samples")
    if samples:
        console.print(f"[lo, hi]: 95 % bootstrap interval over the queries ({samples} resamples, seed "
                      f"{result.metrics.get('bootstrap/seed')})")
    primary = result.metrics.get("primary_metric")
    if primary and primary in result.metrics:
        ci = result.metrics.get(f"{primary}/ci95")
        shown = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        console.print(f"primary metric {primary} = {result.metrics[primary]:.2f}{shown}")


def _cell(metrics: dict, ci: dict, name: str) -> str:
    """``45.20 [43.10, 47.30]``: the value and its interval (when computed)."""
    if name not in metrics:
        return ""
    lo_hi = ci.get(name)
    return f"{metrics[name]:.2f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")
