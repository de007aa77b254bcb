"""`lorakit train` on a tiny Llama with the embedded model's real tokenizer: outputs, every method, exact resume
after SIGKILL, a non-finite loss, bad config keys, and golden losses (regenerate with scripts/regen_golden.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from lorakit.report.progress import read_metrics  # noqa: E402
from lorakit.training.run_config import load_config  # noqa: E402
from lorakit.training.loop import TrainingStopped, train  # noqa: E402
from train_fixtures import FREEZE_AFTER_STEP, kill_after_step, tiny_assets, tiny_run_overrides  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "cli_smoke.json"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory, "assets")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_a_run_writes_its_outputs_and_learns(assets, tmp_path, method):
    model_dir, data = assets
    config = load_config(None, tiny_run_overrides(model_dir, data, tmp_path / "run", method, steps=8))
    result = train(config, progress=False)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "adapter", "loss_curve.png",
                                               "summary.json", "checkpoints"}
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.valid_ppl_after < result.valid_ppl_before  # the validation loss fell
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 9))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["method"] == method
    assert summary["compute_dtype"] == config.model.dtype == "float32"  # what model.dtype resolved to
    from lorakit.training.memory import peak_rss_bytes
    # memory beside speed: this process's high-water mark at the end of the run (it only grows; the kernel
    # syncs per-thread RSS counters in batches of 64 pages, so two readings may differ by a few hundred KiB)
    assert 50 * 2**20 < summary["peak_rss_bytes"] <= peak_rss_bytes() + 4 * 2**20
    assert "cuda_max_memory_allocated_bytes" not in summary  # on the CPU
    assert load_config(str(run / "config.yaml"), []).method == method  # the resolved config reads back


def test_resume_after_sigkill_ends_with_the_same_adapter(assets, tmp_path):
    model_dir, data = assets
    whole = tiny_run_overrides(model_dir, data, tmp_path / "whole", "qalora", steps=6) + ["adapter.dropout=0.1"]
    out = cli("train", *whole, "--quiet")
    assert out.returncode == 0, out.stderr
    killed = tiny_run_overrides(model_dir, data, tmp_path / "killed", "qalora", steps=6) + ["adapter.dropout=0.1"]
    out = kill_after_step([sys.executable, str(FREEZE_AFTER_STEP), "3", "train", *killed, "--quiet"],
                          tmp_path / "killed", step=3)
    assert out.returncode == -9  # SIGKILLed from outside after step 3; the newest checkpoint is step 2
    assert not (tmp_path / "killed" / "adapter").exists()
    out = cli("train", "--resume", str(tmp_path / "killed"), "--quiet")
    assert out.returncode == 0, out.stderr
    want, got = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "killed")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    steps = [m["step"] for m in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed step 3 was logged again, once


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch):
    from lorakit.tasks.causal_lm import CausalLM

    model_dir, data = assets
    config = load_config(None, tiny_run_overrides(model_dir, data, tmp_path / "run", "lora", steps=6))
    real, calls = CausalLM.loss, {"n": 0}

    def poisoned(task, model, batch):
        calls["n"] += model.training  # training micro-batches only (validation also computes losses)
        loss = real(task, model, batch)
        return loss * float("nan") if model.training and calls["n"] == 3 else loss

    monkeypatch.setattr(CausalLM, "loss", poisoned)
    with pytest.raises(TrainingStopped, match="loss became nan at step 3.*step-000002"):
        train(config, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").is_file()


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_update(assets, tmp_path, monkeypatch):
    from lorakit.training import loop

    model_dir, data = assets
    config = load_config(None, tiny_run_overrides(model_dir, data, tmp_path / "run", "lora", steps=6))
    real, seen = loop._report_step, {}

    def poison_at_step_3(run, grad_norm, per_s):
        real(run, grad_norm, per_s)
        seen["adapter"] = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        if run.step == 2:
            seen["run"] = run
            next(p for p in run.params).register_hook(lambda g: g * float("nan"))  # the loss stays finite

    monkeypatch.setattr(loop, "_report_step", poison_at_step_3)
    with pytest.raises(TrainingStopped, match="gradients became non-finite .* at step 3 .*step-000002"):
        train(config, progress=False)
    after = {n: p for n, p in seen["run"].model.named_parameters() if p.requires_grad}
    for name, before in seen["adapter"].items():
        assert torch.equal(after[name], before), name  # step 3 updated nothing


def test_bad_config_keys_name_the_key_and_the_closest_valid_one(tmp_path):
    out = cli("train", "train.learning_rate=1e-4", f"output_dir={tmp_path}")
    assert out.returncode == 2 and "train.learning_rate" in out.stderr and "train.lr" in out.stderr
    (tmp_path / "c.yaml").write_text("adapter:\n  rank: 8\n")
    out = cli("train", str(tmp_path / "c.yaml"))
    assert out.returncode == 2 and "adapter.rank" in out.stderr and "adapter.r" in out.stderr


def test_zero_eval_and_save_intervals_mean_only_at_the_start_and_end(assets, tmp_path):
    model_dir, data = assets  # the tiny run holds back a quarter of its rows for validation
    overrides = tiny_run_overrides(model_dir, data, tmp_path / "run", "lora", steps=5)
    config = load_config(None, overrides + ["train.eval_every=0", "train.save_every=0"])
    result = train(config, progress=False)
    assert result.steps == 5 and result.valid_ppl_after is not None
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "valid_loss" in m] == [0, 5]  # before training and at the end
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000005"]


def test_max_grad_norm_zero_turns_clipping_off(assets, tmp_path):
    # 0 means "never clip" (the documented meaning), not "clip to norm 0", which zeroed every update
    model_dir, data = assets
    adapters = []
    for name, norm in (("off", "0"), ("huge", "1e9")):
        config = load_config(None, tiny_run_overrides(model_dir, data, tmp_path / name, "lora", steps=3)
                             + [f"train.max_grad_norm={norm}"])
        train(config, progress=False)
        adapters.append(adapter_tensors(tmp_path / name))
    assert any(t.abs().max() > 0 for k, t in adapters[0].items() if "lora_B" in k)  # it learned
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_an_existing_run_is_never_overwritten(assets, tmp_path):
    model_dir, data = assets
    config = load_config(None, tiny_run_overrides(model_dir, data, tmp_path / "run", "lora", steps=2))
    train(config, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, progress=False)


def test_cli_smoke_run_matches_golden_losses(assets, tmp_path):
    model_dir, data = assets
    golden = json.loads(GOLDEN.read_text())
    out = cli("train", *tiny_run_overrides(model_dir, data, tmp_path / "run", golden["method"], golden["steps"]),
              "--quiet")
    assert out.returncode == 0, out.stderr
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert losses == pytest.approx(golden["losses"], rel=1e-4)


def test_eval_generate_merge_export_read_the_run_back(assets, tmp_path):
    model_dir, data = assets
    run = tmp_path / "run"
    assert cli("train", *tiny_run_overrides(model_dir, data, run, "lora", steps=2), "--quiet").returncode == 0
    summary = json.loads((run / "summary.json").read_text())
    out = cli("eval", str(run), "--prompt", "What does `json.dumps` do?", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "perplexity" in out.stdout and "Q: What does `json.dumps` do?" in out.stdout
    ppl = float(out.stdout.split("perplexity ")[1].split()[0])
    assert ppl == pytest.approx(summary["valid_ppl_after"], rel=1e-3)  # the run's own validation split
    out = cli("generate", str(run), "--prompt", "Hello", "--max-new-tokens", "3")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = cli("merge", str(run))
    assert out.returncode == 0, out.stderr
    assert (run / "merged" / "config.json").is_file()
    out = cli("export", str(run), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert out.returncode == 0 and (tmp_path / "peft" / "adapter_config.json").is_file()
    out = cli("export", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert out.returncode == 2 and "template" in out.stderr  # a Hugging Face base has no GGUF layout to write into


def test_the_default_dataset_renders_with_held_out_modules(assets):
    import transformers

    from lorakit.tasks.causal_lm import load_examples

    model_dir, _ = assets
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    train_examples, valid_examples, stats = load_examples(load_config(None, []), tok)
    assert stats["shape"] == "instruction" and len(train_examples) > 200 and len(valid_examples) > 30
    assert all(any(y != -100 for y in e.labels) for e in train_examples)
