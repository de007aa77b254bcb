"""`lorakit generate --engine`: which engine answers, the errors that say why llama.cpp cannot, and the
merged GGUF of a QA-LoRA run (written once, again only when the adapter changes). The llama.cpp run itself is
in the slow test at the end (it needs llama-cpp-python)."""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.training.run_config import load_config, save_config


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def fake_run(tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    save_config(load_config(None, list(overrides)), run / "config.yaml")
    return run


def test_llama_cpp_engine_without_llama_cpp_says_how_to_install(monkeypatch):
    monkeypatch.setattr("lorakit.formats.llamacpp.available", lambda: False)
    code, _, err = cli("generate", "--prompt", "hi", "--engine", "llama.cpp")
    assert code == 2 and "pip install llama-cpp-python" in err and "--engine torch" in err


def test_llama_cpp_engine_refuses_a_run_without_a_lossless_gguf(tmp_path, monkeypatch):
    monkeypatch.setattr("lorakit.formats.llamacpp.available", lambda: True)
    run = fake_run(tmp_path, "method=lora", f"model.path={tmp_path / 'hf-model'}")
    code, _, err = cli("generate", run, "--prompt", "hi", "--engine", "llama.cpp")
    assert code == 2 and "lora run" in err and "no lossless GGUF form" in err and "--engine torch" in err
    code, _, err = cli("generate", "--base", tmp_path / "hf-model", "--prompt", "hi", "--engine", "llama.cpp")
    assert code == 2 and "is not one" in err


def test_auto_engine_picks_the_gguf_file(tmp_path, monkeypatch):
    from lorakit.cli import _llama_cpp_file, build_parser
    from lorakit.models.default import default_gguf_path

    parser = build_parser()
    monkeypatch.setattr("lorakit.formats.llamacpp.available", lambda: True)
    assert _llama_cpp_file(parser.parse_args(["generate", "--prompt", "x"])) == default_gguf_path()
    assert _llama_cpp_file(parser.parse_args(["generate", "--prompt", "x", "--engine", "torch"])) is None
    lora_on_gguf = fake_run(tmp_path, "method=lora")
    assert _llama_cpp_file(parser.parse_args(["generate", str(lora_on_gguf), "--prompt", "x"])) is None
    assert _llama_cpp_file(parser.parse_args(["generate", str(lora_on_gguf), "--no-adapter"])) == default_gguf_path()
    monkeypatch.setattr("lorakit.formats.llamacpp.available", lambda: False)
    assert _llama_cpp_file(parser.parse_args(["generate", "--prompt", "x"])) is None  # auto: PyTorch then


def test_run_gguf_is_written_once_and_again_when_the_adapter_changes(tmp_path, monkeypatch):
    import lorakit
    from lorakit.tasks import causal_lm

    run = fake_run(tmp_path, "method=qalora")
    writes = []

    def export_gguf(model, out, *, template, merged):
        writes.append((out, Path(template).name, merged))
        Path(out).write_bytes(b"GGUF")

    monkeypatch.setattr(causal_lm, "load_trained", lambda run_dir: ("model", None, None))
    monkeypatch.setattr(lorakit, "merge_", lambda model: None)
    monkeypatch.setattr(lorakit, "export_gguf", export_gguf)
    first = causal_lm.run_gguf(run)
    assert first == run / "merged.gguf" and first.read_bytes() == b"GGUF" and len(writes) == 1
    assert writes[0][1].endswith(".gguf") and writes[0][2] == str(run / "adapter")
    assert causal_lm.run_gguf(run) == first and len(writes) == 1  # up to date: not written again
    later = time.time() + 5
    os.utime(run / "adapter" / "adapter_model.safetensors", (later, later))  # the adapter changed (resumed run)
    assert causal_lm.run_gguf(run) == first and len(writes) == 2
    assert causal_lm.run_gguf(fake_run(tmp_path / "other", "method=qlora")) is None  # NF4: no lossless GGUF


@pytest.mark.slow
def test_generate_with_llama_cpp_answers_like_pytorch(tmp_path):
    """A 2-step QA-LoRA run on the embedded GGUF, answered by llama.cpp (its merged.gguf) and by PyTorch."""
    pytest.importorskip("llama_cpp")
    run = tmp_path / "run"
    assert cli("train", "method=qalora", "train.steps=2", "train.batch_size=2", "train.eval_every=0",
               "data.max_tokens=64", f"output_dir={run}", "--quiet")[0] == 0
    code, fast, err = cli("generate", run, "--prompt", "What does `json.dumps` do?", "--max-new-tokens", "12")
    assert code == 0 and "llama.cpp on" in err and (run / "merged.gguf").is_file()
    code, slow, _ = cli("generate", run, "--prompt", "What does `json.dumps` do?", "--max-new-tokens", "12",
                        "--engine", "torch")
    assert code == 0 and fast.strip()
    # llama.cpp multiplies by 8-bit activations: greedy tokens agree at first (38 of 64 on the base model)
    assert fast.split()[:3] == slow.split()[:3]
