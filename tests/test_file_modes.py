"""Every file lorakit writes gets the permissions a plain `open(path, "w")` would give: 0o666 minus the umask
for a new file (0o777 minus it for a directory), and its old mode when it replaces a file. Atomic writes go
through `mkstemp`/`mkdtemp`, which create 0o600/0o700; a GGUF that only its writer can read is useless to the
llama.cpp server or Ollama service that runs as another user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.io import write_json, write_safetensors, write_text
from tiny_models import tiny_llama


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of everything under it, by path relative to `root`'s parent."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def assert_plain_modes(root: Path, umask: int) -> None:
    found = modes(root)
    assert found
    want = {name: (0o777 if (root.parent / name).is_dir() else 0o666) & ~umask for name in found}
    wrong = {name: f"{oct(mode)} (want {oct(want[name])})" for name, mode in found.items() if mode != want[name]}
    assert not wrong, wrong


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    for path in (write_text(tmp_path / "a.txt", "x"), write_json(tmp_path / "d" / "b.json", {"a": 1}),
                 write_safetensors(tmp_path / "c.safetensors", {"w": torch.zeros(2)})):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    os.chmod(tmp_path / "a.txt", 0o640)
    write_text(tmp_path / "a.txt", "replaced")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert (tmp_path / "a.txt").read_text() == "replaced"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_training_run_and_every_export_are_readable_as_a_plain_write_would_make_them(tmp_path, umask):
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from formats.gguf_files import write_llama_gguf

    from lorakit.training.run_config import load_config
    from lorakit.training.loop import train
    from train_fixtures import make_instruction_file, make_tiny_model_dir, tiny_run_overrides

    os.umask(0o022)  # the inputs are the user's own files, made as usual
    model_dir = make_tiny_model_dir(tmp_path / "in" / "model")
    data = make_instruction_file(tmp_path / "in" / "train.jsonl", n=12)
    base = write_llama_gguf(tmp_path / "in" / "base.gguf", tiny_llama(), "Q4_1")
    os.umask(umask)

    out = tmp_path / "out"
    out.mkdir()
    run = out / "run"
    train(load_config(None, tiny_run_overrides(model_dir, data, run, "lora", steps=2)), progress=False)
    assert (run / "checkpoints").is_dir() and (run / "adapter").is_dir() and (run / "config.yaml").is_file()
    assert main(["export", str(run), "--format", "hf", "--out", str(out / "hf")]) == 0
    assert main(["export", str(run), "--format", "peft", "--out", str(out / "peft")]) == 0

    model, _ = lorakit.load_gguf(base, tokenizer=False)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["v_proj"], group_size=32))
    lorakit.save_adapter(model, out / "gguf-adapter-src")
    for fmt, name in (("gguf", "ft.gguf"), ("gguf-adapter", "adapter.gguf")):
        assert main(["export", "--adapter", str(out / "gguf-adapter-src"), "--base", str(base), "--format", fmt,
                     "--out", str(out / name)]) == 0
    names = set(modes(out))
    assert {"out/run/loss_curve.png", "out/run/metrics.jsonl", "out/run/summary.json", "out/ft.gguf",
            "out/adapter.gguf", "out/hf/config.json", "out/peft/adapter_model.safetensors"} <= names
    assert any(n.startswith("out/run/checkpoints/step-") and n.endswith("state.json") for n in names)
    assert_plain_modes(out, umask)
