"""lorakit's NF4 / FP4 bytes are bitsandbytes' bytes: codes, absmax, double-quantized absmax, dequantized values.

The oracle is bitsandbytes on CPU (`quantize_4bit` / `dequantize_4bit`), compared with torch.equal.

One documented exception, in bitsandbytes rather than here: on CPUs with AVX-512, bitsandbytes
0.50's `dequantize_4bit` kernel indexes absmax per row (row · (in // block) + col // block), which is
wrong when `in_features` is not a multiple of the block (a block then spans rows). Its quantizer,
its CUDA kernels and its pure-PyTorch kernel all use flat blocks, as lorakit does, so for those
shapes the dequantized values are compared with bitsandbytes' pure-PyTorch kernel instead.
"""

import numpy as np
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from lorakit.quant.blockwise import (  # noqa: E402
    FP4Weight, NF4Weight, dequantize_8bit, dynamic_map_8bit, quantize_8bit,
)

WEIGHTS = {"nf4": NF4Weight, "fp4": FP4Weight}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    (64, 64),     # aligned, one nested block
    (130, 192),   # 390 blocks: 2 nested blocks, the last partial
    (33, 96),     # 3168 values: the last block half full, in_features % 64 != 0
    (100, 130),   # 13000 values, last block 8 long
    (5, 33),      # odd numel: the last byte's low nibble is padding
    (1, 1),
]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes wraps its PyTorch kernels in torch.compile; eager gives the same values without compiling."""
    with torch._dynamo.config.patch(disable=True):
        yield


def reference_dequantize(packed, state):
    """bitsandbytes' flat-block PyTorch kernel (nested absmax dequantized by bitsandbytes itself)."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = bnb_functional.get_4bit_type(state.quant_type, device="cpu")
    return kernel(packed.view(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def weight(shape, dtype, seed=0):
    """Gaussian rows of different scales, with a few exact zeros and a row of ties."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (0.1 + torch.rand(shape[0], 1, generator=gen))
    w[0, : min(5, shape[1])] = 0
    return w.to(dtype)


def assert_same_bytes(mine, packed, state):
    assert torch.equal(mine.codes, packed.view(-1))
    if state.nested:
        assert torch.equal(mine.absmax_codes, state.absmax)
        assert torch.equal(mine.nested_absmax, state.state2.absmax)
        assert torch.equal(mine.nested_offset, state.offset)
    else:
        assert torch.equal(mine.absmax, state.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_and_values_match_bitsandbytes(quant_type, dtype, double_quant, shape):
    w = weight(shape, dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    mine = WEIGHTS[quant_type].from_float(w, block_size=64, double_quant=double_quant)
    assert_same_bytes(mine, packed, state)
    values = mine.dequantize(dtype)
    assert values.dtype == dtype and values.shape == shape
    assert torch.equal(values, reference_dequantize(packed, state))
    if shape[1] % 64 == 0 or shape[1] % 2:  # see the module docstring
        assert torch.equal(values, bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("block_size", [32, 128, 256, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_other_block_sizes_match_bitsandbytes(block_size, double_quant):
    w = weight((96, 256), torch.float32, seed=1)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
                                                 compress_statistics=double_quant)
    mine = NF4Weight.from_float(w, block_size=block_size, double_quant=double_quant)
    assert_same_bytes(mine, packed, state)
    assert torch.equal(mine.dequantize(), reference_dequantize(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_zeros_and_extremes_match_bitsandbytes(quant_type):
    """Values exactly on the midpoints between codes, all-zero blocks (full and partial), ±absmax, tiny values."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").sort().values
    midpoints = (code[:-1] + code[1:]) / 2
    row = torch.cat([torch.tensor([1.0, -1.0]), midpoints, -midpoints, torch.full((64 - 2 - 30,), 1e-30)])
    w = torch.cat([row, torch.zeros(64), row * 3.5, torch.zeros(64 + 10)]).view(1, -1)   # last block: 10 zeros
    for double_quant in (False, True):
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                     compress_statistics=double_quant)
        mine = WEIGHTS[quant_type].from_float(w, double_quant=double_quant)
        assert_same_bytes(mine, packed, state)
        assert torch.equal(mine.dequantize(), reference_dequantize(packed, state))


def test_constant_weight_double_quant_matches_bitsandbytes():
    """Every absmax equal: absmax - mean is all zero, an all-zero 8-bit block (bitsandbytes stores code 0)."""
    w = torch.full((64, 64), 0.25)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    mine = NF4Weight.from_float(w)
    assert_same_bytes(mine, packed, state)
    assert torch.equal(mine.dequantize(), bnb_functional.dequantize_4bit(packed, state))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map_8bit(), bnb_functional.create_dynamic_map())


def test_8bit_absmax_quantizer_matches_bitsandbytes_random():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(256 * 40 + 17, generator=gen) * torch.rand(1, generator=gen)
    codes, absmax = quantize_8bit(x, 256)
    ref_codes, ref_state = bnb_functional.quantize_blockwise(x, code=bnb_functional.create_dynamic_map(), blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    assert torch.equal(dequantize_8bit(codes, absmax, 256), bnb_functional.dequantize_blockwise(ref_codes, ref_state))


def test_8bit_absmax_quantizer_matches_bitsandbytes_at_lookup_table_edges():
    """bitsandbytes rounds through a 65,536-bin table, not to the exact nearest code: probe every bin edge
    where the table changes code, ±40 float32 steps, where exact rounding and the table disagree."""
    code = bnb_functional.create_dynamic_map()
    edges = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    table = torch.bucketize(edges, (code[:-1] + code[1:]) / 2)
    changes = (torch.nonzero(table[1:] != table[:-1]).flatten() + 1).tolist()
    probes = []
    for k in changes:   # x whose bin index (x + 1) / 2 · 65535 + 0.5 is just below or above the integer k
        up = down = np.float32((k - 0.5) / 65535)
        for _ in range(40):
            up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-1))
            probes += [up, down]
    probes = np.float32(2) * np.array(probes, dtype=np.float32) - np.float32(1)
    x = torch.from_numpy(probes)
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % 255)).view(-1, 255)
    x = torch.cat([blocks, torch.ones(len(blocks), 1)], dim=1).view(-1)   # absmax 1: the probes are used as they are
    codes, _ = quantize_8bit(x, 256)
    ref_codes, _ = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(codes, ref_codes)
    exact = torch.bucketize(x, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert not torch.equal(exact, ref_codes)  # the probes do reach the cases where the table differs
