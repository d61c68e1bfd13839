"""``cirkit reformulate captions.jsonl -o triplets.jsonl``: thin CLI over :mod:`cirkit.reformulate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cirkit.cli._common import command, emit

if TYPE_CHECKING:
    from cirkit.reformulate import ReformulateConfig


@command("cirkit.reformulate.ReformulateConfig", section="reformulate")
def reformulate(config: ReformulateConfig, json_out: bool) -> None:
    """Pair captioned images and write an edit instruction for each pair (reference -> target).

    Instructions come from an LLM (its chat template; hub id, folder or GGUF file) or
    from the rule-based template generator. Post-filters reject empty outputs, special
    characters, more than --max-words words, copies of a caption and duplicates; the
    rejects go to <output stem>.rejected.jsonl with the reason. Triplet ids are
    <reference id>__<target id>; re-running resumes and writes each pair once.

    Examples

      cirkit reformulate data/captions.jsonl -o data/triplets.jsonl

      cirkit reformulate data/captions.jsonl -o data/triplets-template.jsonl --generator template

      cirkit reformulate data/captions.jsonl -o t.jsonl --pairing similar --min-sim 0.6 --max-sim 0.9 -n 5000

      cirkit reformulate data/captions.jsonl -o t.jsonl -m Qwen/Qwen2.5-1.5B-Instruct --pairing same-group

      cirkit reformulate data/captions.jsonl -o t.jsonl --prompt paper --pairing same-group --group-depth 2

      cirkit reformulate data/captions.jsonl -o t.jsonl --gguf-file models/llm.Q4_K_M.gguf

      cirkit reformulate data/captions.jsonl -o t.jsonl --gguf-file models/llm.Q4_K_M.gguf --engine llama-cpp

      cirkit reformulate data/captions.jsonl -o t.jsonl -c recipes/reformulate-smollm2.yaml
    """
    from cirkit.reformulate import run

    emit(run(config), json_out)
