"""What the web UI's buttons do, as plain functions that know nothing about Gradio.

Everything the UI starts is the command line's own work, so nothing it makes is special:

    Start    python -m lorakit train key=value ...       (the overrides the form's fields spell)
    Stop     SIGTERM to that child; SIGKILL if it has not exited after `grace_s`
    Resume   python -m lorakit train --resume RUN_DIR     (exact: the checkpoints hold optimizer, RNG, data position)
    Export   python -m lorakit export RUN_DIR --format F --out PATH

A child process rather than a thread: the run directory is the one `lorakit train` writes, stopping
is a signal (a SIGKILL at any point leaves the last checkpoint loadable), a crash in training cannot
take the UI down, and the command line the UI shows is exactly what ran. The child's output goes to
RUN_DIR/train.log. Progress is read back from RUN_DIR/metrics.jsonl, the log every run writes.

A field is checked the way the CLI checks it, with the CLI's message: `load_config(None,
["key=value"])` for each setting alone (so the message lands beside its field), then the data
file's rows and the model path, with the same functions `lorakit train` calls.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LOG_FILE = "train.log"  # the child's stdout and stderr, in its run directory
EXPORT_FORMATS = {"gguf": "model.gguf", "gguf-adapter": "adapter.gguf", "peft": "peft", "hf": "hf",
                  "ollama": "ollama"}  # --format -> default name under RUN_DIR/export/
_SMOOTHING = 0.8  # weight of the past in the smoothed train loss (an exponential moving average)
_ETA_WINDOW = 20  # the ETA is the mean time of the last this many logged steps, times the steps left


# -- settings -> overrides -> command line ---------------------------------------------------------

def overrides(settings: Mapping[str, Any]) -> list[str]:
    """`key=value` overrides for the settings a person filled in, in order; an empty field (None or "")
    keeps the default (for model.path and data.train: the embedded model and data)."""
    return [_override(key, value) for key, value in settings.items() if value not in (None, "")]


def _override(key: str, value: Any) -> str:
    return f"{key}={_yaml_value(value)}"


def _yaml_value(value: Any) -> str:
    """`value` as the override's YAML text: a string that YAML would read as something else (a path
    named 'null', or with ': ' in it) is quoted."""
    if isinstance(value, str):
        value = value.strip()
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return str(value)


def train_command(args: list[str]) -> str:
    """The `lorakit train ...` command line a person would type for these arguments."""
    return shlex.join(["lorakit", "train", *args])


def check_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """{setting key: the CLI's error message} for each bad field; empty when `lorakit train` would accept them.
    Each value is checked alone first, so a message names one field; the paths only once all values are good."""
    from lorakit.training.run_config import load_config

    errors = {}
    for key, value in settings.items():
        if value in (None, ""):
            continue
        try:
            load_config(None, [_override(key, value)])
        except (ValueError, TypeError) as e:
            errors[key] = str(e)
    if errors:
        return errors
    config = load_config(None, overrides(settings))
    for key, check in (("model.path", _check_model), ("data.train", _check_data), ("output_dir", _check_new_run)):
        try:
            check(config)
        except (ValueError, FileNotFoundError) as e:
            errors[key] = str(e)
    return errors


def _check_model(config) -> None:
    from lorakit.tasks.causal_lm import is_gguf

    path = config.model.path
    if path is None:
        return
    if is_gguf(path):
        from lorakit.formats.gguf_load import read_gguf

        read_gguf(path)
    else:
        from lorakit.models.default import check_model_dir

        check_model_dir(Path(path).expanduser())  # the CLI's own message


def _check_data(config) -> None:
    if config.data.train is not None:
        from lorakit.data.records import read_records

        read_records(config.data.train, config.data.shape)


def _check_new_run(config) -> None:
    from lorakit.training.checkpoint import latest_checkpoint

    if latest_checkpoint(config.output_dir) is not None:
        raise ValueError(f"{config.output_dir} already holds a run; continue it with Resume, or set the output "
                         f"directory to a new one (nothing there is overwritten)")


# -- the training child process --------------------------------------------------------------------

class TrainingProcess:
    """`lorakit train` running in a child process that writes `run_dir`; `args` are its arguments."""

    def __init__(self, run_dir: str | os.PathLike, args: list[str]):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.args = list(args)
        self.command = train_command(self.args)
        self.stopped = False  # by `stop`, rather than by finishing or failing
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_FILE, "ab") as log:
            log.write(f"$ {self.command}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self._process = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *self.args], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    @classmethod
    def start(cls, settings: Mapping[str, Any]) -> TrainingProcess:
        """A new run of these settings; refuses (ValueError with every field's message) settings the CLI refuses."""
        from lorakit.training.run_config import load_config

        errors = check_settings(settings)
        if errors:
            raise ValueError("; ".join(errors.values()))
        args = overrides(settings)
        return cls(load_config(None, args).output_dir, args)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike) -> TrainingProcess:
        """Continue the run in `run_dir` from its newest checkpoint."""
        from lorakit.training.checkpoint import latest_checkpoint

        if latest_checkpoint(run_dir) is None:
            raise ValueError(f"nothing to resume in {run_dir}: it has no complete checkpoint "
                             f"(checkpoints/step-*/state.json)")
        return cls(run_dir, ["--resume", str(run_dir)])

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def stop(self, grace_s: float = 10.0) -> int:
        """Terminate the run (SIGTERM; SIGKILL if it has not exited after `grace_s`) and note it in the log;
        its exit status. Every checkpoint is written atomically, so the newest one is whole either way."""
        if self.running:
            self.stopped = True
            self._process.terminate()
            try:
                self._process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(f"stopped from lorakit ui (exit status {self._process.wait()}); "
                          f"lorakit train --resume {self.run_dir} continues it\n")
        return self._process.wait()


def log_tail(run_dir: str | os.PathLike, lines: int = 12) -> str:
    """The last lines of the run's train.log; a progress line redrawn with '\\r' shows its last state."""
    path = Path(run_dir).expanduser() / LOG_FILE
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


# -- progress ---------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where a run stands, from its metrics log and files."""

    step: int
    total_steps: int | None
    loss: float | None
    lr: float | None
    tokens_per_s: float | None
    eta_s: float | None
    finished: bool  # adapter/ and summary.json are written
    train: list[tuple[int, float]]  # (step, loss)
    valid: list[tuple[int, float]]  # (step, validation loss)

    def line(self, running: bool = False) -> str:
        """'step 12/40 · loss 2.3141 · lr 1.00e-03 · 512 tokens/s' (what is known so far), and ' · ETA 0:01:10'
        while `running`."""
        parts = [f"step {self.step}/{self.total_steps or '?'}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.valid:
            parts.append(f"valid loss {self.valid[-1][1]:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if running:
            parts.append(f"ETA {_hms(self.eta_s)}")
        return " · ".join(parts)


def read_progress(run_dir: str | os.PathLike) -> Progress:
    """The run's progress so far (an empty one before its first metrics line)."""
    from lorakit.report.progress import read_metrics
    from lorakit.training.run_config import read_run_config

    run_dir = Path(run_dir).expanduser()
    try:
        total = read_run_config(run_dir).train.steps
    except (FileNotFoundError, ValueError):
        total = None
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    steps = [r for r in records if "loss" in r]
    last = steps[-1] if steps else {}
    window = steps[-_ETA_WINDOW - 1:]
    eta = None
    if total and len(window) >= 2 and window[-1]["step"] > window[0]["step"]:
        per_step = (window[-1]["time"] - window[0]["time"]) / (window[-1]["step"] - window[0]["step"])
        eta = (total - last["step"]) * per_step
    return Progress(step=last.get("step", 0), total_steps=total, loss=last.get("loss"), lr=last.get("lr"),
                    tokens_per_s=last.get("tokens_per_s"), eta_s=eta,
                    finished=(run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir(),
                    train=[(r["step"], r["loss"]) for r in steps],
                    valid=[(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r])


def smoothed(points: list[tuple[int, float]], weight: float = _SMOOTHING) -> list[tuple[int, float]]:
    """An exponential moving average of the train loss, debiased (as TensorBoard's smoothing), so the first
    points are not pulled towards 0: s_k = w s_{k-1} + (1 - w) x_k, shown as s_k / (1 - w^k)."""
    out, s = [], 0.0
    for step, value in points:
        if math.isfinite(value):  # a NaN loss is logged (it stopped the run), but cannot be averaged
            s = weight * s + (1 - weight) * value
            out.append((step, s / (1 - weight ** (len(out) + 1))))
    return out


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- chat -------------------------------------------------------------------------------------------

class ChatModels:
    """A finished run's model, loaded once (and again when its adapter changes), answering as the base
    (adapter disabled) and as the fine-tuned model."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: tuple[str, float] | None = None
        self._model = self._tokenizer = None

    def answers(self, run_dir: str | os.PathLike, question: str, max_new_tokens: int = 64) -> tuple[str, str]:
        """(base answer, fine-tuned answer) to `question`, greedy, in the model's chat template."""
        import lorakit
        from lorakit.demo import answer

        if not question.strip():
            raise ValueError("type a question first")
        with self._lock:  # one generation at a time: the model is shared, and 2 cores are busy enough
            model, tokenizer = self._load(Path(run_dir).expanduser())
            with lorakit.disable_adapters(model):
                base = answer(model, tokenizer, question, max_new_tokens)
            return base, answer(model, tokenizer, question, max_new_tokens)

    def _load(self, run_dir: Path):
        from lorakit.tasks.causal_lm import load_trained

        weights = run_dir / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{run_dir} has no adapter/ yet: a run writes it when it finishes; chat once it "
                                    f"has (a stopped run: Resume it)")
        key = (str(run_dir.resolve()), weights.stat().st_mtime)
        if key != self._key:
            self._model = self._tokenizer = None  # free the old model before loading the next
            self._model, self._tokenizer, _ = load_trained(run_dir)
            self._key = key
        return self._model, self._tokenizer


# -- export -----------------------------------------------------------------------------------------

def export_path(run_dir: str | os.PathLike, fmt: str) -> Path:
    """Where an export goes when no path is given: RUN_DIR/export/model.gguf and the like."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    return Path(run_dir).expanduser() / "export" / EXPORT_FORMATS[fmt]


def export(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> tuple[str, str, bool]:
    """Run `lorakit export RUN_DIR --format FMT --out OUT`: (its command line, what it printed, whether it
    succeeded). What it printed is its report (stdout); after a failure, its stderr too (the error)."""
    out = Path(out).expanduser() if out else export_path(run_dir, fmt)
    args = ["export", str(run_dir), "--format", fmt, "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    printed = done.stdout if done.returncode == 0 else done.stdout + done.stderr
    return shlex.join(["lorakit", *args]), printed.strip(), done.returncode == 0
