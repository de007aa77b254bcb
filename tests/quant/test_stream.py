"""Streaming a safetensors checkpoint into a quantized model: exact, tied, never the whole dense model in memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.quant import IntNConfig, NF4Config, QuantizedLinear, load_quantized, quantize_
from lorakit.quant.stream import StreamMismatch

TOKENS = torch.arange(24).view(2, 12) % 128


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_llama):
    """A tiny Llama with lm_head tied to the embeddings, saved in several shards with an index."""
    path = tmp_path_factory.mktemp("tied")
    make_llama(tie_word_embeddings=True).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def single_file_checkpoint(tmp_path_factory, make_llama):
    path = tmp_path_factory.mktemp("untied")
    make_llama(seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory, make_llama):
    """Linears with biases, the biases in a later shard than their weights (so they arrive after the swap)."""
    path = tmp_path_factory.mktemp("biased")
    model = make_llama(seed=4, attention_bias=True, mlp_bias=True)
    model.config.save_pretrained(path)
    shards = {"model-1.safetensors": {}, "model-2.safetensors": {}}
    for key, value in model.state_dict().items():
        shards["model-2.safetensors" if key.endswith("bias") else "model-1.safetensors"][key] = value
    for name, tensors in shards.items():
        save_file(tensors, path / name)
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


CONFIGS = {"nf4": NF4Config(), "int4-fp16": IntNConfig(bits=4, group_size=32, scale_dtype="float16"),
           "int3": IntNConfig(bits=3, group_size=64)}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("source", ["checkpoint", "biased_checkpoint"])
def test_streamed_model_equals_quantized_from_pretrained(request, source, dtype, config):
    from transformers import AutoModelForCausalLM

    checkpoint = request.getfixturevalue(source)
    streamed = load_quantized(checkpoint, config, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    quantize_(reference, config)
    assert streamed.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], value), key
    assert not streamed.training
    assert torch.equal(logits(streamed), logits(reference))


def test_int_n_streaming_refuses_gptq_and_a_group_that_does_not_divide(checkpoint):
    with pytest.raises(ValueError, match="method='gptq'.*calibration"):
        load_quantized(checkpoint, IntNConfig(method="gptq"))
    with pytest.raises(ValueError, match="group_size"):
        load_quantized(checkpoint, IntNConfig(group_size=48))  # 64 and 128 input features: 48 divides neither


def test_tied_head_stays_tied(checkpoint):
    model = load_quantized(checkpoint)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_no_full_precision_linear_weight_survives(single_file_checkpoint):
    model = load_quantized(single_file_checkpoint, NF4Config(quant_type="fp4", double_quant=False))
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == ["lm_head"]
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    dense_keys = [k for k, v in model.state_dict().items() if v.dim() == 2 and v.is_floating_point()]
    assert sorted(dense_keys) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert not any(t.is_meta for t in model.state_dict().values())


MEASURE = textwrap.dedent("""
    import json, sys, torch
    from lorakit.quant import load_quantized

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    load_quantized(sys.argv[2])                     # warm up: imports, caches, thread pools
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
    start = rss("VmRSS")
    model = load_quantized(sys.argv[1])
    print(json.dumps({"peak_growth": rss("VmHWM") - start}))
""")


def write_random_llama(path: Path, **config) -> int:
    """A random Llama checkpoint written tensor by tensor (never a whole model in this process); its float32 bytes."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(**config)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(llama_config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}, path / "model.safetensors")
    llama_config.save_pretrained(path)
    return sum(s.numel() * 4 for s in shapes.values())


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_far_below_the_dense_model(tmp_path):
    """Peak RSS growth while streaming a 67 MB float32 checkpoint (64 layers of small linears) into NF4.

    Measured in a fresh process whose large allocations are all mmapped (MALLOC_MMAP_THRESHOLD_), so
    freed memory leaves RSS at once: the peak is then what was alive at the same time. Holding the
    dense model would need ≥ 67 MB; streaming needs the NF4 model (~9 MB) plus one tensor's temporaries.
    """
    (tmp_path / "big").mkdir(), (tmp_path / "small").mkdir()
    dims = dict(num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
    dense_bytes = write_random_llama(tmp_path / "big", hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=64, **dims)
    write_random_llama(tmp_path / "small", hidden_size=32, intermediate_size=64, num_hidden_layers=1, **dims)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(tmp_path / "small")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    assert peak < dense_bytes / 3, f"peak RSS growth {peak / 2**20:.1f} MiB, dense model {dense_bytes / 2**20:.1f} MiB"


def test_tied_head_cannot_be_quantized_while_streaming(checkpoint):
    with pytest.raises(ValueError, match=r"no weight in the checkpoint for selected layers \['lm_head'\]"):
        load_quantized(checkpoint, NF4Config(target_modules=["lm_head", "q_proj"]))


def test_foreign_checkpoints_are_clear_errors(tmp_path, single_file_checkpoint):
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_quantized(tmp_path)

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((single_file_checkpoint / "config.json").read_text())
    tensors = load_file(single_file_checkpoint / "model.safetensors")
    save_file({**tensors, "model.unused.weight": torch.zeros(2)}, extra / "model.safetensors")
    with pytest.raises(StreamMismatch, match=r"tensors the model does not have \['model.unused.weight'\]"):
        load_quantized(extra)  # extra tensors: a checkpoint lorakit train then loads dense instead
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text((single_file_checkpoint / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k}, missing / "model.safetensors")
    with pytest.raises(ValueError, match=r"cannot stream .*layers.1.mlp") as caught:
        load_quantized(missing)
    assert not isinstance(caught.value, StreamMismatch)  # an incomplete checkpoint is never loaded at all

    config = json.loads((single_file_checkpoint / "config.json").read_text())
    (extra / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    save_file(tensors, extra / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape .* but the model built"):
        load_quantized(extra)
