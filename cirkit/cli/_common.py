"""Shared pieces of the thin CLI layer: option types, error handling, summary output.

Nothing here imports torch: ``cirkit --help`` must stay fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cirkit.errors import CirkitError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]
RecipeOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Recipe YAML; its settings apply before explicit flags.", exists=False),
]
StrictFlag = Annotated[
    bool | None, typer.Option("--strict/--no-strict", help="Fail on the first unreadable image instead of skipping it.")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: best available).")]

# Decoding and model-loading options shared by the generation stages (caption, reformulate).
# "Sampling" in the name: train's --temperature is InfoNCE's, not this one.
SamplingTemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass when sampling. (default 1.0)")]
NumBeamsOpt = Annotated[int | None, typer.Option("--num-beams", help="Beam search width. (default 1)")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto (bf16 on GPU), float32, bfloat16, float16.")]
TrustRemoteCodeOpt = Annotated[
    bool | None, typer.Option("--trust-remote-code", help="Allow the model repository's own Python code.")
]


def err(message: str) -> None:
    """Print a one-line error on stderr."""
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


def stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI command: user errors become one line + exit code, bugs keep tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CirkitError as e:
            err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted; finished work is kept, re-run the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def emit(result: Any, as_json: bool, extra: Callable[[], None] | None = None) -> None:
    """Print a stage's summary: a JSON object on stdout, or a rich one-liner (plus ``extra``)."""
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False, default=str) + "\n")
        return
    from rich.console import Console

    if extra is not None:
        extra()
    console = Console(stderr=True, highlight=False)
    console.print(f"[green]✓[/] {result.line()}", soft_wrap=True)
    if result.skipped:
        for item, reason in result.skipped[:10]:
            console.print(f"  [yellow]skipped[/] {item}: {reason}", soft_wrap=True, markup=False)
        if len(result.skipped) > 10:
            console.print(f"  ... and {len(result.skipped) - 10} more (see --json for all)")


def flags(**kwargs: Any) -> dict[str, Any]:
    """The explicitly given CLI flags (None means 'not given', so recipes and defaults apply)."""
    return {k: v for k, v in kwargs.items() if v is not None}
