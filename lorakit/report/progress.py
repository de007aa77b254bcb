"""The side outputs of a training run: a progress line for people and a metrics log for programs.

The training loop calls ``bar.update(...)`` and ``log.log(...)`` once per step with numbers it
already has; neither reaches into the step, and both can be dropped without changing training.

A progress line shows the step, the train loss, the learning rate, the task's throughput (for a causal
LM, useful tokens per second: tokens that carry a loss, so padding and prompts do not count), the peak memory so far (`peak_memory_bytes`
in `lorakit.training.memory`), the elapsed time and an ETA. On a terminal it is a tqdm bar redrawn in place
(tqdm is optional: ``pip install 'lorakit[plot]'``; its ETA uses tqdm's smoothed step rate).
Anywhere else (CI, a file, a pipe), or without tqdm, it prints a plain line every
``max(1, total_steps // 20)`` steps and at the last step, so a log holds about 20 lines per run.
The plain line's ETA is

    ETA = (total_steps - step) * mean step time over the last ``_WINDOW`` steps,

so it follows a run that speeds up after warm-up (compilation, caches) instead of averaging the
slow start into every later estimate.

``MetricsLog`` appends one JSON object per line (JSONL) and fsyncs each line, so a SIGKILL loses
at most the line being written. ``read_metrics`` ignores that torn last line. A resumed run opens
the log with ``truncate_after_step=k`` (the step of the checkpoint it resumes from), which drops
the records written after that checkpoint, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from lorakit.io import write_text

_WINDOW = 20  # steps in the moving average behind the plain line's ETA
_TTY_REDRAW_S = 0.1  # a terminal line is redrawn at most this often (and at the last step)


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_bytes(n: int) -> str:
    """A byte count for people: "812 MiB", "1.52 GiB"."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class ProgressBar:
    """Progress of `total_steps` optimizer steps on `stream`; `enabled=False` writes nothing. `speed_label`
    names the throughput the loop reports (its task's: "useful tok/s", "img/s")."""

    def __init__(self, total_steps: int, stream: TextIO = sys.stderr, enabled: bool = True,
                 speed_label: str = "useful tok/s"):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: the progress bar needs a positive whole number of steps")
        self.total_steps, self.stream, self.enabled, self.speed_label = total_steps, stream, enabled, speed_label
        isatty = getattr(stream, "isatty", None)
        self._tqdm_type = _tqdm() if isatty and isatty() else None  # None: plain lines
        self._bar = None  # the tqdm bar, made at the first update (a resumed run starts part-way)
        self.every = max(1, total_steps // 20)  # plain-line interval
        self._start = time.monotonic()
        self._window: deque[tuple[float, int]] = deque(maxlen=_WINDOW + 1)  # (time, step)
        self._pending: str | None = None  # a plain line not yet printed (the run stopped between intervals)
        self._closed = False

    def update(self, step: int, loss: float, per_s: float, lr: float | None = None,
               peak_memory_bytes: int | None = None) -> None:
        """Report that optimizer step `step` (1-based) finished with this loss, throughput and memory peak."""
        if not self.enabled or self._closed:
            return
        numbers = [f"loss {loss:.4f}"] + ([f"lr {lr:.2e}"] if lr is not None else [])
        numbers.append(f"{per_s:,.0f} {self.speed_label}")
        if peak_memory_bytes is not None:
            numbers.append(f"peak {format_bytes(peak_memory_bytes)}")
        if self._tqdm_type is not None:
            self._draw(step, " | ".join(numbers))
            return
        now = time.monotonic()
        if not self._window:  # the first step reported (1, or k + 1 on resume) ran since construction
            self._window.append((self._start, step - 1))
        self._window.append((now, step))
        (t0, s0), (t1, s1) = self._window[0], self._window[-1]
        eta = (self.total_steps - step) * (t1 - t0) / (s1 - s0) if s1 > s0 else None
        line = " | ".join([f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}", *numbers,
                           f"elapsed {_hms(now - self._start)}", f"ETA {_hms(eta)}"])
        if step >= self.total_steps or step % self.every == 0:
            self._write(line + "\n")
            self._pending = None
        else:
            self._pending = line

    def close(self, summary: str | None = None) -> None:
        """End the progress display (printing the last state if it was not shown) and print `summary`."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._pending is not None:
            self._write(self._pending + "\n")
        if summary:
            self._write(summary + "\n")

    def _draw(self, step: int, numbers: str) -> None:
        if self._bar is None:
            self._bar = self._tqdm_type(total=self.total_steps, initial=step - 1, file=self.stream, dynamic_ncols=True,
                                        mininterval=_TTY_REDRAW_S,
                                        bar_format="{percentage:3.0f}%|{bar}| step {n}/{total} "
                                                   "[{elapsed}<{remaining}] {desc}")
        self._bar.set_description_str(numbers, refresh=False)  # {desc}: the numbers after the bar
        self._bar.update(step - self._bar.n)
        if step >= self.total_steps:
            self._bar.refresh()

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _tqdm():
    """tqdm's bar class, or None when tqdm is not installed (plain lines then)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class MetricsLog:
    """Append-only JSONL metrics: one ``{"step": ..., "time": ..., **fields}`` object per line.

    ``time`` is wall-clock Unix seconds, so records from a run and its resumption line up.
    Non-finite floats are written as ``NaN`` / ``Infinity``, which Python's ``json`` (and so
    ``read_metrics``) reads back; a NaN loss is a result worth keeping, not a value to hide.
    """

    def __init__(self, path: str | os.PathLike, truncate_after_step: int | None = None):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            kept = [line for line, record in _complete_lines(self.path) if record["step"] <= truncate_after_step]
            write_text(self.path, "".join(kept))
        else:
            _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **fields: Any) -> dict[str, Any]:
        """Append one record and fsync it; returns the record written."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}: a metrics record needs a non-negative whole step number")
        if "time" in fields:
            raise ValueError("'time' is set by MetricsLog (wall-clock seconds); name the field differently")
        record = {"step": step, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, default=_json_scalar) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics log, in order; a torn last line (the writer was killed) is ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"metrics log not found: {path}")
    return [record for _, record in _complete_lines(path)]


def _complete_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each newline-terminated line; a missing file has none."""
    if not path.exists():
        return []
    # The last piece is "" after a final newline, else a torn line: each record is written
    # together with its newline, so an unterminated line is one the writer did not finish.
    lines = [piece + "\n" for piece in path.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"metrics log {path} line {number} is not JSON ({e}); "
                             f"the file was edited or corrupted") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"metrics log {path} line {number} has no integer 'step': {line.strip()[:80]}")
        out.append((line, record))
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line left by a killed writer, so the next record starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def _json_scalar(value: Any) -> Any:
    """NumPy scalars and one-element tensors (``loss`` before ``.item()``) as plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics field value {value!r} of type {type(value).__name__} is not a JSON number or string")
