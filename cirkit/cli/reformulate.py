"""``cirkit reformulate captions.jsonl -o triplets.jsonl``: thin CLI over :mod:`cirkit.reformulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cirkit.cli._common import (
    DeviceOpt,
    DtypeOpt,
    JsonFlag,
    NumBeamsOpt,
    RecipeOpt,
    SamplingTemperatureOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    emit,
    flags,
    stage,
)


@stage
def reformulate(
    captions: Annotated[Path | None, typer.Argument(help="captions.jsonl (from `cirkit caption` or `cirkit synth`).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Triplets JSONL to write or resume. (default triplets.jsonl)")] = None,
    generator: Annotated[str | None, typer.Option("--generator", "-g", help="llm (default) or template (rule-based, no model).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Causal LM hub id or folder. (default: offline SmolLM2-135M-Instruct)")
    ] = None,
    gguf_file: Annotated[str | None, typer.Option("--gguf-file", help="A GGUF file (path, or name inside --model).")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="User prompt with {reference} and {target} placeholders.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message for the chat template.")] = None,
    pairing: Annotated[str | None, typer.Option("--pairing", help="random (default), same-group, or similar.")] = None,
    group_field: Annotated[
        str | None, typer.Option("--group-field", help="same-group: caption field to group by. (default: group, else parent folder)")
    ] = None,
    min_sim: Annotated[float | None, typer.Option("--min-sim", help="similar: lowest caption cosine. (default 0.5)")] = None,
    max_sim: Annotated[float | None, typer.Option("--max-sim", help="similar: highest caption cosine. (default 0.95)")] = None,
    embed_model: Annotated[
        str | None, typer.Option("--embed-model", help="similar: text embedding model. (default: offline all-MiniLM-L6-v2)")
    ] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="Pairs to draw. (default 1000)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Pairing (and sampling) seed. (default 0)")] = None,
    max_pairs_per_image: Annotated[
        int | None, typer.Option("--max-pairs-per-image", help="Most pairs with the same reference image. (default 2)")
    ] = None,
    max_words: Annotated[int | None, typer.Option("--max-words", help="Word limit of an instruction. (default 12)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest reply in tokens. (default 32)")] = None,
    temperature: SamplingTemperatureOpt = None,
    top_p: TopPOpt = None,
    num_beams: NumBeamsOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Prompts per generate call. (default 16)")] = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    device: DeviceOpt = None,
    engine: Annotated[
        str | None, typer.Option("--engine", help="hf (transformers, default) or llama-cpp (GGUF files on CPU; "
                                                  "pip install llama-cpp-python).")
    ] = None,
    config: RecipeOpt = None,
    json_: JsonFlag = False,
) -> None:
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

      cirkit reformulate data/captions.jsonl -o t.jsonl --gguf-file models/llm.Q4_K_M.gguf

      cirkit reformulate data/captions.jsonl -o t.jsonl --gguf-file models/llm.Q4_K_M.gguf --engine llama-cpp
    """
    from cirkit.config import resolve
    from cirkit.reformulate import ReformulateConfig, run

    cfg = resolve(
        ReformulateConfig,
        config,
        flags(
            captions=captions, output=output, generator=generator, model=model, gguf_file=gguf_file, prompt=prompt,
            system=system, pairing=pairing, group_field=group_field, min_sim=min_sim, max_sim=max_sim,
            embed_model=embed_model, count=count, seed=seed, max_pairs_per_image=max_pairs_per_image,
            max_words=max_words, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            num_beams=num_beams, batch_size=batch_size, dtype=dtype, trust_remote_code=trust_remote_code,
            device=device, engine=engine,
        ),
        section="reformulate",
    )
    emit(run(cfg), json_)
