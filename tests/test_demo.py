"""`lorakit demo`, run the way the README runs it: from a plain working directory with the default output
path (`runs/demo`, relative), and with `--out` relative and absolute. The demo loads the embedded 94 MB GGUF,
so each run takes a minute or two on 2 cores: the README's own form is in the default suite, the other two
are slow tests. CI (`.ci/run`) also runs the README's command itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.demo import relative_link

pytest.importorskip("transformers")
pytest.importorskip("gguf")


def run_demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        from lorakit.models.default import default_gguf_path

        default_gguf_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    return subprocess.run([sys.executable, "-m", "lorakit", "demo", "--steps", "2", "--quiet", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=1200)


def check_outputs(out: Path) -> None:
    report = out / "report.md"
    assert report.is_file()
    text = report.read_text()
    ggufs = list(out.glob("*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].stat().st_size > 90 * 2**20
    image = re.search(r"!\[loss curve\]\(([^)]+)\)", text).group(1)
    assert not Path(image).is_absolute() and (report.parent / image).is_file()  # the link works where report.md is
    assert (out / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "largest weight difference from the trained model: 0 " in text


def test_the_readme_demo_from_a_working_directory_with_the_default_output(tmp_path):
    done = run_demo(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    check_outputs(tmp_path / "runs" / "demo")


@pytest.mark.slow
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_the_demo_with_out(tmp_path, absolute):
    out = tmp_path / "elsewhere" / "demo" if absolute else Path("elsewhere") / "demo"
    done = run_demo(tmp_path, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    check_outputs(out if absolute else tmp_path / out)


@pytest.mark.parametrize(("target", "base"), [
    ("/w/runs/demo/run/loss_curve.png", "runs/demo"), ("runs/demo/run/loss_curve.png", "/w/runs/demo"),
    ("runs/demo/run/loss_curve.png", "runs/demo"), ("/w/runs/demo/run/loss_curve.png", "/w/runs/demo"),
])
def test_the_report_links_its_image_relative_to_itself(monkeypatch, tmp_path, target, base):
    monkeypatch.chdir(tmp_path)
    fix = lambda p: p.replace("/w", str(tmp_path))  # noqa: E731
    assert relative_link(fix(target), fix(base)) == "run/loss_curve.png"
