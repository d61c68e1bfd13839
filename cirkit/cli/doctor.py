"""``cirkit doctor``: versions, devices, offline mode, where models load from, demo models, extras."""

from __future__ import annotations

from typing import Annotated

import typer


def doctor(
    devices: Annotated[bool, typer.Option("--devices", help="Also import torch to list devices and bf16 support "
                                                           "(a few seconds).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Check this environment: package versions, offline mode, model cache, demo models, optional extras.

    Fast: nothing heavy is imported unless --devices asks for torch. Paste the output
    into a bug report.

    Examples

      cirkit doctor

      cirkit doctor --devices --json
    """
    from cirkit.cli._common import user_errors
    from cirkit.doctor import report

    with user_errors():
        data = report(devices=devices)
    if json_out:
        import json

        typer.echo(json.dumps(data, ensure_ascii=False))
        return
    _print(data)


def _print(data: dict) -> None:
    from rich.console import Console
    from rich.text import Text

    out = Console(highlight=False, soft_wrap=True)
    out.print(f"cirkit {data['cirkit']}  python {data['python']}  {data['platform']}")
    out.print("packages: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in data["versions"].items()))
    if "devices" in data:
        for d in data["devices"]:
            extra = f" {d['name']} {d['memory_gb']} GB" if "name" in d else ""
            out.print(f"device {d['device']}{extra}: bf16 {'yes' if d['bf16'] else 'no'}")
        out.print(f"default device {data.get('default_device')}, --precision auto = {data.get('precision_auto')}")
    else:
        out.print("devices: not checked (cirkit doctor --devices imports torch to list them)")
    hub = data["hub"]
    state = "on (HF_HUB_OFFLINE)" if hub["offline_mode"] else (
        "off, hub reachable" if hub.get("reachable") else f"off, hub unreachable ({hub.get('unreachable_because')})")
    out.print(f"offline mode: {state}")
    out.print(f"models load from: {hub['models_load_from']}; cache {hub['cache']} "
              f"({len(hub['cached_models'])} models{': ' + ', '.join(hub['cached_models'][:8]) if hub['cached_models'] else ''})")
    for name, m in data["demo_models"].items():
        where = m["path"] if m["present"] else f"missing: {m['install']}"
        out.print(Text(f"demo model {name} ({m['used_by']}): {where}"))
    for name, e in data["extras"].items():
        out.print(f"extra {name}: {'installed' if e['installed'] else 'not installed'} ({e['for']})")
    for p in data["problems"]:
        out.print(Text("problem: ", style="bold red") + Text(p))
