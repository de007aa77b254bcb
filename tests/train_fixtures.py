"""A tiny Llama with the embedded model's real tokenizer and chat template, and a small instruction file:
what the trainer and CLI tests run on (a training step takes milliseconds)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch


def make_tiny_model_dir(directory: Path) -> Path:
    import transformers

    from lorakit.models.default import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_instruction_file(path: Path, n: int = 48) -> Path:
    from lorakit.data.stdlib_docs import TRAIN_MODULES, docstring_pairs

    pairs = docstring_pairs(TRAIN_MODULES)[:n]
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
    return path


def tiny_run_overrides(model_dir: Path, data: Path, out: Path, method: str = "lora", steps: int = 6) -> list[str]:
    return [f"model.path={model_dir}", "model.dtype=float32", f"data.train={data}", "data.valid_fraction=0.25",
            "data.max_tokens=64", f"method={method}", f"output_dir={out}", f"train.steps={steps}",
            "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=1", "train.eval_every=3", "train.save_every=2",
            "adapter.r=4", "adapter.alpha=8"]


def tiny_assets(tmp_path_factory, name: str = "assets") -> tuple[Path, Path]:
    """(tiny model directory, instruction file) in a fresh temporary directory; skips the test when the
    embedded model (whose tokenizer the tiny model uses) is not installed."""
    import pytest

    try:
        from lorakit.models.default import default_model_dir

        default_model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp(name)
    return make_tiny_model_dir(d / "model"), make_instruction_file(d / "train.jsonl")


FREEZE_AFTER_STEP = Path(__file__).parent / "freeze_after_step.py"


def kill_after_step(command: list[str], run_dir: Path, step: int, env: dict | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `command`, whose entry point is `FREEZE_AFTER_STEP` with `step` as its first argument; wait until
    the run's metrics.jsonl holds the training loss of `step` (the process then stands frozen), and SIGKILL
    it and all its child processes from outside. Returns the finished process (returncode -9 when killed)."""
    from lorakit.report.progress import read_metrics

    metrics = run_dir / "metrics.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and any(m["step"] == step and "loss" in m for m in read_metrics(metrics))):
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_tree(process.pid)
            out, err = process.communicate()
            raise AssertionError(f"step {step} never reached {metrics} (exit {process.returncode}):\n{err[-3000:]}")
        time.sleep(0.02)
    _kill_tree(process.pid)
    out, err = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it: torchrun starts its workers in sessions of their own, so
    killing the process group would leave them running."""
    for victim in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
