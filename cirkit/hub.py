"""Models named by a Hugging Face Hub id: decide at once whether they can load, and say so in one line.

Left to themselves, transformers and huggingface_hub retry a download for 30-60 s on a machine
without network before a vague error, even for a model that is in the local cache (they first
ask the hub for a newer revision). :func:`check_model` runs before a hub id is loaded:

* a local folder or file: nothing to check (the loader reads it);
* ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set: the model must be in the local cache, else
  one line says where the cache is and how to get the model there;
* otherwise one cheap probe of the hub (a HEAD request, :data:`PROBE_TIMEOUT` seconds, once per
  process): reachable, loading goes on as usual; unreachable or failing (a 5xx answer), a cached
  model loads in offline mode (no retries) and a missing one is the one-line error.

The fixes offered: download it where there is network and copy the cache, pass a local model
folder, set ``HF_HUB_OFFLINE=1`` (skip the probe), and for captions, import existing ones with
``caption --from``. Only the standard library at import time; ``cirkit doctor`` reports the same
facts.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from cirkit.errors import CirkitError

log = logging.getLogger("cirkit")

PROBE_TIMEOUT = 3.0  # seconds; the hub answers a HEAD in well under one on a working connection
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_probed: dict[str, str | None] = {}


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """Whether the user asked for offline mode (huggingface_hub's own reading of the variables)."""
    return any(_true(os.environ.get(v)) for v in OFFLINE_ENV)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded models (``HF_HUB_CACHE``, ``HF_HOME``, ``~/.cache/huggingface``)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(os.path.expandvars(hub)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def is_hub_id(ref: str) -> bool:
    """``org/name`` or ``name`` that is not an existing path: what ``from_pretrained`` would download."""
    return bool(ref) and not Path(ref).expanduser().exists() and bool(_HUB_ID.match(ref))


def is_cached(repo_id: str, kind: str = "model") -> bool:
    """Whether a snapshot of ``repo_id`` is in the local cache (the layout huggingface_hub writes)."""
    folder = cache_dir() / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    try:
        return any(any(snap.iterdir()) for snap in folder.iterdir() if snap.is_dir())
    except OSError:
        return False


def probe(url: str | None = None, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the hub cannot serve downloads now (unreachable, no answer, a 5xx), or None. Once per process."""
    import urllib.error
    import urllib.request

    url = url or endpoint()
    if url in _probed:
        return _probed[url]
    reason: str | None = None
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "cirkit"})
        with urllib.request.urlopen(req, timeout=timeout):  # honours HTTPS_PROXY like the hub client
            pass
    except urllib.error.HTTPError as e:
        reason = f"it answers HTTP {e.code}" if e.code >= 500 else None  # 4xx: reachable, the hub decides
    except urllib.error.URLError as e:
        why = e.reason
        reason = f"no answer within {timeout:g} s" if isinstance(why, TimeoutError) else str(why)
    except TimeoutError:
        reason = f"no answer within {timeout:g} s"
    except OSError as e:
        reason = e.strerror or str(e)
    _probed[url] = reason
    return reason


def go_offline() -> None:
    """Offline mode for this process from now on: cached models load without any request or retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read at import; transformers asks huggingface_hub's function each time
        constants.HF_HUB_OFFLINE = True


LOCAL_FOLDER = "a local model folder (-m path/to/folder)"


def how_to_get(ref: str, extra: str = "", local: str = LOCAL_FOLDER) -> str:
    """What a user can do about a model that cannot be downloaded here."""
    return (f"download it where there is network (huggingface-cli download {ref}) and copy {cache_dir()} here, "
            f"or pass {local}{extra}")


def check_model(ref: str | None, what: str = "model", extra: str = "", kind: str = "model",
                local: str = LOCAL_FOLDER) -> None:
    """Fail in one line, without retries, when hub id ``ref`` cannot load here (see module docstring).

    ``extra``: another way out for this stage, appended to the fixes (", or ..."); ``local``: how
    this stage takes the model from a local path.
    """
    if not ref or not is_hub_id(ref):
        return
    cached = is_cached(ref, kind)
    if is_offline():
        if cached:
            return
        raise CirkitError(f"{ref}: this {what} is not in the local Hugging Face cache ({cache_dir()}) and "
                          f"HF_HUB_OFFLINE is set, so it cannot be downloaded; {how_to_get(ref, extra, local)}")
    reason = probe()
    if reason is None:
        return
    go_offline()
    if cached:
        log.info("%s is unreachable (%s); loading %s from the local cache", endpoint(), reason, ref)
        return
    raise CirkitError(f"{ref}: cannot download this {what}: {endpoint()} is unreachable ({reason}) and it is not in "
                      f"the local Hugging Face cache ({cache_dir()}); {how_to_get(ref, extra, local)}; "
                      "set HF_HUB_OFFLINE=1 to skip this check")
