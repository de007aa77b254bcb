"""Loss curves of training runs as an image (matplotlib): the run's own `loss_curve.png`, and
`lorakit plot` overlaying several runs (LoRA vs QLoRA vs QA-LoRA on the same data).

The numbers come from each run's `metrics.jsonl` (`lorakit.report.progress.read_metrics`): `loss` (the
token-weighted train loss of a step), `valid_loss` (step 0 is the base model) and `lr`. The chart
has two panels sharing the step axis: losses on top, the learning-rate schedule below.

A train loss is noisy from step to step, so it is drawn twice: raw (faint) and smoothed by an
exponential moving average with the bias correction of Adam, so the first points are not pulled
toward zero:

    m_t = beta * m_{t-1} + (1 - beta) * y_t,    m_0 = 0,    smoothed_t = m_t / (1 - beta^t)
    beta = 1 - 2 / (span + 1),    span = max(2, round(sqrt(n)))  (n: logged train points)

i.e. a weighted mean of the points so far whose weights halve about every span / 3 points. The
span grows with the run, so a short run's trend shows through its noise, but slower than the run:
the smoothed curve lags about span / 2 points, 1% of a 2000-point run. The legend names the span.
Non-finite values (a NaN loss that stopped a run) are left out of the lines.

matplotlib is optional (`pip install 'lorakit[plot]'`) and imported inside the functions that draw,
so `import lorakit` does not load it; figures use the Agg canvas directly, with no pyplot state and
no display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.io import atomic_write

INSTALL_HINT = "pip install 'lorakit[plot]'"
_SIZE_INCHES, _DPI = (10.0, 6.4), 100  # 1000 x 640 pixels
_TRAIN, _VALID, _LR = "tab:blue", "tab:orange", "tab:green"


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Read each run directory's metrics and draw them into `out` (.png, or .svg / .pdf); one run gets the
    detailed chart (raw, smoothed and validation loss in their own colours), several get one colour each."""
    if not run_dirs:
        raise ValueError("no run directory given: name one or more output_dir of `lorakit train` runs")
    dirs = [Path(d) for d in run_dirs]
    names = [d.resolve().name for d in dirs]
    runs = [(f"{name if names.count(name) == 1 else d} ({method})", records)  # a path tells same-named runs apart
            for d, name, (method, records) in zip(dirs, names, map(read_run, dirs))]
    title = f"{runs[0][0]}: loss and learning rate" if len(runs) == 1 else f"loss of {len(runs)} runs"
    return save_loss_curves(out, runs, title)


def read_run(run_dir: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """(method, metrics records) of a `lorakit train` run directory, with an error that says what is missing."""
    from lorakit.report.progress import read_metrics
    from lorakit.training.run_config import read_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: give the output_dir of a `lorakit train` run")
    method = read_run_config(run_dir).method
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not logged a step yet")
    records = read_metrics(path)
    if not any("loss" in r or "valid_loss" in r for r in records):
        raise ValueError(f"{path} holds no loss yet ({len(records)} records): plot the run once it has taken a step")
    return method, records


def save_loss_curves(path: str | os.PathLike, runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
                   title: str = "loss") -> Path:
    """Draw `runs`, (label, metrics records) pairs, into the image file `path`, written atomically."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"{path}: cannot tell the image format from the suffix {path.suffix!r}; "
                         f"name a .png file (or .svg, .pdf)")
    canvas_type, figure_type = _matplotlib()
    fig = figure_type(figsize=_SIZE_INCHES, dpi=_DPI, layout="constrained")
    canvas_type(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if len(runs) == 1:
        _draw_one(loss_ax, lr_ax, runs[0][1])
    else:
        _draw_many(loss_ax, lr_ax, runs)
    _style(loss_ax, lr_ax, title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """The bias-corrected exponential moving average of the module docstring."""
    beta = 1 - 2 / (span + 1)
    out, m = np.empty(len(values)), 0.0
    for t, y in enumerate(values, 1):
        m = beta * m + (1 - beta) * y
        out[t - 1] = m / (1 - beta ** t)
    return out


def span_of(n: int) -> int:
    return max(2, round(math.sqrt(n)))


def series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """(n, 2) array of (step, value) for the records holding a finite `key`."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _draw_one(loss_ax, lr_ax, records) -> None:
    train, valid, lr = series(records, "loss"), series(records, "valid_loss"), series(records, "lr")
    if len(train):
        span = span_of(len(train))
        loss_ax.plot(train[:, 0], train[:, 1], color=_TRAIN, alpha=0.3, linewidth=1, label="train loss")
        loss_ax.plot(train[:, 0], ema(train[:, 1], span), color=_TRAIN, linewidth=2.2,
                     label=f"train loss, smoothed (EMA, span {span} points)")
    if len(valid):
        loss_ax.plot(valid[:, 0], valid[:, 1], color=_VALID, linewidth=2, marker="o", markersize=5,
                     label="validation loss")
    if len(lr):
        lr_ax.plot(lr[:, 0], lr[:, 1], color=_LR, linewidth=2)
    if not len(train) and not len(valid):
        _no_data(loss_ax, "no finite loss logged")


def _draw_many(loss_ax, lr_ax, runs) -> None:
    from matplotlib.lines import Line2D

    handles = []
    for i, (label, records) in enumerate(runs):
        colour = f"C{i % 10}"
        train, valid, lr = series(records, "loss"), series(records, "valid_loss"), series(records, "lr")
        if len(train):
            loss_ax.plot(train[:, 0], train[:, 1], color=colour, alpha=0.18, linewidth=1)
            loss_ax.plot(train[:, 0], ema(train[:, 1], span_of(len(train))), color=colour, linewidth=2)
        if len(valid):
            loss_ax.plot(valid[:, 0], valid[:, 1], color=colour, linewidth=1.6, linestyle="--", marker="o",
                         markersize=5)
        if len(lr):
            lr_ax.plot(lr[:, 0], lr[:, 1], color=colour, linewidth=1.6)
        handles.append(Line2D([], [], color=colour, linewidth=3, label=label))
    handles += [Line2D([], [], color="0.3", linewidth=2, label="train loss (EMA; raw faint)"),
                Line2D([], [], color="0.3", linewidth=1.6, linestyle="--", marker="o", markersize=5,
                       label="validation loss")]
    loss_ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)


def _style(loss_ax, lr_ax, title: str) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    loss_ax.set_title(title, fontsize=13, loc="left")
    loss_ax.set_ylabel("loss (nats per token)", fontsize=11)
    if loss_ax.get_legend() is None and loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    lr_ax.set_ylabel("learning rate", fontsize=11)
    lr_ax.set_xlabel("optimizer step", fontsize=11)
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: "0" if x == 0 else f"{x:.1e}"))
    lr_ax.yaxis.set_major_locator(MaxNLocator(4, steps=[1, 2, 5, 10]))
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.set_ylim(bottom=0)
    if not lr_ax.get_lines():
        _no_data(lr_ax, "no learning rate logged")
    for ax in (loss_ax, lr_ax):
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=10)
        ax.spines[["top", "right"]].set_visible(False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.4")


def _matplotlib():
    """(FigureCanvasAgg, Figure), or an ImportError naming the extra that installs matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"loss curves need matplotlib ({e}): {INSTALL_HINT}") from None
    return FigureCanvasAgg, Figure
