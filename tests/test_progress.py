"""Progress output (a tqdm bar on a terminal, plain lines elsewhere or without tqdm) and the append-only metrics log."""

import io
import json
import math
import sys

import pytest

from lorakit.report import progress
from lorakit.report.progress import MetricsLog, ProgressBar, read_metrics


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock: each call to tick(s) advances it by s seconds."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])

    def tick(seconds):
        now[0] += seconds
    return tick


def run(bar, clock, steps, first=1, seconds_per_step=0.5):
    for step in range(first, steps + 1):
        clock(seconds_per_step)
        bar.update(step, loss=2.0 / step, per_s=12345.6, lr=2e-4, peak_memory_bytes=(1536 + step) * 2**20)


def test_plain_output_prints_every_twentieth_and_the_last_step(clock):
    out = io.StringIO()
    bar = ProgressBar(45, stream=out)  # every max(1, 45 // 20) = 2 steps, and step 45
    run(bar, clock, 45)
    bar.close("done: final loss 0.0444")
    lines = out.getvalue().splitlines()
    assert len(lines) == 22 + 1 + 1
    assert "\r" not in out.getvalue()
    assert lines[0] == ("step  2/45 | loss 1.0000 | lr 2.00e-04 | 12,346 useful tok/s | peak 1.50 GiB | "
                        "elapsed 0:00:01 | ETA 0:00:22")
    assert lines[-2].startswith("step 45/45 | loss 0.0444") and lines[-2].endswith("ETA 0:00:00")
    assert lines[-1] == "done: final loss 0.0444"


def test_plain_output_of_a_run_stopped_early_ends_with_its_last_step(clock):
    out = io.StringIO()
    bar = ProgressBar(100, stream=out)
    run(bar, clock, 13)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step   5/100", "step  10/100", "step  13/100"]


def test_eta_follows_the_recent_step_time(clock):
    out = io.StringIO()
    bar = ProgressBar(100, stream=out)
    run(bar, clock, 40, seconds_per_step=10.0)  # slow warm-up
    run(bar, clock, 80, first=41, seconds_per_step=1.0)  # the window now holds only fast steps
    assert out.getvalue().splitlines()[-1].endswith("elapsed 0:07:20 | ETA 0:00:20")


def test_resumed_run_counts_from_its_first_step(clock):
    out = io.StringIO()
    bar = ProgressBar(100, stream=out)
    run(bar, clock, 100, first=61, seconds_per_step=2.0)
    assert out.getvalue().splitlines()[0].endswith("elapsed 0:00:10 | ETA 0:01:10")  # step 65


def test_terminal_shows_a_tqdm_bar(clock):
    pytest.importorskip("tqdm")
    out = Terminal()
    bar = ProgressBar(10, stream=out)
    run(bar, clock, 10)
    bar.close("summary")
    text = out.getvalue()
    assert text.endswith("\nsummary\n") and "\r" in text
    last = text.split("\r")[-1].splitlines()[0]  # the bar as the terminal shows it at the end
    assert last.startswith("100%|") and "step 10/10 [" in last
    assert last.endswith("loss 0.2000 | lr 2.00e-04 | 12,346 useful tok/s | peak 1.51 GiB")


def test_resumed_terminal_bar_starts_at_its_first_step(clock):
    pytest.importorskip("tqdm")
    out = Terminal()
    bar = ProgressBar(100, stream=out)
    bar.update(61, loss=1.0, per_s=10.0)
    bar.close()
    assert " 61%|" in out.getvalue() and "step 61/100" in out.getvalue()


def test_terminal_without_tqdm_prints_plain_lines(clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    out = Terminal()
    bar = ProgressBar(10, stream=out)
    run(bar, clock, 10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10 and lines[-1].startswith("step 10/10 | loss 0.2000")


def test_lines_without_optional_numbers(clock):
    out = io.StringIO()
    bar = ProgressBar(1, stream=out)
    clock(2.0)
    bar.update(1, loss=3.25, per_s=100.0)
    assert out.getvalue() == "step 1/1 | loss 3.2500 | 100 useful tok/s | elapsed 0:00:02 | ETA 0:00:00\n"


def test_disabled_bar_writes_nothing(clock):
    out = io.StringIO()
    bar = ProgressBar(10, stream=out, enabled=False)
    run(bar, clock, 10)
    bar.close("summary")
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="total_steps=0"):
        ProgressBar(0)


def test_metrics_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.log(1, loss=2.5, lr=1e-4)
        log.log(2, loss=float("nan"), per_s=100.0)
        log.log(2, valid_loss=2.25)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0]["loss"] == 2.5 and math.isnan(records[1]["loss"]) and records[2]["valid_loss"] == 2.25
    assert all(isinstance(r["time"], float) for r in records)
    with MetricsLog(path) as log, pytest.raises(ValueError, match="'time' is set by MetricsLog"):
        log.log(3, time=1.0)


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.log(1, loss=2.5)
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 2.')  # the writer was killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [1]
    with MetricsLog(path) as log:
        log.log(2, loss=2.25)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.5), (2, 2.25)]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


def test_truncate_after_step_drops_records_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(1, 8):
            log.log(step, loss=1.0 / step)
    before = path.read_text().splitlines()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')
    with MetricsLog(path, truncate_after_step=4) as log:
        assert path.read_text().splitlines() == before[:4]  # kept lines unchanged, byte for byte
        log.log(5, loss=0.5)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    with MetricsLog(tmp_path / "new.jsonl", truncate_after_step=10):
        pass
    assert read_metrics(tmp_path / "new.jsonl") == []
