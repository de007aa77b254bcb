"""Two-way parity with Hugging Face PEFT: an adapter directory is the contract (DESIGN.md).

(a) lorakit injects, randomises, `save_adapter` -> `peft.PeftModel.from_pretrained` on the same
    base gives the same logits;
(b) PEFT `get_peft_model`, randomise, `save_pretrained` -> `lorakit.load_adapter` on the same
    base gives the same logits.

Each case is one row of `CASES`: a tiny model from a config, its inputs, and lorakit's
`LoraConfig` arguments (translated to PEFT's names by `peft_config`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tiny_models import (
    FP32_ATOL, MIN_ADAPTER_EFFECT, fresh, image_inputs, logits, max_diff, randomise_trainable_,
    tiny_bert, tiny_convnet, tiny_gpt2, tiny_llama, token_inputs,
)

peft = pytest.importorskip("peft")


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    lora: dict  # lorakit.LoraConfig arguments
    peft_extra: dict = field(default_factory=dict)  # PEFT-only arguments (e.g. GPT-2's fan_in_fan_out)


GPT2 = {"fan_in_fan_out": True}  # GPT-2's Conv1D stores W as (in, out); PEFT wants to be told
CASES = [
    Case("llama-qv", tiny_llama, token_inputs, dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"])),
    Case("llama-regex", tiny_llama, token_inputs, dict(r=8, alpha=32, target_modules=r".*\.(q|k)_proj")),
    Case("llama-all-linear-rslora", tiny_llama, token_inputs,
         dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    Case("llama-dropout-eval", tiny_llama, token_inputs, dict(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])),
    # A subset of same-named layers: the saved target_modules must not widen to every q_proj / c_proj.
    Case("llama-one-layer-regex", tiny_llama, token_inputs,
         dict(r=8, alpha=16, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")),
    Case("llama-exclude", tiny_llama, token_inputs,
         dict(r=4, alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])),
    Case("llama-embedding", tiny_llama, token_inputs,
         dict(r=8, alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    Case("gpt2-conv1d", tiny_gpt2, token_inputs, dict(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]), GPT2),
    Case("gpt2-attn-c-proj-only", tiny_gpt2, token_inputs, dict(r=8, alpha=16, target_modules=r".*\.attn\.c_proj"), GPT2),
    Case("gpt2-lora-only-bias", tiny_gpt2, token_inputs,
         dict(r=4, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], bias="lora_only"), GPT2),
    Case("bert-modules-to-save", tiny_bert, token_inputs,
         dict(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])),
    Case("bert-lora-only-bias", tiny_bert, token_inputs,
         dict(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")),
    Case("convnet-conv2d", tiny_convnet, image_inputs, dict(r=4, alpha=8, target_modules=["conv1", "conv2", "head"])),
]
CASE_IDS = [c.id for c in CASES]

PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def peft_config(case: Case) -> peft.LoraConfig:
    """The PEFT spelling of the case's lorakit config."""
    c = lorakit.LoraConfig(**case.lora)
    return peft.LoraConfig(
        r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
        exclude_modules=c.exclude_modules, use_rslora=c.use_rslora, init_lora_weights=PEFT_INIT[c.init],
        modules_to_save=c.modules_to_save, bias=c.bias, **case.peft_extra,
    )


def lora_targets(case: Case, names: list[str]) -> set[str]:
    """Names of LoRA-adapted modules among `names` (drop modules_to_save, which PEFT lists apart)."""
    keep = case.lora.get("modules_to_save") or []
    return {n for n in names if not any(n == m or n.endswith("." + m) for m in keep)}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lorakit_adapter_loads_in_peft(case: Case, tmp_path: Path):
    base = case.build()
    inputs = case.inputs()
    model = fresh(base)
    names = lorakit.inject_adapters(model, lorakit.LoraConfig(**case.lora))
    randomise_trainable_(model)
    expected = logits(model, inputs)
    assert max_diff(expected, logits(base, inputs)) > MIN_ADAPTER_EFFECT, "adapter has no effect: test is vacuous"

    lorakit.save_adapter(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files), f"pickle file written: {files}"

    peft_model = peft.PeftModel.from_pretrained(fresh(base), tmp_path)
    assert max_diff(logits(peft_model, inputs), expected) <= FP32_ATOL
    assert set(peft_model.targeted_module_names) == lora_targets(case, names)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_adapter_loads_in_lorakit(case: Case, tmp_path: Path):
    base = case.build()
    inputs = case.inputs()
    peft_model = peft.get_peft_model(fresh(base), peft_config(case))
    randomise_trainable_(peft_model)
    expected = logits(peft_model, inputs)
    assert max_diff(expected, logits(base, inputs)) > MIN_ADAPTER_EFFECT, "adapter has no effect: test is vacuous"
    peft_model.save_pretrained(tmp_path)

    model = fresh(base)
    names = lorakit.load_adapter(model, tmp_path)
    assert max_diff(logits(model, inputs), expected) <= FP32_ATOL
    assert lora_targets(case, names) == set(peft_model.targeted_module_names)
    assert lorakit.adapter_names(model) == ["default"]
    assert lorakit.active_adapter(model) == "default"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_adapter_config_parses_in_peft(case: Case, tmp_path: Path):
    model = case.build()
    lorakit.inject_adapters(model, lorakit.LoraConfig(**case.lora))
    lorakit.save_adapter(model, tmp_path)

    ours = lorakit.LoraConfig(**case.lora)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.peft_type == peft.PeftType.LORA
    assert (theirs.r, theirs.lora_alpha, theirs.use_rslora, theirs.bias) == (ours.r, ours.alpha, ours.use_rslora, ours.bias)
    assert theirs.lora_dropout == ours.dropout
    assert list(theirs.modules_to_save or []) == list(ours.modules_to_save or [])
    json.loads((tmp_path / "adapter_config.json").read_text())  # plain JSON, no NaN / Infinity


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_saved_tensors_match_peft_layout(case: Case, tmp_path: Path):
    """Same keys and shapes as PEFT's own file for the same config (so other PEFT-format tools read it).

    PEFT also writes an adapted embedding's full base weight (`save_embedding_layers="auto"`); that
    copy is optional, so it is left out of the comparison.
    """
    base = case.build()
    model = fresh(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(**case.lora))
    lorakit.save_adapter(model, tmp_path / "lorakit")
    peft.get_peft_model(fresh(base), peft_config(case)).save_pretrained(tmp_path / "peft")

    def layout(d: Path) -> dict[str, tuple[int, ...]]:
        tensors = load_file(d / "adapter_model.safetensors")
        return {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(".base_layer.weight")}

    assert layout(tmp_path / "lorakit") == layout(tmp_path / "peft")


def test_load_into_injected_model_adds_a_second_adapter(tmp_path: Path):
    base = tiny_llama()
    inputs = token_inputs()
    peft_model = peft.get_peft_model(fresh(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise_trainable_(peft_model, seed=1)
    expected_peft = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    model = fresh(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name="first")
    randomise_trainable_(model, seed=2)
    expected_first = logits(model, inputs)

    lorakit.load_adapter(model, tmp_path, name="second")
    assert sorted(lorakit.adapter_names(model)) == ["first", "second"]
    lorakit.set_active(model, "second")
    assert max_diff(logits(model, inputs), expected_peft) <= FP32_ATOL
    lorakit.set_active(model, "first")
    assert max_diff(logits(model, inputs), expected_first) <= FP32_ATOL


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_pissa_adapter_saved_by_lorakit_works_in_peft_on_the_original_base(tmp_path: Path, use_rslora: bool):
    """PiSSA rewrites W into a residual; the saved adapter must still apply to the *original* W."""
    base = tiny_llama()
    inputs = token_inputs()
    model = fresh(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa",
                                                      use_rslora=use_rslora))
    assert max_diff(logits(model, inputs), logits(base, inputs)) <= FP32_ATOL
    randomise_trainable_(model)  # stands in for training: moves A, B away from their SVD start
    expected = logits(model, inputs)
    assert max_diff(expected, logits(base, inputs)) > MIN_ADAPTER_EFFECT

    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(fresh(base), tmp_path)
    assert max_diff(logits(peft_model, inputs), expected) <= FP32_ATOL


def test_peft_pissa_adapter_converted_to_lora_loads_in_lorakit(tmp_path: Path):
    """PEFT's PiSSA -> LoRA conversion (rank 2r, on the original base) loads in lorakit."""
    base = tiny_llama()
    inputs = token_inputs()
    peft_model = peft.get_peft_model(
        fresh(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    )
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for saving the initial adapter
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    randomise_trainable_(peft_model)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    model = fresh(base)
    lorakit.load_adapter(model, tmp_path / "lora")
    assert max_diff(logits(model, inputs), expected) <= FP32_ATOL


def test_peft_rank_pattern_loads_or_is_refused(tmp_path: Path):
    """PEFT's per-module rank/alpha: lorakit must honour it or refuse it by name, never ignore it."""
    base = tiny_llama()
    inputs = token_inputs()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16})
    peft_model = peft.get_peft_model(fresh(base), cfg)
    randomise_trainable_(peft_model)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    model = fresh(base)
    try:
        lorakit.load_adapter(model, tmp_path)
    except ValueError as e:
        assert "rank_pattern" in str(e) or "alpha_pattern" in str(e)
        return
    assert max_diff(logits(model, inputs), expected) <= FP32_ATOL


# --- errors: a mismatched adapter is refused, loudly and before anything changes ---

def _lorakit_adapter(tmp_path: Path) -> Path:
    model = tiny_llama(hidden=64, layers=2)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomise_trainable_(model)
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def test_load_into_base_with_other_hidden_size_names_the_shapes(tmp_path: Path):
    adapter = _lorakit_adapter(tmp_path)
    with pytest.raises(ValueError) as err:
        lorakit.load_adapter(tiny_llama(hidden=32), adapter)
    msg = str(err.value)
    assert "64" in msg and "32" in msg, f"message should give the saved and the expected shape: {msg}"


def test_load_into_base_missing_the_target_module_names_it(tmp_path: Path):
    adapter = _lorakit_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.(q|v)_proj"):
        lorakit.load_adapter(tiny_llama(layers=1), adapter)


@pytest.mark.parametrize("other", [dict(hidden=32), dict(layers=1)], ids=["other-hidden-size", "missing-module"])
def test_failed_load_leaves_the_model_untouched(tmp_path: Path, other: dict):
    """No partial load: a refused adapter changes neither modules nor weights."""
    adapter = _lorakit_adapter(tmp_path)
    model = tiny_llama(**other)
    before_types = [(n, type(m)) for n, m in model.named_modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        lorakit.load_adapter(model, adapter)
    assert [(n, type(m)) for n, m in model.named_modules()] == before_types
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

