"""cirkit from Python: every stage is a plain ``run(config)`` that returns a StageResult.

Embeds the example benchmark's gallery, indexes it, answers one composed query and
evaluates the whole benchmark, all with the instant ``fake`` backbone (swap in a trained
checkpoint folder, e.g. ``model="runs/quickstart/model"``, for real retrieval). ``query``
answers with typed records: ``answer.hits`` is a list of :class:`cirkit.records.Hit`
(``rank``, ``id``, ``score``, ``image``, ``metadata``).

    python examples/python_api.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cirkit.embed import EmbedConfig
from cirkit.embed import run as embed
from cirkit.evaluate import EvaluateConfig
from cirkit.evaluate import run as evaluate
from cirkit.index import IndexConfig
from cirkit.index import run as index
from cirkit.query import QueryConfig
from cirkit.query import run as query

HERE = Path(__file__).parent / "generic_benchmark"


def main(work: Path) -> dict:
    model = {"backbone": "fake", "model": "fake"}
    r = embed(EmbedConfig(input=HERE / "gallery.jsonl", output=work / "gallery.lance", num_workers=0, **model))
    print(r.line())
    print(index(IndexConfig(embeddings=work / "gallery.lance", output=str(work / "index"))).line())
    found = query(QueryConfig(image=HERE / "images" / "red_circle.png", text="make it blue", index=str(work / "index"),
                              k=3, exclude_reference=True, **model))
    answer = found.answers[0]
    print("top hits for red_circle + 'make it blue':", [(h.id, round(h.score, 3)) for h in answer.hits])
    metrics = evaluate(EvaluateConfig(benchmark="generic", data=HERE, output=work / "metrics.json", **model))
    print({k: v for k, v in metrics.metrics.items() if "/R@" in k})
    return {"hits": [h.id for h in answer.hits], "metrics": metrics.metrics}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cirkit-example-")))
