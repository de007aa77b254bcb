"""`lorakit ui` in a real browser, the way a person uses it: headless Chromium (Debian's `chromium`,
driven by Playwright's Python client; never `playwright install`) against `lorakit ui` started as a
subprocess. It types a bad learning rate and sees the CLI's message beside the field, starts a 2-step
QA-LoRA run on the embedded model, watches the status and the loss curve, chats with the base and the
fine-tuned model, exports the GGUF and finds it on disk; the page asks nothing of any host but
127.0.0.1. A screenshot of each stage is saved under the test's tmp_path/screenshots (printed with -s).

    .venv/bin/python -m pytest -m slow tests/test_ui_browser.py -s --basetemp=/tmp/lorakit-ui   # shots in
    /tmp/lorakit-ui/test_whole_workflow_in_chromi0/screenshots
"""

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "What does `shlex.quote` do?"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert server.poll() is None, f"lorakit ui exited with status {server.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"lorakit ui did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture
def ui(tmp_path):
    """(URL, working directory) of a `lorakit ui` subprocess on a free port, stopped afterwards."""
    pytest.importorskip("gradio")
    try:
        from lorakit.models.default import default_gguf_path

        default_gguf_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    port = _free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "lorakit", "ui", "--port", str(port)], cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(url, server, log)
        yield url, tmp_path
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_whole_workflow_in_chromium(ui):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium (the browser this test drives)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (its Python client only)")
    url, work = ui
    run = work / "run"
    shots = work / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    requests: list[str] = []
    started = time.monotonic()

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(work / "profile", executable_path=str(CHROMIUM),
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1400, "height": 1000})
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.set_default_timeout(60_000)
        page.goto(url)
        expect = playwright.expect
        expect.set_options(timeout=60_000)  # a loaded 2-core machine answers slowly, the first event above all

        def field(label: str):  # by its accessible name: the label, then the help text
            name = re.compile(f"^{label}")
            return page.get_by_role("textbox", name=name).or_(page.get_by_role("spinbutton", name=name))

        def shot(name: str) -> None:
            page.screenshot(path=shots / f"{name}.png", full_page=True)

        # the page is ready when its load event has filled in the command line
        expect(field("Equivalent command line")).to_have_value(re.compile("^lorakit train method=qalora train.steps=40"))

        # 1. a bad value gets the CLI's own message beside its field, and Start is disabled
        lr = field("Learning rate")
        lr.fill("0")
        lr.press("Tab")
        expect(page.get_by_text("override 'train.lr=0': train.lr=0 must be a number > 0")).to_be_visible()
        expect(page.get_by_role("button", name="Start")).to_be_disabled()
        shot("1-bad-field")
        lr.fill("0.001")
        for label, value in (("Steps", "2"), ("Batch size", "2"), ("Max tokens", "96"), ("Checkpoint every", "1"),
                             ("Output directory", str(run))):
            field(label).fill(value)
            field(label).press("Tab")
        expect(page.get_by_text("must be a number > 0")).to_be_hidden()
        command = (f"lorakit train method=qalora train.steps=2 train.batch_size=2 train.lr=0.001 adapter.r=16 "
                   f"adapter.alpha=32 data.max_tokens=96 train.save_every=1 output_dir={run}")
        expect(field("Equivalent command line")).to_have_value(command)

        # 2. start the run and watch it: status line and loss curve, polled from RUN_DIR/metrics.jsonl
        page.get_by_role("button", name="Start").click()
        status = page.locator(".status").last  # the line under the run directory (Gradio puts the class on two levels)
        expect(status).to_have_text(re.compile(r"^\s*(Starting|Training|Finished)"))
        expect(field("Run directory")).to_have_value(str(run))
        seen_training = False
        end = time.monotonic() + 900
        while not (now := status.inner_text().strip()).startswith("Finished"):
            assert not now.startswith(("Failed", "Stopped")), now
            assert time.monotonic() < end, f"the run did not finish: {now}"
            if not seen_training and now.startswith("Training"):
                seen_training = True
                shot("2-training")
            page.wait_for_timeout(300)
        numbers = r"step 2/2 · loss \d+\.\d+ · valid loss \d+\.\d+ · lr \S+ · [\d,]+ tokens/s"
        assert re.fullmatch(f"Finished · {numbers}", now), now
        curve = page.get_by_label("Vega visualization")  # the loss curve, drawn by Vega
        expect(curve.locator("path[aria-roledescription='line mark']")).to_have_count(3)  # train, smoothed, valid
        shot("3-finished")
        assert (run / "adapter" / "adapter_model.safetensors").is_file()

        # 3. chat with the base and the fine-tuned model side by side
        page.get_by_placeholder(re.compile("^Ask both models")).fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        answers = page.locator("[data-testid='bot']")
        expect(answers).to_have_count(2, timeout=600_000)
        assert all(text.strip() for text in answers.all_inner_texts())
        expect(page.locator("[data-testid='user']")).to_have_count(2)
        shot("4-chat")

        # 4. export the merged GGUF with one click; the report is what `lorakit export` prints
        page.get_by_role("button", name="Export", exact=True).click()
        report = page.get_by_label("lorakit export")
        expect(report).to_have_value(re.compile("wrote .*model.gguf"), timeout=600_000)
        text = report.input_value()
        assert text.startswith(f"$ lorakit export {run} --format gguf --out {run / 'export' / 'model.gguf'}\n"), text
        assert "largest weight error 0\n" in text, text
        shot("5-export")
        browser.close()

    exported = run / "export" / "model.gguf"
    assert exported.is_file() and exported.stat().st_size > 50 * 2**20
    here = re.compile(re.escape(url.rstrip("/")) + r"(/|$)")
    assert [u for u in requests if not here.match(u) and not u.startswith(("data:", "blob:"))] == []
    print(f"whole workflow in the browser: {time.monotonic() - started:.0f} s")
