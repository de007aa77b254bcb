"""The tiny model and adapters every serve test uses (built once per session)."""

from __future__ import annotations

import pytest

import lorakit
from tiny_models import randomise_trainable_
from train_fixtures import tiny_assets

ADAPTERS = {"a": 1, "b": 2, "c": 3}  # name -> seed; test_serve: a and b at start-up, c loaded at run time


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """(tiny model dir, {adapter name: dir}, reference model with every adapter loaded, tokenizer)."""
    from lorakit.models.default import load_causal_lm

    model_dir, _ = tiny_assets(tmp_path_factory, "serve")
    reference, tokenizer = load_causal_lm(model_dir)
    dirs = {}
    for name, seed in ADAPTERS.items():
        lorakit.inject_adapters(reference, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), name=name)
        randomise_trainable_(reference, seed=seed, std=0.3)  # large enough that every adapter answers differently
        dirs[name] = lorakit.save_adapter(reference, model_dir.parent / f"adapter-{name}", name=name)
    return model_dir, dirs, reference, tokenizer
