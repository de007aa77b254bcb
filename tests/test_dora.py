"""DoRA (`LoraConfig(use_dora=True)`): the start from the base, two-way parity with PEFT (before and after
training, and with dropout in train mode), exact merges, the quantized bases, what is refused, and the
`dora` / `qdora` methods of `lorakit train` through the CLI.

Tolerances: `FP32_ATOL` (tiny_models) for two implementations of the same forward; parameters after
`STEPS` AdamW steps from the same start, where float rounding in the gradients is amplified by Adam's
normalisation, agree to `TRAINED_ATOL` on the logits (measured ~1e-6; a wrong gradient, e.g. one that
flows through the norm, differs by > 1e-2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.adapters.layers import lora_layers
from tiny_models import (
    FP32_ATOL, MIN_ADAPTER_EFFECT, fresh, image_inputs, logits, max_diff, randomise_trainable_, tiny_bert,
    tiny_convnet, tiny_gpt2, tiny_llama, token_inputs, train_steps,
)

peft = pytest.importorskip("peft")

STEPS = 5
TRAINED_ATOL = 1e-4

# (id, model, inputs, lorakit LoraConfig arguments, PEFT-only arguments): every layer kind PEFT's DoRA supports
CASES = [
    ("llama-linear-embedding", tiny_llama, token_inputs, dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]), {}),
    ("gpt2-conv1d", tiny_gpt2, token_inputs, dict(target_modules=["c_attn", "c_fc"]), {"fan_in_fan_out": True}),
    ("convnet-conv2d", tiny_convnet, image_inputs, dict(target_modules=["conv1", "conv2", "head"]), {}),
    ("bert-bias-lora-only", tiny_bert, token_inputs, dict(target_modules=["query", "value"], bias="lora_only"), {}),
    ("llama-rslora", tiny_llama, token_inputs, dict(target_modules="all-linear", use_rslora=True), {}),
]
IDS = [c[0] for c in CASES]


def dora(**kwargs) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": 4, "alpha": 8, "use_dora": True, **kwargs})


def peft_dora(kwargs: dict, extra: dict) -> peft.LoraConfig:
    c = dora(**kwargs)
    return peft.LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
                           use_rslora=c.use_rslora, bias=c.bias, use_dora=True, **extra)


def weight_of(layer) -> torch.Tensor:
    return layer.weight if isinstance(layer.weight, torch.Tensor) else layer.weight.dequantize(torch.float32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_starts_from_the_base_with_m_the_channel_norms(case):
    _, build, inputs, kwargs, _ = case
    base = build()
    model = fresh(base)
    lorakit.inject_adapters(model, dora(**kwargs))
    assert max_diff(logits(model, inputs()), logits(base, inputs())) <= FP32_ATOL
    for _, layer in lora_layers(model):
        w, m = weight_of(layer).detach(), layer.lora["default"].magnitude
        assert m.requires_grad
        if layer.kind.startswith("conv"):
            assert torch.allclose(m.flatten(), w.flatten(1).norm(dim=1)) and m.shape == (1, w.shape[0], 1, 1)
        else:  # rows of a linear W; columns of GPT-2's (in, out) W and of an embedding (one per dimension)
            assert torch.allclose(m, w.norm(dim=0 if layer.transposed or layer.kind == "embedding" else 1))
    report = lorakit.parameter_report(model)
    n_magnitudes = sum(layer.lora["default"].magnitude.numel() for _, layer in lora_layers(model))
    assert report.trainable == n_magnitudes + sum(a.numel() + b.numel() for a, b in _ab(model)) + _biases(model, kwargs)


def _ab(model):
    return [(layer.lora["default"].A, layer.lora["default"].B) for _, layer in lora_layers(model)]


def _biases(model, kwargs) -> int:
    if kwargs.get("bias") != "lora_only":
        return 0
    return sum(layer.bias.numel() for _, layer in lora_layers(model) if layer.bias is not None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lorakit_dora_loads_in_peft(case, tmp_path: Path):
    _, build, inputs, kwargs, _ = case
    base = build()
    model = fresh(base)
    lorakit.inject_adapters(model, dora(**kwargs))
    randomise_trainable_(model)  # B != 0 and m moved away from the norms
    expected = logits(model, inputs())
    assert max_diff(expected, logits(base, inputs())) > MIN_ADAPTER_EFFECT
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    assert peft.LoraConfig.from_pretrained(tmp_path).use_dora
    peft_model = peft.PeftModel.from_pretrained(fresh(base), tmp_path)
    assert max_diff(logits(peft_model, inputs()), expected) <= FP32_ATOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_dora_loads_in_lorakit_with_peft_layout(case, tmp_path: Path):
    _, build, inputs, kwargs, extra = case
    base = build()
    peft_model = peft.get_peft_model(fresh(base), peft_dora(kwargs, extra))
    randomise_trainable_(peft_model)
    expected = logits(peft_model, inputs())
    assert max_diff(expected, logits(base, inputs())) > MIN_ADAPTER_EFFECT
    peft_model.save_pretrained(tmp_path / "peft")
    model = fresh(base)
    lorakit.load_adapter(model, tmp_path / "peft")
    assert max_diff(logits(model, inputs()), expected) <= FP32_ATOL

    lorakit.save_adapter(model, tmp_path / "lorakit")  # the same keys and shapes as PEFT's own file

    def layout(d: Path) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()
                if not k.endswith(".base_layer.weight")}

    assert layout(tmp_path / "lorakit") == layout(tmp_path / "peft")
    assert any(k.endswith(".lora_magnitude_vector") for k in layout(tmp_path / "peft"))


def test_training_matches_peft_step_for_step_and_both_files_load_across(tmp_path: Path):
    """Same start, same AdamW steps: same losses, same trained adapter (the norm is a constant in backward
    in both); then each trained adapter loads in the other library with equal logits."""
    base = tiny_llama()
    inputs = token_inputs()
    ids = inputs["input_ids"]
    kwargs = dict(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    peft_model = peft.get_peft_model(fresh(base), peft_dora(kwargs, {}))
    randomise_trainable_(peft_model)
    peft_model.save_pretrained(tmp_path / "start")
    model = fresh(base)
    lorakit.load_adapter(model, tmp_path / "start")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".magnitude")}

    theirs = train_steps(peft_model, ids, steps=STEPS)
    ours = train_steps(model, ids, steps=STEPS)
    assert ours == pytest.approx(theirs, rel=1e-4) and ours[-1] < ours[0]
    moved = max((p - start[n]).abs().max().item() for n, p in model.named_parameters() if n in start)
    assert moved > 1e-3, "the magnitudes did not train"
    expected = logits(peft_model, inputs)
    assert max_diff(logits(model, inputs), expected) <= TRAINED_ATOL

    lorakit.save_adapter(model, tmp_path / "ours")
    assert max_diff(logits(peft.PeftModel.from_pretrained(fresh(base), tmp_path / "ours"), inputs),
                    logits(model, inputs)) <= FP32_ATOL
    peft_model.save_pretrained(tmp_path / "theirs")
    again = fresh(base)
    lorakit.load_adapter(again, tmp_path / "theirs")
    assert max_diff(logits(again, inputs), expected) <= FP32_ATOL


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("gpt2-conv1d", "convnet-conv2d", "bert-bias-lora-only")],
                         ids=["gpt2-conv1d", "convnet-conv2d", "bert-bias-lora-only"])
def test_dropout_in_train_mode_is_peft_formula(case, tmp_path: Path):
    """With dropout, W drop(x) is one more base matmul and the bias stays out of the rescaling: the same masks
    (same seed, same order of dropout calls) give PEFT's outputs."""
    _, build, inputs, kwargs, extra = case
    base = build()
    peft_model = peft.get_peft_model(fresh(base), peft_dora({**kwargs, "dropout": 0.3}, extra))
    randomise_trainable_(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = fresh(base)
    lorakit.load_adapter(model, tmp_path)
    outs = []
    for m, seed in ((peft_model, 0), (model, 0), (model, 1)):
        m.train()
        for name, module in m.named_modules():  # only the adapters' dropouts draw random numbers
            if isinstance(module, torch.nn.Dropout) and "lora" not in name:
                module.p = 0.0
        torch.manual_seed(seed)
        out = m(**inputs())
        outs.append(out.logits if hasattr(out, "logits") else out)
    assert max_diff(outs[0], outs[1]) <= FP32_ATOL
    assert max_diff(outs[1], outs[2]) > MIN_ADAPTER_EFFECT, "dropout had no effect: the test is vacuous"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unmerge_are_exact(case):
    _, build, inputs, kwargs, _ = case
    model = build()
    lorakit.inject_adapters(model, dora(**kwargs))
    randomise_trainable_(model)
    expected = logits(model, inputs())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lorakit.merge_(model)
    assert merged and not list(lora_layers(model))
    assert max_diff(logits(model, inputs()), expected) <= FP32_ATOL
    lorakit.unmerge_(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert max(max_diff(after[k], before[k]) for k in before) <= 1e-6  # W restored: W' / (m/n) − ΔW
    assert max_diff(logits(model, inputs()), expected) <= FP32_ATOL


def test_nf4_base_computes_as_its_dense_dequantized_copy_and_merges_dense():
    """QDoRA: the norm is taken of the dequantized NF4 weight, so DoRA over NF4 is DoRA over the dense copy of the
    values trained against (logits and gradients); dequantize_and_merge_ merges it, merge_ refuses by name."""
    base = tiny_llama()
    inputs = token_inputs()
    nf4 = fresh(base)
    lorakit.quantize_(nf4, lorakit.NF4Config())
    lorakit.inject_adapters(nf4, dora(target_modules="all-linear"))
    assert max_diff(logits(nf4, inputs), logits(_dequantized(nf4), inputs)) <= FP32_ATOL  # starts from the NF4 base
    randomise_trainable_(nf4)
    dense = _dequantized(nf4)
    expected = logits(nf4, inputs)
    assert max_diff(logits(dense, inputs), expected) <= FP32_ATOL
    for m in (nf4, dense):
        m.train()
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in nf4.named_parameters() if p.requires_grad}
    assert any(n.endswith(".magnitude") for n in grads)
    for n, p in dense.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-5), n

    with pytest.raises(ValueError, match="DoRA adapter over a quantized base.*dequantize_and_merge_"):
        lorakit.merge_(nf4)
    lorakit.dequantize_and_merge_(nf4)
    assert max_diff(logits(nf4, inputs), expected) <= FP32_ATOL


def _dequantized(model):
    """A copy of `model` with every quantized weight made dense (the adapters stay)."""
    from lorakit.quant.api import dequantize_

    copy = fresh(model)
    dequantize_(copy)
    return copy


def test_dora_with_qalora_group_size_is_refused_with_the_dense_route():
    with pytest.raises(ValueError, match=r"use_dora=True cannot be combined with group_size=32 \(QA-LoRA\).*merge_"):
        lorakit.LoraConfig(use_dora=True, group_size=32)
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with init='pissa'"):
        lorakit.LoraConfig(use_dora=True, init="pissa")
    with pytest.raises(ValueError, match="use_dora='yes' must be true or false"):
        lorakit.LoraConfig(use_dora="yes")


def test_intn_base_refuses_the_merge_and_the_dense_route_works():
    """DoRA can train over an INT-N base, but m/n rescales whole rows: no offset move holds it. The message names
    the route that is exact (dequantize_and_merge_, then a dense export), and that route works."""
    base = tiny_llama()
    inputs = token_inputs()
    model = fresh(base)
    lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32))
    lorakit.inject_adapters(model, dora(target_modules=["q_proj", "v_proj"]))
    randomise_trainable_(model)
    expected = logits(model, inputs)
    with pytest.raises(ValueError, match="cannot merge into INT-N offsets.*dequantize_and_merge_.*export_hf"):
        lorakit.merge_(model)
    assert max_diff(logits(model, inputs), expected) == 0  # the refused merge changed nothing
    lorakit.dequantize_and_merge_(model)
    assert max_diff(logits(model, inputs), expected) <= FP32_ATOL


def test_llama_cpp_adapter_export_is_refused_and_the_merged_gguf_export_works(tmp_path: Path):
    pytest.importorskip("gguf")
    from tests.formats.gguf_files import write_llama_gguf

    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    model, _ = lorakit.load_gguf(src, tokenizer=False, quantized=False)
    lorakit.inject_adapters(model, dora(target_modules=["q_proj", "v_proj"]))
    randomise_trainable_(model)
    with pytest.raises(ValueError, match="is DoRA: a llama.cpp adapter .* has no form for DoRA's per-row rescaling"):
        lorakit.export_gguf_adapter(model, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()
    lorakit.merge_(model)
    report = lorakit.export_gguf(model, tmp_path / "merged.gguf")
    assert (tmp_path / "merged.gguf").is_file() and report.tensors


def test_fused_swiglu_keeps_dora_on_down_proj():
    from lorakit.kernels.swiglu import fuse_swiglu_

    model = tiny_llama()
    lorakit.inject_adapters(model, dora(target_modules=["down_proj", "up_proj"]))
    randomise_trainable_(model)
    expected = logits(model, token_inputs())
    assert fuse_swiglu_(model) > 0
    assert max_diff(logits(model, token_inputs()), expected) <= FP32_ATOL


def test_a_file_whose_magnitudes_and_config_disagree_is_refused(tmp_path: Path):
    model = tiny_llama()
    lorakit.inject_adapters(model, dora(target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    with pytest.raises(ValueError, match="is not the config adapter_model.safetensors was saved with"):
        lorakit.load_adapter(tiny_llama(), tmp_path)  # the fingerprint catches the edit first

    from safetensors.torch import save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors")  # no fingerprint: the tensors are checked
    with pytest.raises(ValueError, match="has a DoRA magnitude .* says use_dora=false"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if not k.endswith("magnitude_vector")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lacks \['m'\].*lora_magnitude_vector.*incomplete"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


# --- lorakit train: methods dora and qdora, through the CLI -------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("transformers")
    from train_fixtures import tiny_assets

    return tiny_assets(tmp_path_factory, "dora")


def cli(*args) -> tuple[int, str]:
    """`lorakit ARGS` in this process (as test_failure_modes runs it): (exit status, stderr)."""
    import contextlib
    import io

    from lorakit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


@pytest.mark.parametrize("method", ["dora", "qdora"])
def test_cli_dora_and_qdora_runs_merge_and_export(assets, tmp_path, method):
    """A run trains a DoRA adapter (magnitudes in the file, use_dora in its config), on a dense base (dora) or
    an NF4 one (qdora); `lorakit merge` writes the dense model that computes what the run computes; a llama.cpp
    adapter export is refused by name."""
    import transformers

    from lorakit.tasks.causal_lm import load_trained
    from train_fixtures import tiny_run_overrides

    model_dir, data = assets
    run = tmp_path / "run"
    code, err = cli("train", *tiny_run_overrides(model_dir, data, run, method, steps=4), "--quiet")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["valid_ppl_after"] < summary["valid_ppl_before"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(run / "adapter" / "adapter_model.safetensors"))
    base = json.loads((run / "adapter" / "lorakit.json").read_text())["base_weights"]["weight_types"]
    assert set(base) == ({"NF4Weight"} if method == "qdora" else {"dense"})

    code, err = cli("merge", run)
    assert code == 0, err
    trained, tok, _ = load_trained(run)
    ids = torch.tensor([tok("def add(a, b): return a + b").input_ids])
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_diff(merged(ids).logits, trained(ids).logits) <= 1e-4

    code, err = cli("export", run, "--format", "gguf-adapter", "--out", tmp_path / "a.gguf")
    assert code == 2 and "has no form for DoRA's per-row rescaling" in err
