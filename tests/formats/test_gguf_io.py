"""GGUF in, GGUF out: load a llama.cpp file as an INT-N base, write it back, merge QA-LoRA into its offsets,
and export adapters in llama.cpp's format. Files are tiny Llamas written by `gguf_files` with the gguf
package's quantizers; transformers' own GGUF loader is the independent reference for the loaded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import lorakit  # noqa: E402
from lorakit.formats import gguf_blocks  # noqa: E402
from lorakit.formats.gguf_export import MERGED_KEY, export_gguf, export_gguf_adapter  # noqa: E402
from lorakit.formats.gguf_load import gguf_source, load_gguf, read_gguf  # noqa: E402
from lorakit.formats.gguf_names import rope_perm  # noqa: E402
from lorakit.quant.intn import IntNWeight  # noqa: E402
from tests.formats.gguf_files import tensor_bytes, write_llama_gguf  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}


def ids(seed=0):
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def hf_reference(path):
    """transformers' own GGUF loading: dequantizes every tensor and un-permutes attn_q / attn_k itself."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def qalora(model, targets=("q_proj", "k_proj", "v_proj", "down_proj"), seed=1):
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=list(targets), group_size=32))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=gen) * (0.3 if name.endswith(".B") else 1.0)
    return model


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_load_keeps_codes_and_equals_transformers(tmp_path, qtype):
    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), qtype)
    model, tok = load_gguf(path, tokenizer=False)
    assert tok is None
    linears = [m for m in model.modules() if isinstance(m, lorakit.QuantizedLinear)]
    assert len(linears) == 15  # the 14 linears of the 2 blocks, and lm_head (the Q8_0 output tensor)
    assert all(isinstance(m.weight, IntNWeight) and m.weight.bits == BITS[qtype] and m.weight.group_size == 32
               for m in linears if m is not model.lm_head)
    assert model.lm_head.weight.bits == 8
    ref = hf_reference(path)
    for name, module in model.named_modules():
        if isinstance(module, lorakit.QuantizedLinear):  # bit for bit, in Hugging Face's row order
            assert torch.equal(module.weight.dequantize(torch.float32), ref.get_submodule(name).weight), name
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), rtol=0, atol=1e-5)
    assert gguf_source(model).types["blk.0.attn_q.weight"] == qtype


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_export_without_training_is_byte_identical(tmp_path, qtype):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), qtype)
    model, _ = load_gguf(src, tokenizer=False)
    report = export_gguf(model, tmp_path / "out.gguf")
    assert report.exact and set(report.counts()) <= {"codes kept", "copied", "dense"}
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(src)
    assert (tmp_path / "out.gguf").read_bytes() == src.read_bytes()  # metadata and layout too


def test_qwen2_loads_with_biases_and_no_rope_permutation(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    qwen = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # not zero, so a bias lost or mis-placed shows
    src = write_llama_gguf(tmp_path / "q.gguf", qwen, "Q5_1", arch="qwen2")
    model, _ = load_gguf(src, tokenizer=False)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, IntNWeight)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    torch.testing.assert_close(logits(model, ids()), logits(hf_reference(src), ids()), rtol=0, atol=1e-5)
    export_gguf(model, tmp_path / "out.gguf")
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(src)


def test_mixed_types_tied_embeddings_and_f16(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    types = {"blk.0.attn_q.weight": "Q5_1", "blk.0.ffn_up.weight": "F16", "blk.1.attn_k.weight": "Q8_0",
             "blk.1.ffn_down.weight": "F32", "blk.0.attn_norm.weight": "F16"}
    src = write_llama_gguf(tmp_path / "m.gguf", model, "Q4_0", types=types, embed_type="Q4_1")
    loaded, _ = load_gguf(src, tokenizer=False)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.model.layers[0].mlp.up_proj.weight, torch.Tensor)  # F16 loads dense
    torch.testing.assert_close(logits(loaded, ids()), logits(hf_reference(src), ids()), rtol=0, atol=1e-5)
    export_gguf(loaded, tmp_path / "out.gguf")
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(src)


def test_qalora_merge_moves_only_offsets(tmp_path):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    model, _ = load_gguf(src, tokenizer=False)
    base = logits(model, ids())
    qalora(model)
    unmerged = logits(model, ids())
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the model
    lorakit.merge_(model)
    merged = logits(model, ids())
    assert torch.equal(merged, unmerged)  # trained on the moved offsets themselves: the merge is bit for bit
    report = export_gguf(model, tmp_path / "ft.gguf", merged="test adapter")
    before, after = tensor_bytes(src), tensor_bytes(tmp_path / "ft.gguf")
    assert before.keys() == after.keys()
    rules = {t.name: t.rule for t in report.tensors}
    adapted = {n for n in before if any(k in n for k in ("attn_q", "attn_k", "attn_v", "ffn_down"))}
    for name, (qtype, data) in before.items():
        if name not in adapted:
            assert after[name] == (qtype, data), name
            continue
        assert rules[name] == "offsets moved" and after[name][0] == "Q4_1"
        shape = _shape(src, name)
        old = gguf_blocks.decode(data, "Q4_1", shape)
        new = gguf_blocks.decode(after[name][1], "Q4_1", shape)
        assert np.array_equal(old.codes, new.codes) and np.array_equal(old.d, new.d)  # codes and scales byte for byte
        assert not np.array_equal(old.m, new.m)
    # QA-LoRA trained against fp16(m + δ): the merged model is the file, bit for bit
    assert report.exact and report.max_abs_error == 0
    reader = read_gguf(tmp_path / "ft.gguf")
    assert reader.fields[MERGED_KEY].contents() == "test adapter"
    reloaded, _ = load_gguf(tmp_path / "ft.gguf", tokenizer=False)
    torch.testing.assert_close(logits(reloaded, ids()), merged, rtol=0, atol=1e-5)


def test_offsets_train_against_their_fp16_rounding(tmp_path):
    """A GGUF base's 4-bit offsets are deployed in fp16: the adapter's forward is fp16(m + δ) − m, and
    the gradient passes straight through the rounding."""
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    model, _ = load_gguf(src, tokenizer=False)
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.weight.offset_dtype == torch.float16
    qalora(model, targets=("v_proj",))
    layer = model.model.layers[0].self_attn.v_proj
    adapter = layer.adapter()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.B.mul_(1e-6)  # δ far below fp16's resolution of the offsets: the deployed model does not change
    y = layer(x)
    torch.testing.assert_close(y, layer.base_forward(x), rtol=0, atol=0)
    y.sum().backward()
    assert adapter.B.grad.abs().sum() > 0  # but training still moves B (straight-through)
    with torch.no_grad():
        adapter.B.mul_(1e6)
    exact = layer.base_forward(x) + layer.adapter_forward(adapter, x)  # s · B A pool(x), float32 offsets
    assert 0 < (layer(x) - exact).abs().max() < 1e-2  # differs only by the offsets' fp16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moved_offsets_in_one_gemm_equal_base_plus_update(dtype):
    """Training runs QA-LoRA on deployed offsets as one GEMM over the moved grid (`offset_linear`); it equals
    the base output plus the update through the group sums (`offset_forward`), forward and every gradient,
    with a bias and with adapter groups coarser than the weight's."""
    from lorakit.adapters.layers import LoraLayer
    from lorakit.quant.linear import QuantizedLinear

    gen = torch.Generator().manual_seed(0)
    weight = IntNWeight.from_float(torch.randn(48, 128, generator=gen), 4, 32, torch.float16)
    layer = LoraLayer(QuantizedLinear(weight, torch.randn(48, generator=gen)))
    layer.bias.requires_grad_(True)
    layer.add_adapter("a", lorakit.LoraConfig(r=4, alpha=8, group_size=64))
    layer.active = "a"
    adapter = layer.adapter()
    with torch.no_grad():
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.3)
    x = torch.randn(2, 5, 128, generator=gen, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 5, 48, generator=gen, dtype=dtype)
    results = []
    for forward in (layer, lambda x: layer.base_forward(x) + layer.offset_forward(adapter, x)):
        y = forward(x)
        y.backward(grad_y)
        results.append([y.detach()] + [t.grad.clone() for t in (x, adapter.A, adapter.B, layer.bias)])
        for t in (x, adapter.A, adapter.B, layer.bias):
            t.grad = None
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # the weight's grid is float32 in both
    for name, fused, reference in zip(("y", "dL/dx", "dL/dA", "dL/dB", "dL/db"), *results):
        assert fused.dtype == reference.dtype, name
        torch.testing.assert_close(fused, reference, rtol=tol, atol=tol, msg=name)
    assert (adapter.B.abs().sum() > 0) and results[0][2].abs().sum() > 0  # the update and its gradient are not zero


def _shape(path, name):
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def test_symmetric_type_takes_the_merge_as_its_offset_type(tmp_path):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_0")
    model, _ = load_gguf(src, tokenizer=False)
    qalora(model, targets=("v_proj",))
    unmerged = logits(model, ids())
    lorakit.merge_(model)
    report = export_gguf(model, tmp_path / "ft.gguf")
    rows = {t.name: t for t in report.tensors}
    assert rows["blk.0.attn_v.weight"].type_out == "Q4_1" and rows["blk.0.attn_q.weight"].type_out == "Q4_0"
    old = gguf_blocks.decode(tensor_bytes(src)["blk.0.attn_v.weight"][1], "Q4_0", _shape(src, "blk.0.attn_v.weight"))
    new = gguf_blocks.decode(tensor_bytes(tmp_path / "ft.gguf")["blk.0.attn_v.weight"][1], "Q4_1",
                             _shape(src, "blk.0.attn_v.weight"))
    assert np.array_equal(old.codes, new.codes) and np.array_equal(old.d, new.d)
    assert "changed type" in str(report) and report.exact
    reloaded, _ = load_gguf(tmp_path / "ft.gguf", tokenizer=False)
    torch.testing.assert_close(logits(reloaded, ids()), unmerged, rtol=0, atol=1e-4)


def test_plain_lora_merge_is_requantized_with_its_error_reported(tmp_path):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    model, _ = load_gguf(src, tokenizer=False, quantized=False)  # dense: plain LoRA
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, target_modules=["o_proj"]))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    lorakit.merge_(model)
    report = export_gguf(model, tmp_path / "ft.gguf")
    rows = {t.name: t for t in report.tensors}
    assert rows["blk.0.attn_output.weight"].rule == "re-quantized" and rows["blk.0.attn_output.weight"].max_abs_error > 0
    assert rows["blk.0.attn_q.weight"].rule == "copied" and rows["blk.0.attn_q.weight"].max_abs_error == 0
    assert not report.exact


def test_adapter_file_is_the_equivalent_plain_lora(tmp_path):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    model, _ = load_gguf(src, tokenizer=False)
    qalora(model)
    for module in model.modules():  # a separate adapter is applied in float (llama.cpp adds B A x): no
        if isinstance(module, IntNWeight):  # fp16 rounding of merged offsets, so compare with that forward
            module.offset_dtype = None
    want = logits(model, ids())
    export_gguf_adapter(model, tmp_path / "adapter.gguf")
    reader = read_gguf(tmp_path / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 8 and tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 64)
    assert tensors["blk.0.attn_q.weight.lora_b"].shape == (64, 4)
    # apply the file as llama.cpp does (W + alpha/r · B A, GGUF row order) to a fresh dense copy of the base
    plain, _ = load_gguf(src, tokenizer=False, quantized=False)
    with torch.no_grad():
        for name, module in plain.named_modules():
            key = _gguf_linear(name)
            if key and f"{key}.lora_a" in tensors:
                a, b = tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"]
                if "attn_q" in key or "attn_k" in key:
                    heads = 4 if "attn_q" in key else 2
                    b = b[np.argsort(rope_perm(b.shape[0], heads))]
                module.weight += alpha / a.shape[0] * torch.from_numpy(b @ a)
    torch.testing.assert_close(logits(plain, ids()), want, rtol=0, atol=1e-4)


def _gguf_linear(hf_module):
    from lorakit.formats.gguf_names import gguf_name

    name = gguf_name(hf_module + ".weight")
    return name


def test_kquant_loads_exactly_and_exports_as_q4_1_with_its_error(tmp_path):
    model = tiny_llama(hidden=256)
    rows, cols = model.model.layers[0].self_attn.q_proj.weight.shape
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, cols // 256 * 144), dtype=np.uint8)
    raw.reshape(rows, -1, 144)[..., 0:2] = np.array([0.002], np.float16).view(np.uint8)   # d
    raw.reshape(rows, -1, 144)[..., 2:4] = np.array([0.001], np.float16).view(np.uint8)   # dmin
    src = write_llama_gguf(tmp_path / "k.gguf", model, "Q8_0", raw={"blk.0.attn_q.weight": (raw, "Q4_K")})
    loaded, _ = load_gguf(src, tokenizer=False)
    weight = loaded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, IntNWeight) and weight.bits == 4 and weight.group_size == 32
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(rows, cols)
    want = want[np.argsort(rope_perm(rows, 4))]
    assert np.array_equal(weight.dequantize(torch.float32).numpy(), want)
    report = export_gguf(loaded, tmp_path / "out.gguf")
    row = next(t for t in report.tensors if t.name == "blk.0.attn_q.weight")
    assert (row.type_in, row.type_out) == ("Q4_K", "Q4_1") and 0 < row.max_abs_error < 1e-3


def test_bad_files_and_calls_are_clear_errors(tmp_path):
    src = write_llama_gguf(tmp_path / "m.gguf", tiny_llama(), "Q4_1")
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(tmp_path / "cut.gguf", tokenizer=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="cannot be read as GGUF"):
        load_gguf(tmp_path / "junk.gguf", tokenizer=False)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="general.architecture='gpt2' is not supported"):
        load_gguf(tmp_path / "gpt2.gguf", tokenizer=False)
    model, _ = load_gguf(src, tokenizer=False)
    qalora(model)
    with pytest.raises(ValueError, match="unmerged adapter.*merge_"):
        export_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="template"):
        export_gguf(tiny_llama(), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    wide = tiny_llama(hidden=256)
    q2k = np.zeros((256, 84), np.uint8)  # one Q2_K super-block per row
    write_llama_gguf(tmp_path / "q2k.gguf", wide, "Q8_0", raw={"blk.0.attn_q.weight": (q2k, "Q2_K")})
    with pytest.raises(ValueError, match="Q2_K"):
        load_gguf(tmp_path / "q2k.gguf", tokenizer=False)
