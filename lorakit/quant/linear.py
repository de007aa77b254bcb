"""y = x Wᵀ + b over a dense or a quantized weight, and the frozen quantized linear layer.

For a quantized W (any module with ``dequantize(dtype) -> (out, in)``), autograd keeps only the
quantized module and rebuilds W in backward instead of saving the dense copy:

    forward:  y  = x Ŵᵀ + b,        Ŵ = weight.dequantize(x.dtype)       x (..., in) -> y (..., out)
    backward: ∂L/∂x = ∂L/∂y · Ŵ     (Ŵ dequantized again, in grad_out's dtype)
              ∂L/∂b = Σ over leading dims of ∂L/∂y
              W is frozen: no ∂L/∂W, so x is not saved either.

LoRA adapters on top get exactly the gradients they would get over the dense Ŵ.

Generation runs the whole model once per new token, so dequantizing on the fly rebuilds every Ŵ for
every token. Inside ``with dequantize_once():`` (no grad) each Ŵ is built once per dtype and kept until
the block ends: the same numbers, for the memory of one dense copy of the quantized layers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.quant.blockwise import weight_class
from lorakit.quant.intn import group_sums


def is_quantized_weight(obj: object) -> bool:
    """A quantized weight: a module of buffers with ``shape`` and ``dequantize(dtype) -> Tensor (out, in)``."""
    return isinstance(obj, nn.Module) and callable(getattr(obj, "dequantize", None)) and hasattr(obj, "shape")


_once = threading.local()  # .cache: {(id(owner), tag): (owner, dense)} inside dequantize_once() (`held`), else None


@contextlib.contextmanager
def _scope(store: threading.local) -> Iterator[None]:
    """`store.cache`, a dict, for the block; nested blocks share the outermost one's."""
    if getattr(store, "cache", None) is not None:
        yield
        return
    store.cache = {}
    try:
        yield
    finally:
        store.cache = None


def dequantize_once() -> contextlib.AbstractContextManager[None]:
    """Within the block, while grad is off, each quantized weight is dequantized once per dtype and reused
    (for generation: one dense copy instead of one per token), and a LoRA layer computes with one dense copy of
    its weight with the active adapter merged (`LoraLayer.forward`: one GEMM instead of three). Weights and
    adapters must not change inside the block (no merge_, no optimizer step); the copies are freed when it
    ends. Nests; per thread."""
    return _scope(_once)


def dense_bytes(model: nn.Module, dtype: torch.dtype, merged: bool = True) -> int:
    """Bytes of the dense copies `dequantize_once` holds for `model` in `dtype`: one per quantized weight, and
    (`merged`) one per adapted layer over a dense weight (its `held_shape`: the weight with the adapter
    merged). `merged=False`: the quantized weights only (what `hold_dense` holds)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in model.modules():
        shape = module.shape if is_quantized_weight(module) else getattr(module, "held_shape", None) if merged else None
        if shape is not None:
            rows, cols = shape
            total += rows * cols * size
    return total


def dequantize_once_if_it_fits(model: nn.Module, dtype: torch.dtype, share: float = 0.5):
    """`dequantize_once()` when the dense copies of `model`'s quantized weights take at most `share` of the
    memory still available (or the model has none: nothing to hold); otherwise a block that changes nothing,
    so inference dequantizes on the fly as before. For evaluation and generation on a 4-bit base."""
    need = dense_bytes(model, dtype)
    device = next((t.device for t in model.parameters()), None)
    if need == 0 or not fits(need, share, device):
        return contextlib.nullcontext()
    return dequantize_once()


_hold = threading.local()  # .cache: {(id(weight), dtype, moved or not): (weight, dense)} inside hold_dense(), else None


def hold_dense() -> contextlib.AbstractContextManager[None]:
    """Within the block, with grad on, each quantized weight is dequantized once per dtype, at its first forward,
    and that dense copy serves every later forward in the block and the backward of each (`training_dense`):
    one dequantization per weight for a micro-batch instead of two per forward (the forward's and the
    backward's). For a decoder run twice on one micro-batch (a shared prompt prefix, then the rows) that is
    one instead of four. Costs one dense copy of the quantized layers from the forward until its backward.
    Adapters must not change inside the block (QA-LoRA's moved offsets are taken at the first forward).
    Nests; per thread."""
    return _scope(_hold)


def available_memory_bytes(device: torch.device | None = None) -> int | None:
    """Memory still available for tensors on `device`: on a CUDA device the driver's free memory plus what
    PyTorch's allocator holds unused; else what the OS can still give this process (Linux ``MemAvailable``,
    else psutil). None when unknown."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def fits(need: int, share: float = 0.5, device: torch.device | None = None) -> bool:
    """Whether `need` bytes are at most `share` of the memory still available on `device` (True when that is
    unknown)."""
    free = available_memory_bytes(device)
    return free is None or need <= share * free


def _kept(store: threading.local, owner: object, tag: object, make) -> Tensor | None:
    """Inside `store`'s block (`_scope`): the tensor `make()` built for (`owner`, `tag`) the first time it is
    asked for, the same tensor after that; elsewhere None. Holding `owner` keeps its id from being reused while
    the block lasts."""
    cache = getattr(store, "cache", None)
    if cache is None:
        return None
    key = (id(owner), tag)
    if key not in cache:
        cache[key] = (owner, make())
    return cache[key][1]


def training_dense(weight: Tensor | nn.Module, dtype: torch.dtype, moved: Tensor | None) -> Tensor | None:
    """Inside `hold_dense()`: a quantized weight dense in `dtype` (over its moved grid when `moved` is given),
    built at its first use in the block; elsewhere, for a dense weight, and in compiled code (the block's
    cache is not traceable: the compiled forward and backward each dequantize, fused into one generated loop;
    `lorakit.training.compile`), None."""
    if isinstance(weight, Tensor) or torch.compiler.is_compiling():
        return None
    return _kept(_hold, weight, (dtype, moved is None), lambda: _dense(weight, dtype, moved))


def kept_or_dense(kept: Tensor | None, weight: Tensor | nn.Module, dtype: torch.dtype,
                  moved: Tensor | None) -> Tensor:
    """`kept` (a `training_dense` copy, for a backward) when it is in `dtype`, else the weight dense now."""
    return kept if kept is not None and kept.dtype == dtype else _dense(weight, dtype, moved)


def _dense(weight: Tensor | nn.Module, dtype: torch.dtype, moved: Tensor | None) -> Tensor:
    """The (out, in) weight in `dtype`, dequantized now (over its moved grid when `moved` is given). Not through
    `held`: autograd runs a Function's forward and backward with grad off, which is no sign of inference."""
    if isinstance(weight, Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype) if moved is None else weight.dequantize(dtype, moved)


def held(owner: object, tag: object, make) -> Tensor | None:
    """Inside `dequantize_once()` without grad: the tensor `make()` built for (`owner`, `tag`) the first time it
    is asked for, the same tensor after that (a dense copy of a quantized weight, a layer's weight with its
    adapter merged); elsewhere None."""
    return None if torch.is_grad_enabled() else _kept(_once, owner, tag, make)


def _dequantized(weight: nn.Module, dtype: torch.dtype) -> Tensor:
    dense = held(weight, dtype, lambda: weight.dequantize(dtype))
    return weight.dequantize(dtype) if dense is None else dense


def dense_weight(weight: Tensor | nn.Module, dtype: torch.dtype) -> Tensor:
    """The weight as a dense (out, in) tensor in `dtype`: a Tensor cast, or a quantized weight's `dequantize(dtype)`."""
    return weight.to(dtype) if isinstance(weight, Tensor) else _dequantized(weight, dtype)


def linear(x: Tensor, weight: Tensor | nn.Module, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for a dense weight; for a quantized one, dequantize on the fly in x.dtype."""
    if isinstance(weight, Tensor):
        return F.linear(x, weight, bias)
    if not is_quantized_weight(weight):
        raise TypeError(f"linear() takes a weight Tensor or a quantized weight module, got {type(weight).__name__}")
    if not torch.is_grad_enabled():  # nothing to save for backward
        return F.linear(x, _dequantized(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    return _DequantizingLinear.apply(x, weight, bias, None)


def offset_linear(x: Tensor, weight: nn.Module, bias: Tensor | None, moved: Tensor) -> Tensor:
    """y = x Ŵ'ᵀ + b over a group-wise INT-N weight whose offsets are moved by `moved` (out, in/g), float32,
    with the gradient reaching `moved` (QA-LoRA's update, merged as it trains):

        forward:  Ŵ' = scale · q + (offset + moved)   (out, in)     y = x Ŵ'ᵀ + b    x (..., in) -> (..., out)
                  S  = Σ_{j∈G} x_j, per group G       (..., in/g)   saved (1/g of x)
        backward: ∂L/∂x     = ∂L/∂y · Ŵ'             (Ŵ' dequantized again; never saved)
                  ∂L/∂moved = (∂L/∂y)ᵀ S              (out, in/g)  (Ŵ' is linear in each offset with slope S)
                  ∂L/∂b     = Σ over leading dims of ∂L/∂y

    Equal to x Ŵᵀ + S movedᵀ + b (the base output plus the update through the group sums) in exact
    arithmetic, with one GEMM each way instead of two and no (..., in) gradient of S to add. (Evaluation and
    generation inside `dequantize_once()` hold Ŵ' itself: `LoraLayer.merged_weight`.)"""
    return _DequantizingLinear.apply(x, weight, bias, moved)


def offset_grad(grad_out: Tensor, sums: Tensor) -> Tensor:
    """∂L/∂moved = (∂L/∂y)ᵀ S, float32 (out, in/g), from ∂L/∂y (..., out) and the group sums S (..., in/g)."""
    return (grad_out.reshape(-1, grad_out.shape[-1]).t() @ sums.reshape(-1, sums.shape[-1])).float()


class _DequantizingLinear(torch.autograd.Function):
    """Saves the quantized weight module on ctx and no dense weight (inside `hold_dense()`, the held one); with
    `moved` offsets (`offset_linear`) also the moved offsets and the group sums of x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: nn.Module, bias: Tensor | None, moved: Tensor | None) -> Tensor:
        ctx.weight = weight
        ctx.dense = training_dense(weight, x.dtype, moved)  # inside hold_dense(): kept for backward
        dense = kept_or_dense(ctx.dense, weight, x.dtype, moved)
        sums = group_sums(x, weight.group_size) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(moved, sums)
        return F.linear(x, dense, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        moved, sums = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_bias = grad_moved = None
        if ctx.needs_input_grad[0]:  # (..., out) @ (out, in)
            grad_x = grad_out @ kept_or_dense(ctx.dense, weight, grad_out.dtype, moved)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)   # (out,)
        if ctx.needs_input_grad[3]:
            grad_moved = offset_grad(grad_out, sums)
        return grad_x, None, grad_bias, grad_moved


def quantize_weight(weight: Tensor, config) -> nn.Module:
    """A dense (out, in) weight quantized as `config` says: `NF4Config` -> NF4/FP4 blocks, `IntNConfig` -> INT-N
    groups rounded to nearest (GPTQ needs calibration: `quantize_`)."""
    if hasattr(config, "bits"):  # IntNConfig: group-wise INT-N (QA-LoRA's base)
        from lorakit.quant.intn import IntNWeight

        return IntNWeight.from_float(weight, config.bits, config.group_size,
                                     getattr(torch, getattr(config, "scale_dtype", "float32")))
    return weight_class(config.quant_type).from_float(
        weight, config.block_size, config.double_quant, config.double_quant_block_size,
    )


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is a quantized module (state-dict keys ``weight.<buffer>``)."""

    is_quantized_linear = True  # lorakit.adapters.walk.layer_kind: a linear layer

    def __init__(self, weight: nn.Module, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config) -> QuantizedLinear:
        """Quantize `linear`'s weight as `config` (`NF4Config` or `IntNConfig`) says; the bias is kept, frozen."""
        return cls(quantize_weight(linear.weight.detach(), config), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight in the original dtype; the weight stays frozen."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(self.weight.dequantize(self.weight.dtype), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach(), requires_grad=self.bias.requires_grad)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
