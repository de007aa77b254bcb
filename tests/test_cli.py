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


def test_inspect_a_damaged_adapter_is_a_clear_error(tmp_path, capsys):
    from lorakit.cli import main

    model = tiny_llama()
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\x00" * 16, b""):  # truncated, garbage header, empty
        weights.write_bytes(damaged)
        for json_flag in ([], ["--json"]):
            assert main(["inspect", *json_flag, str(tmp_path / "a")]) == 2
            err = capsys.readouterr().err
            assert "truncated or corrupted" in err and str(weights) in err, err
    out = run("inspect", str(tmp_path / "a"))  # as a user runs it: one line, no traceback
    assert out.returncode == 2 and out.stderr.startswith("lorakit inspect: error:"), out.stderr
    assert "Traceback" not in out.stderr and "SafetensorError" not in out.stderr, out.stderr
    weights.write_bytes(whole)
    (tmp_path / "a" / "lorakit.json").write_text("{")
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_inspect_and_export_gguf(tmp_path):
    import pytest

    pytest.importorskip("gguf")
    from formats.gguf_files import tensor_bytes, write_llama_gguf

    src = write_llama_gguf(tmp_path / "base.gguf", tiny_llama(), "Q4_1")
    out = run("inspect", str(src))
    assert out.returncode == 0, out.stderr
    assert "14 Q4_1" in out.stdout and "llama.block_count = 2" in out.stdout and "blk.0.attn_q.weight" in out.stdout
    info = json.loads(run("inspect", "--json", str(src)).stdout)
    assert info["types"] == {"Q4_1": 14, "Q8_0": 2, "F32": 5}

    model, _ = lorakit.load_gguf(src, tokenizer=False)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["v_proj"], group_size=32))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = run("export", "--adapter", str(tmp_path / "adapter"), "--base", str(src), "--out", str(tmp_path / "ft.gguf"))
    assert out.returncode == 0, out.stderr
    assert "offsets moved" in out.stdout
    before, after = tensor_bytes(src), tensor_bytes(tmp_path / "ft.gguf")
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"blk.0.attn_v.weight", "blk.1.attn_v.weight"}
    out = run("export", "--adapter", str(tmp_path / "adapter"), "--base", str(src), "--format", "gguf-adapter",
              "--out", str(tmp_path / "adapter.gguf"))
    assert out.returncode == 0, out.stderr
    assert set(tensor_bytes(tmp_path / "adapter.gguf")) == {f"blk.{i}.attn_v.weight.lora_{ab}" for i in (0, 1) for ab in "ab"}
    out = run("export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "x.gguf"), "--base",
              str(tmp_path / "missing.gguf"))
    assert out.returncode == 2 and "not found" in out.stderr
