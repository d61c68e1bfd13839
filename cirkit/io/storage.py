"""Where Lance outputs live: local folders or object storage (``s3://``, ``gs://``, ``az://``).

``embed -o`` and ``index -o`` take any LanceDB URI. Object storage needs credentials and
sometimes an endpoint; LanceDB (its Rust ``object_store``) reads them from the environment
by default (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_REGION``/``AWS_ENDPOINT``,
``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_ACCOUNT_NAME``/``_KEY``, ...), and
``--storage-options`` adds or overrides keys (JSON, or ``key=value`` pairs separated by
commas): e.g. ``aws_endpoint=http://127.0.0.1:9000,allow_http=true``. The values are
handed to LanceDB only: cirkit never prints or records them.

The single-writer lock of a remote output is a lock file on *this* machine (under
``$CIRKIT_CACHE_DIR``, see :func:`lock_path`): it stops a second writer on the same machine
only. Two machines writing one remote store are not stopped by it; Lance's own optimistic
commits then keep the table consistent (concurrent appends both land; two creators of one
table: the second fails with "already exists"), but the same ids may be stored twice, which
``index`` refuses in one line. Run one writer per remote output (a multi-process ``embed``
under ``accelerate launch`` is one writer: only its main process commits).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cirkit.config import setting
from cirkit.errors import CirkitError

REMOTE_SCHEMES = ("s3://", "s3+ddb://", "gs://", "az://", "abfss://", "memory://")


def storage_options_setting() -> Any:
    return setting(None, help="Object-storage options for an s3://, gs:// or az:// output: JSON or key=value pairs "
                              "(e.g. aws_endpoint=http://host:9000,allow_http=true). Credentials come from the "
                              "environment by default; values are never printed.",
                   panel="Object storage")


def is_local(uri: str | Path) -> bool:
    """Whether a LanceDB URI is a local folder (a plain path or ``file://``)."""
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str | Path) -> Path:
    return Path(str(uri)[len("file://"):] if str(uri).startswith("file://") else str(uri)).expanduser()


def parse_storage_options(value: str | dict[str, Any] | None) -> dict[str, str] | None:
    """``--storage-options`` as LanceDB wants it (str -> str); None when not given.

    Errors never repeat the value: it may hold a secret.
    """
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, dict):
        obj = value
    else:
        text = str(value).strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise CirkitError(f"--storage-options: not valid JSON (at character {getattr(e, 'pos', '?')}); "
                                  f"give a JSON object or key=value pairs") from None
            if not isinstance(obj, dict):
                raise CirkitError("--storage-options: expected a JSON object of option names to values")
        else:
            obj = {}
            for n, pair in enumerate(p for p in text.split(",") if p.strip()):
                key, sep, val = pair.partition("=")
                if not sep or not key.strip():
                    raise CirkitError(f"--storage-options: item {n + 1} is not key=value; give key=value pairs "
                                      f"separated by commas, or a JSON object")
                obj[key.strip()] = val.strip()
    out: dict[str, str] = {}
    for k, v in obj.items():
        if isinstance(v, (dict, list)) or v is None:
            raise CirkitError(f"--storage-options: the value of {k!r} must be a string, number or boolean")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def cache_root() -> Path:
    """cirkit's local cache folder (``$CIRKIT_CACHE_DIR``, default ``~/.cache/cirkit``)."""
    return Path(os.environ.get("CIRKIT_CACHE_DIR") or Path.home() / ".cache" / "cirkit")


def remote_key(uri: str) -> str:
    """A short stable name for a remote URI (folder names in the local cache)."""
    return hashlib.sha1(str(uri).rstrip("/").encode()).hexdigest()[:16]


def lock_path(uri: str | Path) -> Path:
    """What :func:`cirkit.io.lock.output_lock` locks for an output: the path itself when local, else a
    file in the local cache named by the URI (one writer per machine: see the module docstring)."""
    if is_local(uri):
        return local_path(uri)
    return cache_root() / "remote" / remote_key(str(uri)) / "output"
