"""Loss curves: PNGs read back (size, and pixels in each series' colour), `lorakit plot` over two tiny runs as
users run it, and the errors for what is not a run."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from lorakit.report.plot import ema, plot_runs, read_run, save_loss_curves  # noqa: E402
from lorakit.report.progress import MetricsLog  # noqa: E402
from lorakit.training.run_config import load_config, save_config  # noqa: E402

WIDTH, HEIGHT = 1000, 640


def records(steps=200, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = [{"step": 0, "valid_loss": 3.2 + offset}]
    for s in range(1, steps + 1):
        lr = 2e-4 * min(1.0, s / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
        out.append({"step": s, "loss": 2 * math.exp(-s / 50) + 1 + offset + rng.normal(0, 0.1), "lr": lr})
        if s % 25 == 0:
            out.append({"step": s, "valid_loss": 2 * math.exp(-s / 50) + 1.15 + offset})
    return out


def pixels_near(img, colour, tol=0.02):
    return int((np.abs(img[..., :3] - np.array(to_rgb(colour))) < tol).all(axis=-1).sum())


def test_one_run_shows_raw_smoothed_and_validation_loss_and_lr(tmp_path):
    path = save_loss_curves(tmp_path / "out" / "loss.png", [("tiny (qalora)", records())], "tiny (qalora)")
    img = imread(path)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    assert img[..., :3].std() > 0.05  # not blank
    assert pixels_near(img, "tab:blue") > 500 and pixels_near(img, "tab:orange") > 300
    assert pixels_near(img, "tab:green") > 300  # the lr panel
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary file left behind


@pytest.mark.parametrize("series", [
    [{"step": 1, "loss": 2.0}],  # a single point, no lr
    [{"step": s, "loss": 1.5, "lr": 1e-3} for s in range(10)],  # constant loss and lr
    [{"step": 1, "loss": 3.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": float("inf")},
     {"step": 4, "loss": 2.0}],  # non-finite points left out
    [{"step": 0, "valid_loss": 2.0}],  # validation only
    [{"step": 1, "loss": float("nan")}],  # nothing finite: a message instead of a curve
    [{"step": s * 1000, "loss": 1e-5 / (s + 1), "lr": 1e-5} for s in range(300)],  # long run, tiny losses
])
def test_edge_cases_render(tmp_path, series):
    img = imread(save_loss_curves(tmp_path / "edge.png", [("edge (lora)", series)]))
    assert img.shape[:2] == (HEIGHT, WIDTH) and img[..., :3].std() > 0.02


def test_ema_is_bias_corrected():
    assert ema(np.full(5, 2.0), span=4) == pytest.approx(np.full(5, 2.0))  # no pull toward 0 at the start
    smoothed = ema(np.array([0.0, 1.0] * 50), span=10)
    assert smoothed[-10:].std() < 0.15  # the alternation is smoothed out


def test_image_format_comes_from_the_suffix(tmp_path):
    assert save_loss_curves(tmp_path / "c.svg", [("a", records(20))]).read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match=r"suffix '.jpeg'; name a .png file"):
        save_loss_curves(tmp_path / "c.jpeg", [("a", records(20))])


def fake_run(directory: Path, method: str, recs) -> Path:
    """A run directory as `lorakit train` leaves it, as far as plotting reads it: config.yaml and metrics.jsonl."""
    save_config(load_config(None, [f"method={method}", f"output_dir={directory}"]), directory / "config.yaml")
    with MetricsLog(directory / "metrics.jsonl") as log:
        for r in recs:
            log.log(r["step"], **{k: v for k, v in r.items() if k != "step"})
    return directory


def test_errors_name_what_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not the output directory of a `lorakit train` run"):
        read_run(tmp_path / "empty")
    run = fake_run(tmp_path / "fresh", "lora", [])
    with pytest.raises(ValueError, match=r"metrics.jsonl holds no loss yet \(0 records\)"):
        read_run(run)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found: the run has not logged a step yet"):
        read_run(run)
    with pytest.raises(ValueError, match="no run directory given"):
        plot_runs([], tmp_path / "x.png")


def test_lorakit_plot_overlays_runs_labelled_by_directory_and_method(tmp_path):
    lora = fake_run(tmp_path / "runs" / "lora-run", "lora", records(120))
    qalora = fake_run(tmp_path / "runs" / "qalora-run", "qalora", records(80, offset=0.2, seed=1))
    out = tmp_path / "compare.png"
    done = subprocess.run([sys.executable, "-m", "lorakit", "plot", str(lora), str(qalora), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    img = imread(out)
    assert img.shape[:2] == (HEIGHT, WIDTH) and img[..., :3].std() > 0.05
    assert pixels_near(img, "C0") > 500 and pixels_near(img, "C1") > 500  # one colour per run
    done = subprocess.run([sys.executable, "-m", "lorakit", "plot", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "lorakit plot: error:" in done.stderr
    assert "is not the output directory of a `lorakit train` run" in done.stderr and "Traceback" not in done.stderr


def test_labels_are_directory_and_method(tmp_path):
    import matplotlib

    a = fake_run(tmp_path / "a" / "run", "qlora", records(10))
    b = fake_run(tmp_path / "b" / "run", "lora", records(10))
    c = fake_run(tmp_path / "c", "qalora", records(10))
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as <text>, not glyph paths: readable back
        many = plot_runs([a, b, c], tmp_path / "many.svg").read_text()
        one = plot_runs([c], tmp_path / "one.svg").read_text()
    for label in [f"{a} (qlora)", f"{b} (lora)", "c (qalora)", "loss of 3 runs"]:  # same-named runs: the path
        assert f">{label}<" in many
    assert ">c (qalora): loss and learning rate<" in one and ">validation loss<" in one


def test_a_run_without_matplotlib_finishes_and_says_how_to_get_the_curve(tmp_path_factory, tmp_path, monkeypatch,
                                                                          capsys):
    pytest.importorskip("transformers")
    from lorakit.training.loop import train
    from train_fixtures import tiny_assets, tiny_run_overrides

    model_dir, data = tiny_assets(tmp_path_factory, "no-matplotlib")
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of each now raises ImportError
    train(load_config(None, tiny_run_overrides(model_dir, data, tmp_path / "run", steps=2)), progress=False)
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "run" / "loss_curve.png").exists()
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "loss_curve.png" in line]
    assert note.startswith("lorakit train: no loss_curve.png: loss curves need matplotlib")
    assert note.endswith("pip install 'lorakit[plot]'")
