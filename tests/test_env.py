"""`lorakit env`: the block a user pastes into a problem report."""

import json
import subprocess
import sys

import torch

import lorakit
from lorakit.env_report import _locked_versions, environment_report, format_report
from lorakit.training.hardware import default_compute_dtype


def test_lorakit_env_prints_versions_device_dtype_and_why():
    out = subprocess.run([sys.executable, "-m", "lorakit", "env"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"lorakit {lorakit.__version__}")
    assert f"torch          {torch.__version__}" in text
    for name in ("transformers", "peft", "gguf", "tokenizers", "numpy"):
        assert f"\n  {name} " in text, name
    dtype = str(default_compute_dtype()).removeprefix("torch.")
    assert f"compute dtype  {dtype} (auto): " in text
    assert "threads        torch " in text and "device         " in text and "malloc         " in text


def test_json_report_is_the_same_data():
    report = json.loads(subprocess.run([sys.executable, "-m", "lorakit", "env", "--json"], capture_output=True,
                                       text=True, check=True).stdout)
    assert report["packages"]["torch"]["version"] == torch.__version__
    assert report["threads"]["torch"] == torch.get_num_threads()
    assert report["compute_dtype"] in ("float32", "bfloat16", "float16") and report["compute_dtype_reason"]
    assert format_report(report).splitlines()[0] == format_report(environment_report()).splitlines()[0]


def test_a_version_other_than_the_locks_is_named(tmp_path, monkeypatch):
    import lorakit.env_report as env_report

    lock = tmp_path / "constraints.txt"
    lock.write_text("# made by scripts/lock.sh\ntorch==0.0.1\nNumPy==1.0 ; python_version >= '3.10'\nPyYAML==0.1\n")
    assert _locked_versions(lock) == {"torch": "0.0.1", "numpy": "1.0", "pyyaml": "0.1"}
    monkeypatch.setattr(env_report, "_lock_file", lambda: lock)
    report = environment_report()
    assert set(report["lock"]["differs"]) == {"torch", "numpy", "pyyaml"}
    assert f"torch {torch.__version__} (locked 0.0.1)" in format_report(report)
