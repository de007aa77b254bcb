"""Experiment trackers (`train.report_to`, as in Hugging Face's Trainer): the numbers a run already
logs to metrics.jsonl, also sent to TensorBoard, Weights & Biases or MLflow.

The loop logs each record once, ``report.log(step, **fields)``: `Report` appends it to metrics.jsonl
and hands its numeric fields to every tracker, so the loop never branches per tracker. A field
``valid_X`` is reported as ``valid/X`` and any other field ``F`` as ``train/F`` (train/loss,
train/lr, train/grad_norm, train/tokens_per_s, train/peak_memory_bytes, valid/loss, valid/ppl),
which groups them in each tracker's interface.

    tracker      writes to                                         a resumed run
    tensorboard  RUN_DIR/tensorboard/ (SummaryWriter event files)   events after its checkpoint's step are purged
    wandb        RUN_DIR/wandb/; offline unless logged in           continues the same run id
    mlflow       file store RUN_DIR/mlruns, or MLFLOW_TRACKING_URI  continues the run tagged with RUN_DIR

Each also records the resolved config: TensorBoard as a text summary, W&B as the run config, MLflow as
params (dotted keys, e.g. ``train.lr``). W&B never waits for a network it cannot use: with
``WANDB_MODE=offline``, or with no API key (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or a
``wandb login`` entry in ~/.netrc for the W&B host), it runs offline (and sets ``WANDB_MODE=offline``
for the process); ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads such a run later. MLflow's
file store is in maintenance mode since MLflow 3 and refused unless ``MLFLOW_ALLOW_FILE_STORE=true``,
which lorakit sets when it picks the file store itself; set ``MLFLOW_TRACKING_URI`` for a server or
a database.

Only the main process (rank 0) reports. Each library is imported when its tracker opens, at the start
of `train` before the model loads, so a missing one stops the run at once with the extra to install.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from lorakit.training.checkpoint import PREFIX
from lorakit.report.progress import MetricsLog


class Tracker(Protocol):
    def log(self, step: int, numbers: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class Report:
    """`MetricsLog` plus trackers: `log(step, **fields)` writes the record and forwards its numbers."""

    def __init__(self, metrics: MetricsLog, trackers: list[Tracker]):
        self.metrics, self.trackers = metrics, trackers

    def log(self, step: int, **fields: Any) -> dict[str, Any]:
        record = self.metrics.log(step, **fields)
        numbers = {tracker_name(k): float(v) for k, v in fields.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(step, numbers)
        return record

    def close(self) -> None:
        self.metrics.close()
        for tracker in self.trackers:
            tracker.close()


def tracker_name(field: str) -> str:
    """'valid_loss' -> 'valid/loss', 'loss' -> 'train/loss'."""
    return "valid/" + field[len("valid_"):] if field.startswith("valid_") else "train/" + field


def open_trackers(config, run_dir: Path, checkpoint: Path | None) -> list[Tracker]:
    """The trackers `config.train.report_to` names, opened for the run in `run_dir`; `checkpoint`: the
    checkpoint a resumed run continues from (None for a new run)."""
    resume_step = None if checkpoint is None else int(checkpoint.name[len(PREFIX):])
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(config.train.report_to):
            opened.append(_OPEN[name](config, Path(run_dir), resume_step))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


def _missing(name: str, error: ImportError) -> ImportError:
    return ImportError(f"train.report_to names {name!r}: install it with pip install 'lorakit[{name}]', "
                       f"or remove it from train.report_to ({error})")


class TensorBoard:
    """Scalars in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`), the config as text."""

    def __init__(self, config, run_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard", e) from None
        import yaml

        # purge_step hides the events a killed run wrote after the checkpoint it resumes from
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            text = yaml.safe_dump(config.to_dict(), sort_keys=False)
            self.writer.add_text("config", "".join("    " + line for line in text.splitlines(True)), 0)

    def log(self, step: int, numbers: dict[str, float]) -> None:
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a crash loses no logged step

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in RUN_DIR/wandb/, project $WANDB_PROJECT (default "lorakit"), named after RUN_DIR."""

    def __init__(self, config, run_dir: Path, resume_step: int | None):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", e) from None
        if os.environ.get("WANDB_MODE") not in ("offline", "dryrun", "disabled") and not wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
        run_id = _previous_wandb_id(run_dir) if resume_step is not None else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lorakit", name=run_dir.name,
                              dir=str(run_dir), config=config.to_dict(), id=run_id,
                              resume="allow" if run_id else None, settings=wandb.Settings(init_timeout=60))

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_logged_in() -> bool:
    """Whether W&B has credentials without asking the network: an API key or identity token in the
    environment, or a netrc entry for the W&B host ($WANDB_BASE_URL, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def _previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the W&B run a resumed run continues: its directory is [offline-]run-DATE_TIME-ID."""
    latest = run_dir / "wandb" / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.exists() else None


class MLflow:
    """An MLflow run in experiment $MLFLOW_EXPERIMENT_NAME (default "lorakit"), named after RUN_DIR."""

    def __init__(self, config, run_dir: Path, resume_step: int | None):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow", e) from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self._metric = MlflowClient(tracking_uri=uri), Metric
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorakit"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tag = f"tags.`lorakit.run_dir` = '{run_dir}'"
        previous = self.client.search_runs([experiment_id], tag, max_results=1) if resume_step is not None else []
        if previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags={"lorakit.run_dir": str(run_dir), "lorakit.method": config.method})
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in _flat(config.to_dict())]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, numbers: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in numbers.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """{'train': {'lr': 0.0002}} -> [('train.lr', '0.0002')]; lists and null as JSON."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value if isinstance(value, str) else json.dumps(value)))
    return out


_OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}  # the names of train.report_to
