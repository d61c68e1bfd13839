"""Test-server files for CIRR (test1) and CIRCO (test), in the official formats.

CIRR (https://cirr.cecs.anu.edu.au/, demo files in the CIRR repo's ``demo_files/``)::

    <split>_pred_ranks_recall.json         {"version": "rc2", "metric": "recall", "<pairid>": [50 image names]}
    <split>_pred_ranks_recall_subset.json  {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names]}

CIRCO (https://circo.micc.unifi.it/, ``submission_examples/submission_test.json``)::

    {"<query id>": [50 int image ids], ...}   keys are all query ids, 0..N-1

The validators check exactly what the servers check (keys, value types and lengths) and
are tested against the official example files.

Each file is written atomically (:func:`cirkit.io.atomic_write`: a temp named with host and
pid, renamed in when complete, and removed by the next write when its process died) and
under its single-writer lock (:func:`cirkit.io.lock.output_lock`), so two evaluations never
write one file at once and a killed one leaves neither a half file nor a temp behind for good.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cirkit.errors import CirkitError
from cirkit.io import atomic_write_json
from cirkit.io.atomic import check_file_output
from cirkit.io.lock import output_lock

log = logging.getLogger("cirkit")

CIRR_TOP = {"recall": 50, "recall_subset": 3}
CIRCO_TOP = 50


def cirr_submission(ranked: Mapping[str, Sequence[str]], metric: str, version: str = "rc2") -> dict[str, Any]:
    """The CIRR server's JSON object for one metric, values cut to 50 (recall) or 3 (recall_subset)."""
    if metric not in CIRR_TOP:
        raise ValueError(f"metric must be one of {list(CIRR_TOP)}")
    top = CIRR_TOP[metric]
    out: dict[str, Any] = {"version": version, "metric": metric}
    for pairid, names in ranked.items():
        out[str(pairid)] = [str(n) for n in list(names)[:top]]
    return out


def is_submission(path: Path) -> bool:
    """Whether ``path`` is a CIRR or CIRCO submission file (which a new evaluation may replace)."""
    from cirkit.io.atomic import read_small_json

    obj = read_small_json(path)
    if not isinstance(obj, dict):
        return False
    if obj.get("metric") in CIRR_TOP and "version" in obj:
        return True
    return bool(obj) and all(isinstance(k, str) and k.isdigit() and isinstance(v, list) for k, v in obj.items())


def _write(path: Path, obj: dict[str, Any], wait: bool) -> None:
    check_file_output(path, "submission file", is_submission)  # before its lock file is made beside it
    with output_lock(path, wait=wait, what="submission file"):
        atomic_write_json(path, obj, indent=None, kind="submission file", owned=is_submission)


def write_cirr_submission(folder: str | Path, split: str, ranked: Mapping[str, Sequence[str]],
                          subset: Mapping[str, Sequence[str]], version: str = "rc2", wait: bool = False) -> list[Path]:
    """Write both CIRR files for ``split`` into ``folder``; returns their paths."""
    folder = Path(folder)
    paths = []
    for metric, data in (("recall", ranked), ("recall_subset", subset)):
        obj = cirr_submission(data, metric, version)
        problems = validate_cirr_submission(obj, metric, allow_short=True)
        short = [k for k, v in obj.items() if k not in ("version", "metric") and len(v) < CIRR_TOP[metric]]
        if short:
            log.warning("%s: %d rankings are shorter than %d (gallery too small); the server will refuse them",
                        metric, len(short), CIRR_TOP[metric])
        if problems:
            raise CirkitError(f"CIRR {metric} submission is invalid: {problems[0]}")
        path = folder / f"{split}_pred_ranks_{metric}.json"
        _write(path, obj, wait)
        paths.append(path)
    return paths


def validate_cirr_submission(obj: Any, metric: str | None = None, allow_short: bool = False,
                             pairids: Sequence[str] | None = None) -> list[str]:
    """Problems with a CIRR submission object (empty list = valid)."""
    problems = []
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    if obj.get("version") != "rc2":
        problems.append(f"'version' must be 'rc2', got {obj.get('version')!r}")
    if obj.get("metric") not in CIRR_TOP:
        problems.append(f"'metric' must be 'recall' or 'recall_subset', got {obj.get('metric')!r}")
    elif metric is not None and obj["metric"] != metric:
        problems.append(f"'metric' is {obj['metric']!r}, expected {metric!r}")
    top = CIRR_TOP.get(obj.get("metric"), 50)
    for k, v in obj.items():
        if k in ("version", "metric"):
            continue
        if not k.isdigit():
            problems.append(f"key {k!r} is not a pairid")
        elif not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            problems.append(f"pairid {k}: expected a list of image names")
        elif len(v) != top and not (allow_short and len(v) < top):
            problems.append(f"pairid {k}: {len(v)} names, expected {top}")
        elif len(set(v)) != len(v):
            problems.append(f"pairid {k}: repeated image names")
    if pairids is not None:
        missing = set(map(str, pairids)) - set(obj)
        if missing:
            problems.append(f"{len(missing)} pairids missing (e.g. {sorted(missing)[0]})")
    return problems


def circo_submission(ranked: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """The CIRCO server's JSON object: query id -> top-50 COCO image ids as ints, keys in id order."""
    for k, names in ranked.items():
        for value, what in ((k, "query id"), *((x, f"image id (query {k})") for x in list(names)[:CIRCO_TOP])):
            if not str(value).isdigit():
                raise CirkitError(f"CIRCO submission: {what} {str(value)!r:.60} is not a number; CIRCO uses COCO "
                                  "ids (digits only): give the gallery its COCO ids")
    return {str(k): [int(x) for x in list(ranked[k])[:CIRCO_TOP]] for k in sorted(ranked, key=int)}


def write_circo_submission(path: str | Path, ranked: Mapping[str, Sequence[str]], wait: bool = False) -> Path:
    """Write a CIRCO submission file; returns its path."""
    obj = circo_submission(ranked)
    problems = validate_circo_submission(obj, allow_short=True)
    if problems:
        raise CirkitError(f"CIRCO submission is invalid: {problems[0]}")
    if any(len(v) < CIRCO_TOP for v in obj.values()):
        log.warning("some CIRCO rankings are shorter than %d (gallery too small); the server will refuse them", CIRCO_TOP)
    _write(Path(path), obj, wait)
    return Path(path)


def validate_circo_submission(obj: Any, allow_short: bool = False, num_queries: int | None = None) -> list[str]:
    """Problems with a CIRCO submission object (empty list = valid)."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    problems = []
    keys = list(obj)
    if not all(isinstance(k, str) and k.isdigit() for k in keys):
        return ["keys must be query ids (digit strings)"]
    ids = sorted(int(k) for k in keys)
    if ids != list(range(len(ids))):
        problems.append("keys must be exactly the query ids 0..N-1")
    if num_queries is not None and len(ids) != num_queries:
        problems.append(f"{len(ids)} queries, expected {num_queries}")
    for k, v in obj.items():
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            problems.append(f"query {k}: expected a list of int image ids")
        elif len(v) != CIRCO_TOP and not (allow_short and len(v) < CIRCO_TOP):
            problems.append(f"query {k}: {len(v)} ids, expected {CIRCO_TOP}")
        elif len(set(v)) != len(v):
            problems.append(f"query {k}: repeated image ids")
    return problems
