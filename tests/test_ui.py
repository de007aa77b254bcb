"""`lorakit ui`'s actions without a browser: a bad field gets the CLI's message, settings spell the
command line a person would type, and a run started from the page is an ordinary child `lorakit train`
that stops on a signal, resumes exactly and answers chat. The page itself, export included, is driven in
a real browser by test_ui_browser.py (slow)."""

import time

import pytest
import torch

pytest.importorskip("gradio")

from train_fixtures import tiny_assets  # noqa: E402

from lorakit.training.checkpoint import latest_checkpoint  # noqa: E402
from lorakit.report.progress import read_metrics  # noqa: E402
from lorakit.training.run_config import load_config  # noqa: E402
from lorakit.ui import actions  # noqa: E402


def test_bad_field_gets_the_cli_message(tmp_path, capsys):
    from lorakit.cli import main

    errors = actions.check_settings({"method": "qalora", "train.lr": 0, "adapter.r": 16, "train.steps": None})
    assert set(errors) == {"train.lr"}
    assert main(["train", "train.lr=0", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip() == f"lorakit train: error: {errors['train.lr']}"
    assert errors["train.lr"] == "override 'train.lr=0': train.lr=0 must be a number > 0"

    errors = actions.check_settings({"data.train": str(tmp_path / "missing.jsonl"),
                                     "model.path": str(tmp_path / "missing.gguf"), "adapter.r": 0})
    assert errors == {"adapter.r": "override 'adapter.r=0': adapter.r=0 must be an integer >= 1"}  # fields first
    errors = actions.check_settings({"data.train": str(tmp_path / "missing.jsonl"),
                                     "model.path": str(tmp_path / "missing.gguf")})
    assert errors == {"data.train": f"{tmp_path / 'missing.jsonl'}: no such data file",
                      "model.path": f"GGUF file not found: {tmp_path / 'missing.gguf'}"}
    assert actions.check_settings({"method": "qalora", "train.steps": 2}) == {}


def test_settings_spell_the_command_line():
    settings = {"model.path": "", "data.train": "my data.jsonl", "method": "qalora", "train.steps": 2,
                "train.lr": 0.001, "adapter.alpha": 32.0, "data.max_tokens": None, "output_dir": "null"}
    args = actions.overrides(settings)
    assert actions.train_command(args) == ("lorakit train 'data.train=my data.jsonl' method=qalora train.steps=2 "
                                           "train.lr=0.001 adapter.alpha=32.0 'output_dir=\"null\"'")
    config = load_config(None, args)  # what the child process reads back
    assert config.data.train == "my data.jsonl" and config.output_dir == "null"
    assert config.train.steps == 2 and config.train.lr == 1e-3
    assert config.model.path is None and config.data.max_tokens == 512  # empty fields keep the defaults


def test_smoothed_curve():
    assert actions.smoothed([(1, 2.0), (2, 2.0), (3, 2.0)]) == [(1, 2.0), (2, pytest.approx(2.0)),
                                                                (3, pytest.approx(2.0))]
    assert actions.smoothed([(1, 4.0), (2, float("nan")), (3, 0.0)]) == [(1, 4.0), (3, pytest.approx(4 * 0.8 / 1.8))]


def test_page_builds():
    from lorakit.ui.app import SETTINGS, build_app

    app = build_app()
    labels = {getattr(block, "label", None) for block in app.blocks.values()}
    assert {label for label, _ in SETTINGS.values()} <= labels


def _wait(condition, timeout: float = 300.0):  # generous: the suite may share 2 cores with other work
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_start_stop_resume_chat(tmp_path_factory):
    model_dir, data = tiny_assets(tmp_path_factory, "ui-assets")
    out = tmp_path_factory.mktemp("ui") / "run"
    settings = {"model.path": str(model_dir), "model.dtype": "float32", "data.train": str(data),
                "data.valid_fraction": 0.25, "data.max_tokens": 64, "method": "lora", "train.steps": 20,
                "train.batch_size": 4, "train.lr": 0.01, "train.save_every": 2, "train.eval_every": 10,
                "adapter.r": 4, "adapter.alpha": 8.0, "output_dir": str(out)}
    run = actions.TrainingProcess.start(settings)
    try:
        assert run.command == actions.train_command(actions.overrides(settings))
        _wait(lambda: actions.read_progress(out).step >= 3 or not run.running)
        assert run.stop() != 0 and run.stopped  # terminated, not finished
    finally:
        run.stop()
    stopped = actions.read_progress(out)
    assert 3 <= stopped.step < 20 and not stopped.finished and stopped.total_steps == 20
    assert stopped.tokens_per_s > 0 and stopped.eta_s is not None and "ETA" in stopped.line(running=True)
    assert stopped.valid[0][0] == 0 and stopped.train[:3] == [(1, stopped.train[0][1]), (2, stopped.train[1][1]),
                                                              (3, stopped.train[2][1])]
    assert latest_checkpoint(out) is not None
    assert (out / actions.LOG_FILE).read_text().startswith(f"$ {run.command}\n")
    assert actions.log_tail(out).endswith(f"lorakit train --resume {out} continues it")
    with pytest.raises(ValueError, match="already holds a run; continue it with Resume"):
        actions.TrainingProcess.start(settings)

    resumed = actions.TrainingProcess.resume(out)
    try:
        assert resumed.command == f"lorakit train --resume {out}"
        _wait(lambda: not resumed.running)
    finally:
        resumed.stop()
    assert resumed.returncode == 0, actions.log_tail(out)
    done = actions.read_progress(out)
    assert done.finished and done.step == 20 and "ETA" not in done.line()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 21))  # resumed where the checkpoint was: no step twice, none missing

    from lorakit.demo import answer
    from lorakit.training.run_config import read_run_config
    from lorakit.tasks.causal_lm import load_model

    question = "What does textwrap.dedent do?"
    base, tuned = actions.ChatModels().answers(out, question, max_new_tokens=4)
    plain, tokenizer = load_model(read_run_config(out), dtype=torch.float32)
    assert base == answer(plain, tokenizer, question, 4)  # adapter off: the base model itself
    assert isinstance(tuned, str)
