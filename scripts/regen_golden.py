"""Regenerate tests/golden/cli_smoke.json: the per-step training losses of `lorakit train` on the tiny test
model (tests/train_fixtures.py), float32, fixed seed. Run after a deliberate change to the training math:

    .venv/bin/python scripts/regen_golden.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from train_fixtures import make_instruction_file, make_tiny_model_dir, tiny_run_overrides  # noqa: E402

from lorakit.io import write_json  # noqa: E402
from lorakit.report.progress import read_metrics  # noqa: E402

METHOD, STEPS = "qalora", 6

with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    overrides = tiny_run_overrides(make_tiny_model_dir(d / "model"), make_instruction_file(d / "train.jsonl"),
                                   d / "run", METHOD, STEPS)
    subprocess.run([sys.executable, "-m", "lorakit", "train", *overrides, "--quiet"], check=True)
    losses = [m["loss"] for m in read_metrics(d / "run" / "metrics.jsonl") if "loss" in m]
write_json(ROOT / "tests" / "golden" / "cli_smoke.json", {"method": METHOD, "steps": STEPS, "losses": losses})
print(losses)
