"""The CUDA paths: the same losses, gradients, codes and merged weights on a GPU as on the CPU.

Skipped where torch sees no CUDA device (CI, the development machine); run on a GPU with
`python -m pytest tests/test_cuda.py`. Each test builds the model on the CPU, copies it to the GPU,
and compares in fp32 with TF32 off (the GPU then differs from the CPU only by summation order: ~1e-6
relative on these tiny models, so rtol 1e-4 still catches a wrong scale, a missing adapter term or a
weight left on the wrong device). The bf16 test compares a bf16 GPU step (the dtype `auto` picks on a
GPU) with the fp32 one.
"""

import copy

import pytest
import torch

import lorakit
from lorakit.quant.linear import dequantize_once
from lorakit.tasks.losses import causal_lm_loss
from test_shared_prefix import batch as shared_prefix_batch
from test_shared_prefix import model_with as shared_prefix_model
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

CLOSE = {"rtol": 1e-4, "atol": 1e-5}
METHODS = ["lora", "qlora", "qalora", "qalora fp16"]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def batch(device="cpu"):
    """test_shared_prefix's batch: 4 rows sharing their first 12 tokens, two of them padded."""
    return tuple(t.to(device) for t in shared_prefix_batch())


def model_with(method: str, fused: bool = True):
    model = shared_prefix_model(method)
    if fused:
        lorakit.fuse_for_training_(model)
    return model


def loss_and_grads(model, share, ids, labels, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = causal_lm_loss(model, ids, labels, mask, share_prefix=share)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("share", [False, True], ids=["plain", "shared-prefix"])
@pytest.mark.parametrize("method", METHODS)
def test_training_loss_and_gradients_equal_the_cpu(method, share):
    cpu = model_with(method).train()
    gpu = copy.deepcopy(cpu).cuda()
    want = loss_and_grads(cpu, share, *batch())
    got = loss_and_grads(gpu, share, *batch(device="cuda"))
    torch.testing.assert_close(got[0].cpu(), want[0], **CLOSE)
    assert len(got[1]) == len(want[1]) > 0
    for g, w in zip(got[1], want[1]):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), w, **CLOSE)


@pytest.mark.parametrize("config", [lorakit.NF4Config(double_quant=True), lorakit.IntNConfig(bits=4, group_size=32)],
                         ids=["nf4", "int4"])
def test_quantizing_on_the_gpu_gives_the_cpu_codes(config):
    cpu, gpu = tiny_llama(), tiny_llama().cuda()
    lorakit.quantize_(cpu, config)
    lorakit.quantize_(gpu, config)
    want, got = cpu.state_dict(), gpu.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        if tensor.dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
            assert torch.equal(got[name].cpu(), tensor), name  # the codes themselves: bit for bit
        else:
            torch.testing.assert_close(got[name].cpu(), tensor, **CLOSE, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_with_held_merged_weights_equals_the_cpu(method):
    cpu = model_with(method).eval()
    gpu = copy.deepcopy(cpu).cuda()
    with torch.no_grad():
        want = causal_lm_loss(cpu, *batch(), share_prefix=False)
        with dequantize_once():
            got = causal_lm_loss(gpu, *batch(device="cuda"))
    torch.testing.assert_close(got.cpu(), want, **CLOSE)


@pytest.mark.parametrize("method", METHODS)
def test_merge_on_the_gpu_equals_the_cpu(method):
    cpu = model_with(method, fused=False).eval()
    gpu = copy.deepcopy(cpu).cuda()
    ids = batch()[0]
    with torch.no_grad():
        want_unmerged = cpu(ids).logits
        merge = lorakit.dequantize_and_merge_ if method == "qlora" else lorakit.merge_  # QLoRA: into a dense model
        merge(cpu)
        merge(gpu)
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits
    torch.testing.assert_close(got.cpu(), want, **CLOSE)
    torch.testing.assert_close(want, want_unmerged, **CLOSE)


@pytest.mark.parametrize("method", ["lora", "qalora"])
def test_a_bf16_step_on_the_gpu_follows_the_fp32_one(method):
    fp32 = model_with(method).train().cuda()
    bf16 = copy.deepcopy(fp32)
    assert lorakit.cast_base_(bf16, torch.bfloat16) == torch.bfloat16
    want = loss_and_grads(fp32, True, *batch(device="cuda"))
    got = loss_and_grads(bf16, True, *batch(device="cuda"))  # adapters keep fp32 masters, cast in forward
    assert torch.isfinite(got[0])
    torch.testing.assert_close(got[0].float(), want[0], rtol=2e-2, atol=2e-2)
    for g, w in zip(got[1], want[1]):
        cos = torch.nn.functional.cosine_similarity(g.float().flatten(), w.flatten(), dim=0)
        assert cos > 0.98, cos
