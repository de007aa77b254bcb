"""`train.report_to`: a tiny run reports to TensorBoard, W&B (offline) and MLflow (file store), and each
tracker's own reader gets back the numbers metrics.jsonl holds; a resumed run continues its tracker's run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lorakit.report.progress import read_metrics  # noqa: E402
from lorakit.training.run_config import load_config  # noqa: E402
from lorakit.training.loop import train  # noqa: E402
from train_fixtures import tiny_assets, tiny_run_overrides  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory, "trackers")


def tiny_run(assets, run: Path, tracker: str, *extra: str):
    model_dir, data = assets
    config = load_config(None, tiny_run_overrides(model_dir, data, run, "lora", steps=STEPS)
                         + [f"train.report_to=[{tracker}]", *extra])
    return train(config, progress=False)


def logged(run: Path, field: str) -> list[tuple[int, float]]:
    return [(r["step"], r[field]) for r in read_metrics(run / "metrics.jsonl") if field in r]


def same(got, want, rel):
    """Two lists of (step, value): the same steps, values within `rel`."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=rel)
    return True


def resume_from_step_2(run: Path):
    """Drop the newest checkpoint (step 4), as if the run had been killed after step 4's metrics, and resume:
    steps 3 and 4 run again."""
    shutil.rmtree(run / "checkpoints" / "step-000004")
    shutil.rmtree(run / "adapter")
    config = load_config(str(run / "config.yaml"), [])
    return train(config, resume=True, progress=False)


def test_tensorboard_event_files_hold_the_logged_numbers(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    run = tmp_path / "run"
    tiny_run(assets, run, "tensorboard")

    def read():
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        return events

    events = read()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_memory_bytes",
            "valid/loss", "valid/ppl"} <= set(events.Tags()["scalars"])
    for tag, field in [("train/loss", "loss"), ("valid/loss", "valid_loss"), ("train/lr", "lr")]:
        assert same([(e.step, e.value) for e in events.Scalars(tag)], logged(run, field), 1e-6)  # float32 there
    assert [e.step for e in events.Scalars("valid/loss")] == [0, 3, 4]
    assert all(e.value > 2**20 for e in events.Scalars("train/peak_memory_bytes"))
    text = make_ndarray(events.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert "report_to:" in text and "- tensorboard" in text and "lr: 0.01" in text

    resume_from_step_2(run)
    events = read()  # the events the first run wrote after step 2 are purged: each step once
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert same([(e.step, e.value) for e in events.Scalars("train/loss")], logged(run, "loss"), 1e-6)


def test_wandb_runs_offline_without_a_login_and_its_run_file_reads_back(assets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep W&B out of the home directory
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    run = tmp_path / "run"
    tiny_run(assets, run, "wandb")
    assert os.environ["WANDB_MODE"] == "offline"
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    (run_file,) = wandb_run.glob("run-*.wandb")
    inspected = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    records = [json.loads(line) for line in inspected.stdout.splitlines() if line.startswith("{")]
    (header,) = [r["run"] for r in records if r["type"] == "run"]
    assert header["project"] == "lorakit" and header["config"]["update"]["train"]["report_to"] == ["wandb"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    got = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    assert same(got, logged(run, "loss"), 1e-12)
    got = [(h["_step"], h["valid/loss"]) for h in history if "valid/loss" in h]
    assert same(got, logged(run, "valid_loss"), 1e-12)
    assert all(h["train/peak_memory_bytes"] > 2**20 for h in history if "train/loss" in h)
    assert any(r["type"] == "exit" and r["exit"]["exit_code"] == 0 for r in records)  # finished, not crashed


def test_mlflow_file_store_holds_the_run_its_params_and_metrics(assets, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # and restored afterwards: lorakit sets MLFLOW_ALLOW_FILE_STORE
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage over the network otherwise
    run = tmp_path / "run"
    tiny_run(assets, run, "mlflow")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("lorakit")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.01" and found.data.params["method"] == "lora"
    assert found.data.params["train.report_to"] == '["mlflow"]'
    assert found.data.tags["lorakit.run_dir"] == str(run)

    def history(name):
        return sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, name))

    assert same(history("train/loss"), logged(run, "loss"), 1e-12)
    assert same(history("valid/ppl"), logged(run, "valid_ppl"), 1e-12)

    resume_from_step_2(run)
    (again,) = client.search_runs([experiment.experiment_id])  # the same MLflow run continues
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    assert {step for step, _ in history("train/loss")} == {1, 2, 3, 4}


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    run = tmp_path / "run"
    with pytest.raises(ImportError, match=r"train.report_to names 'wandb': install it with pip install 'lorakit\[wandb\]'"):
        tiny_run(assets, run, "wandb")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_bad_tracker_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"train.report_to=\['tensorbord'\] must be a list of names from "
                                         r"\['tensorboard', 'wandb', 'mlflow'\], or \[\] for none "
                                         r"\(did you mean 'tensorboard'\?\)"):
        load_config(None, ["train.report_to=[tensorbord]"])
    assert load_config(None, []).train.report_to == []
