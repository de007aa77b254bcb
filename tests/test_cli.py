import json
import subprocess
import sys

import lorakit
from tiny_models import tiny_llama


def run(*args):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True)


def test_inspect_adapter(tmp_path):
    model = tiny_llama()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    out = run("inspect", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert "r                  4" in out.stdout and "adapted layers     4" in out.stdout
    assert "size on disk" in out.stdout and "['q_proj', 'v_proj']" in out.stdout
    info = json.loads(run("inspect", "--json", str(tmp_path / "a")).stdout)
    assert info["parameters"] == 4 * (4 * 64 + 64 * 4) - 2 * (64 * 4 - 32 * 4)  # v_proj out = 2 kv heads * 16 = 32
    assert info["adapted_layers"] == 4 and info["r"] == 4


def test_inspect_errors(tmp_path):
    out = run("inspect", str(tmp_path / "missing"))
    assert out.returncode != 0 and "does not exist" in out.stderr
    out = run("inspect", str(tmp_path))
    assert out.returncode != 0 and "not an adapter directory" in out.stderr
