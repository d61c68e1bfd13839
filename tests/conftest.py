"""Shared fixtures: everything offline, small artefacts built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synth benchmark (seed 0, 64 px, 70 train triplets, 28 queries per split); returns OUT."""
    from cirkit.synth import SynthConfig, run

    out = tmp_path_factory.mktemp("synth") / "synth"
    run(SynthConfig(out=out, seed=0, train_triplets=70, test_queries=28, distractors=20, image_size=64))
    return out
