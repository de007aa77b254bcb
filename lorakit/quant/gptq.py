"""GPTQ (Frantar et al., 2022): group-wise INT-N codes that minimise the layer-output error.

The grid is lorakit's INT-N grid (`lorakit.quant.intn`): per output row, groups of `group_size`
input columns, W_q[i, j] = scale[i, G] · q[i, j] + offset[i, G], G = j // group_size. RTN rounds
each weight to its nearest grid point; GPTQ picks the codes of W (out, in) that make

    ‖X Wᵀ − X W_qᵀ‖² = n/2 · tr((W − W_q) H (W − W_q)ᵀ)  small for the calibration inputs X (n, in),
    H = 2/n · Xᵀ X  (in, in).

It quantizes one column j at a time and lets the not-yet-quantized columns absorb the error
(the Optimal Brain Surgeon update, with H⁻¹ restricted to the remaining columns):

    e   = (W[:, j] − W_q[:, j]) / U[j, j]                  (out,)
    W[:, k] ← W[:, k] − e · U[j, k]     for k > j

where U is the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U): row j of U is H⁻¹ of the remaining
columns, eliminated down to column j, so no inverse is ever updated. Before inverting,
H ← H + damp · mean(diag H) · I; a dead column (H[j, j] = 0, its input is always 0) gets
H[j, j] = 1 and W[:, j] = 0. Lazy batch updates: inside a block of `block_size` columns the update
touches only the block; the block's errors E (out, block) reach the later columns in one matmul,
W[:, later] −= E · U[block, later].

A group's scale and offset are set (min-max, as RTN) when its first column is reached, from the
group's weights as compensated so far (when `block_size` is not a multiple of `group_size`, a
group's columns past the current block have not yet received that block's errors). With `act_order`, columns are processed by decreasing
H[j, j] (the most sensitive first) with *static groups*: every group's scale and offset come from the
original weights up front and a column keeps its group j // group_size; codes are un-permuted at
the end, so the stored layout is the same as without act_order. `scale_dtype=torch.float16` rounds each
group's scale and offset to fp16 values before its codes are chosen (llama.cpp's Q4_1 / Q5_1 layout).

`quantize_gptq_(model, batches, ...)` runs GPTQ on every selected linear layer, block after block
(`sequential`), and writes the dequantized W_q back into the dense weights; `quantize_rtn_` does
the same with round-to-nearest. Both return each layer's `GroupCodes` for building INT-N weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lorakit.quant.api import check_linear_targets
from lorakit.quant.intn import check_bits, check_group_size, dequantize_grid, minmax_params, round_to_grid
from lorakit.adapters.walk import Patterns, find_targets


class GroupCodes(NamedTuple):
    """One layer's INT-N quantization: codes uint8 (out, in); scale, offset float32 (out, in/group_size)."""

    codes: Tensor
    scale: Tensor
    offset: Tensor


def group_params(w_group: Tensor, bits: int, scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Min-max scale and offset of each row of one group, w_group (out, g) -> two float32 (out,).

    scale = (max − min) / (2^bits − 1), offset = min; a constant row takes scale = 1, offset = x.
    """
    scale, offset = minmax_params(w_group, bits, w_group.shape[1], scale_dtype)  # (out, 1) each
    return scale[:, 0], offset[:, 0]


def rtn_codes(w: Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None) -> GroupCodes:
    """Round-to-nearest min-max quantization of w (out, in): codes (out, in), scale and offset (out, in/g)."""
    _check_weight(w, bits, group_size)
    scale, offset = minmax_params(w.detach(), bits, group_size, scale_dtype)
    return GroupCodes(round_to_grid(w.detach(), scale, offset, bits), scale, offset)


def dequantize_codes(codes: GroupCodes, dtype: torch.dtype = torch.float32) -> Tensor:
    """W_q = scale · q + offset (out, in), in float32 (as `IntNWeight.dequantize` computes it), cast once."""
    return dequantize_grid(*codes).to(dtype)


def gptq_codes(
    w: Tensor, hessian: Tensor, bits: int, group_size: int, *,
    block_size: int = 128, damp: float = 0.01, act_order: bool = False, scale_dtype: torch.dtype | None = None,
) -> GroupCodes:
    """GPTQ codes of w (out, in) for the input second moment `hessian` (in, in), H = 2/n Σ x xᵀ.

    Returns codes uint8 (out, in), scale and offset float32 (out, in/group_size). Computes in float32,
    with the Cholesky factorisations of H and H⁻¹ in float64. See the module docstring for the math.
    """
    _check_weight(w, bits, group_size)
    out_features, in_features = w.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; a weight (out, in) = {tuple(w.shape)} "
                         f"needs an (in, in) = ({in_features}, {in_features}) Hessian")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer (128 is the usual choice)")
    if not damp >= 0:
        raise ValueError(f"damp={damp!r} must be >= 0 (a fraction of mean(diag H), e.g. 0.01)")

    W = w.detach().to(torch.float32).clone()                   # (out, in), compensated in place
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = in_features // group_size
    if act_order:
        scale, offset = minmax_params(W, bits, group_size, scale_dtype)  # static groups, from the original weights
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scale = torch.empty(out_features, n_groups, device=W.device)
        offset = torch.empty(out_features, n_groups, device=W.device)
        perm = torch.arange(in_features, device=W.device)
    group_of = (perm // group_size).tolist()                   # group of the column processed at step j

    U = _inverse_cholesky_upper(H, damp).to(torch.float32)    # (in, in), H⁻¹ = Uᵀ U
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=W.device)  # processing order
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        W1 = W[:, b0:b1]                                       # a view: the in-block updates land in W
        U1 = U[b0:b1, b0:b1]
        E1 = torch.empty(out_features, b1 - b0, device=W.device)
        for i in range(b1 - b0):
            j = b0 + i
            G = group_of[j]
            if not act_order and j % group_size == 0:
                scale[:, G], offset[:, G] = group_params(W[:, j:j + group_size], bits, scale_dtype)
            s, o = scale[:, G:G + 1], offset[:, G:G + 1]       # (out, 1)
            q = round_to_grid(W1[:, i:i + 1], s, o, bits)      # (out, 1)
            codes[:, j:j + 1] = q
            e = (W1[:, i] - (s[:, 0] * q[:, 0].float() + o[:, 0])) / U1[i, i]  # (out,)
            W1[:, i + 1:] -= e[:, None] * U1[i, i + 1:][None, :]
            E1[:, i] = e
        W[:, b1:] -= E1 @ U[b0:b1, b1:]                        # (out, block) @ (block, later)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return GroupCodes(codes, scale, offset)


def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """U upper triangular with Uᵀ U = (H + damp · mean(diag H) · I)⁻¹, float64 (in, in)."""
    H = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"the Hessian is not positive definite with damp={damp}; "
                         "raise damp (e.g. 0.1) or calibrate on more tokens")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _check_weight(w: Tensor, bits: int, group_size: int, name: str = "weight") -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(w.shape)}")
    check_bits(bits)
    check_group_size(group_size, w.shape[1], name)


def collect_hessians(model: nn.Module, batches: Iterable[Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """H = 2/n Σ x xᵀ (in, in) float32 of each named layer's input, over all n tokens of all batches.

    `batches` yields input_ids (B, T); each runs as ``model(input_ids=...)`` without gradients (and
    without a KV cache, for models that take `use_cache`). A named module is any one with a 2-D
    `weight` (out, in) whose input's last dimension is `in`.
    """
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"{name} ({type(module).__name__}) has no 2-D (out, in) weight to collect a Hessian for")
    with _HessianHooks(modules) as hooks, torch.no_grad():
        for ids in batches:
            model(input_ids=ids, **_no_cache(model))
    return hooks.hessians()


class _HessianHooks:
    """Forward hooks that sum Xᵀ X (in, in) and count tokens for each module; layers fed the same input
    tensor (q/k/v, gate/up) share one product."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums = {name: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=m.weight.device)
                     for name, m in modules.items()}
        self.tokens = dict.fromkeys(modules, 0)
        self._last: tuple[Tensor, Tensor] | None = None  # (input, its Xᵀ X)

    def __enter__(self) -> _HessianHooks:
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = None

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is None or self._last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (n, in)
                self._last = (x, flat.T @ flat)
            self.sums[name] += self._last[1]
            self.tokens[name] += x[..., 0].numel()
        return hook

    def hessians(self) -> dict[str, Tensor]:
        return {name: 2.0 / max(self.tokens[name], 1) * s for name, s in self.sums.items()}


def _no_cache(model: nn.Module) -> dict:
    return {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}


def quantize_gptq_(
    model: nn.Module, batches: Iterable[Tensor], bits: int = 4, group_size: int = 128, *,
    target_modules: Patterns = "all-linear", exclude_modules: Patterns = None, act_order: bool = False,
    block_size: int = 128, damp: float = 0.01, sequential: bool = True, scale_dtype: torch.dtype | None = None,
) -> dict[str, GroupCodes]:
    """GPTQ every selected ``nn.Linear`` on the calibration `batches` (input_ids (B, T)); write W_q back.

    Each selected weight becomes its dequantized W_q (dense, same dtype), so the model keeps running;
    the returned codes rebuild it exactly as INT-N weights. Lossy: the codes are what to keep.

    `sequential=True` (standard GPTQ): the repeated blocks (a decoder's layers: the children of the
    `nn.ModuleList` / `nn.Sequential` that hold the targets) are quantized in order, each from inputs
    produced by the already-quantized blocks before it. The first block's inputs are captured once;
    block k's output is block k+1's input (the other arguments, masks and position embeddings, are the
    same for every block). All targets of a block share one calibration pass. `sequential=False`
    takes every Hessian from one pass through the unquantized model.
    """
    names = _gptq_targets(model, bits, group_size, target_modules, exclude_modules)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass calibration input_ids, e.g. 16 sequences of 256 tokens")
    gptq = dict(bits=bits, group_size=group_size, block_size=block_size, damp=damp, act_order=act_order,
                scale_dtype=scale_dtype)
    result = {}
    if not sequential:
        for name, H in collect_hessians(model, batches, names).items():
            result[name] = _write_back(model, name, gptq_codes(model.get_submodule(name).weight, H, **gptq))
        return result

    container, first, last = _blocks_holding(model, names)
    inputs = _block_inputs(model, container[first], batches)   # [(args, kwargs)] per batch
    for k in range(first, last + 1):
        block = container[k]
        prefix = _prefix_of(model, block)
        mine = [n for n in names if n.startswith(prefix)]
        if mine:
            with _HessianHooks({n: model.get_submodule(n) for n in mine}) as hooks, torch.no_grad():
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            for name, H in hooks.hessians().items():
                result[name] = _write_back(model, name, gptq_codes(model.get_submodule(name).weight, H, **gptq))
        if k < last:
            with torch.no_grad():
                inputs = [_next_inputs(block(*args, **kwargs), args, kwargs) for args, kwargs in inputs]
    return result


def quantize_rtn_(
    model: nn.Module, bits: int = 4, group_size: int = 128, *,
    target_modules: Patterns = "all-linear", exclude_modules: Patterns = None,
) -> dict[str, GroupCodes]:
    """Round-to-nearest every selected ``nn.Linear`` and write W_q back (as `quantize_gptq_`, no calibration)."""
    names = _gptq_targets(model, bits, group_size, target_modules, exclude_modules)
    return {name: _write_back(model, name, rtn_codes(model.get_submodule(name).weight, bits, group_size))
            for name in names}


def _gptq_targets(model, bits, group_size, target_modules, exclude_modules) -> list[str]:
    names = find_targets(model, target_modules, exclude_modules)
    check_linear_targets(model, names)
    for name in names:
        _check_weight(model.get_submodule(name).weight, bits, group_size, name)
    return names


def _write_back(model: nn.Module, name: str, codes: GroupCodes) -> GroupCodes:
    weight = model.get_submodule(name).weight
    with torch.no_grad():
        weight.copy_(dequantize_codes(codes, weight.dtype))
    return codes


class _Stop(Exception):
    """Raised by a pre-hook once the first block's inputs are captured: the rest of the pass is not needed."""


def _blocks_holding(model: nn.Module, names: list[str]) -> tuple[nn.Module, int, int]:
    """The ModuleList / Sequential whose children hold every target, and the first and last child index."""
    owners = {}
    for name in names:
        parts = name.split(".")
        k = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        parent = model.get_submodule(".".join(parts[:k])) if k is not None else None
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"sequential=True runs the model block by block, but {name} is not inside the repeated blocks of an "
                "nn.ModuleList or nn.Sequential (a decoder's layers); pass sequential=False, or exclude it"
            )
        owners.setdefault(id(parent), (parent, []))[1].append(int(parts[k]))
    if len(owners) != 1:
        raise ValueError("sequential=True needs every target inside one stack of blocks (one nn.ModuleList); "
                         "pass sequential=False, or select the layers of one stack")
    (container, indices), = owners.values()
    return container, min(indices), max(indices)


def _prefix_of(model: nn.Module, block: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is block) + "."


def _block_inputs(model: nn.Module, block: nn.Module, batches: list[Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each batch's forward pass calls `block` with; the pass stops there."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, **_no_cache(model))
                except _Stop:
                    pass
    finally:
        handle.remove()
    assert len(captured) == len(batches), "the first block was not called once per batch"
    return captured


def _next_inputs(output, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's call arguments for the next block: its hidden states replaced by this block's output."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
