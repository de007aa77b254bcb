"""Adapter layers: one `LoraLayer` for every supported layer kind, and `SavedModule` for
modules trained in full (PEFT's `modules_to_save`).

A `LoraLayer` replaces a base layer in the model and owns the base's frozen `weight` and `bias`
*by reference* (the same Parameter objects), so `q_proj.weight` stays `q_proj.weight` in the
state dict. The original module is kept, unregistered, as `base_layer`: `merge_` puts it back.

For an adapter with rank r, scaling s and input dropout:

    kind        base weight W         A                 B                forward
    linear      (out, in)             (r, in)           (out, r)         W x + b + s · B A drop(x)
    QA-LoRA     (out, in)             (r, in/g)         (out, r)         W x + b + s · B A pool_g(drop(x))
    Conv1D      (in, out) (GPT-2)     (r, in)           (out, r)         x W + b + s · B A drop(x)
    embedding   (num, dim)            (r, num)          (dim, r)         W[ids] + s · B (Aᵀ[ids])
    convNd      (out, in, *k)         (r, in, *k)       (out, r, 1...)   conv(x, W) + s · B ⊛ conv(drop(x), A)
    DoRA        any kind above        as its kind       as its kind      y + (m/n − 1) ⊙ W drop(x) + m/n ⊙ s · B A drop(x)
                m (trained), n = ||W + ΔW||_c: (out,) linear, Conv1D; (dim,) embedding; (1, out, 1...) convNd; y = W x + b

The A convolution uses the base's stride, padding, dilation and padding mode, so the update is
exactly the dense ΔW = s · (B A) reshaped to W's layout (`delta_weight`), which merges losslessly.
A conv subclass that pads in its own forward (TensorFlow "SAME": EfficientNet's
Conv2dStaticSamePadding) runs both convolutions through that forward with the weight swapped, so the
A convolution sees the base's padding too. Grouped convs (groups > 1, e.g. depthwise) are refused: an
adapter that respects the groups is not PEFT's conv adapter, and PEFT's (a dense A over all input
channels) does not merge into the grouped W.

DoRA (Liu et al., 2024; `use_dora`) also trains a magnitude m per output channel and computes with
W' = m ⊙ (W + ΔW) / n, where n = ||W + ΔW||_c is the L2 norm of each output channel: a row of a linear
W, a column of a Conv1D W, one embedding dimension over the vocabulary, one conv filter (`weight_norm`).
n is computed without grad: a constant in backward (the paper's section 4.3, as PEFT), so no graph of
the dense (out, in) W + ΔW is kept. m starts at n with ΔW = 0, so W' = W. With dropout off (eval, or
p = 0), W drop(x) is the base output less its bias and the forward is m/n ⊙ (W + ΔW) x + b exactly;
with dropout PEFT's formula above (one extra base matmul on drop(x)). An embedding has neither:
m/n ⊙ (W[ids] + s · B Aᵀ[ids]). The magnitudes have PEFT's shapes and state-dict layout.

Adapter parameters are kept in float32 (or the base's dtype if it is float64) and cast to the
input's dtype in forward, so a bf16 base computes in bf16 while the optimizer sees fp32 values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.config import LoraConfig
from lorakit.quant.intn import group_sums
from lorakit.quant.linear import dense_weight, held, linear, offset_linear
from lorakit.adapters.walk import layer_kind


GROUPED_CONV = (
    "a LoRA adapter on a grouped conv (groups > 1, e.g. depthwise) cannot both merge exactly and load in PEFT; "
    "exclude it (exclude_modules) or train it in full (modules_to_save)"
)


def is_dense(weight: object) -> bool:
    return isinstance(weight, torch.Tensor)


class LoraAdapter(nn.Module):
    """One named adapter of one layer.

    Stored tensors (float32 unless the base is float64):
        A:  (r, in, *kernel)  linear (r, in); embedding (r, num_embeddings)
        B:  (out, r, *ones)   linear (out, r); embedding (embedding_dim, r)
        A0, B0 (PiSSA only, buffers): the initial A and B, so the adapter can be written as plain
            LoRA against the original (un-residualised) weight: s·(BA − B0A0) + s·B0A0.
        magnitude (DoRA only, else None): m, one per output channel: linear (out,), embedding
            (embedding_dim,), convNd (1, out, 1...).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float, group_size: int | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(b)
        self.r = a.shape[0]
        self.scaling = scaling
        self.group_size = group_size  # QA-LoRA: A sees the input averaged over groups of this size
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("magnitude", None)  # DoRA: set by LoraLayer.add_adapter

    @property
    def is_pissa(self) -> bool:
        return hasattr(self, "A0")

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """QA-LoRA's input: (..., in) -> (..., in/g), the mean of each group (identity for plain LoRA)."""
        if self.group_size is None:
            return x
        return x.unflatten(-1, (-1, self.group_size)).mean(-1)

    def extra_repr(self) -> str:
        extra = (", pissa" if self.is_pissa else "") + (f", group_size={self.group_size}" if self.group_size else "")
        extra += ", dora" if self.magnitude is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}" + extra


class LoraLayer(nn.Module):
    """A base layer plus any number of named LoRA adapters, one of them active."""

    is_lora_layer = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(f"cannot adapt {type(base).__name__}: supported are Linear, Embedding, Conv1d, Conv2d, GPT-2 Conv1D")
        if kind.startswith("conv") and base.groups != 1:
            raise ValueError(f"cannot adapt {base}: {GROUPED_CONV}")
        self.weight = base.weight  # the same Parameter (or quantized weight module): keys stay the base's
        self.register_parameter("bias", getattr(base, "bias", None))
        object.__setattr__(self, "base_layer", base)  # unregistered, after the weight: __getattr__ falls back to it
        self.kind = kind
        self.transposed = type(base).__name__ == "Conv1D"  # GPT-2 stores W as (in, out)
        self.lora = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.routes = None  # lorakit.adapters.mixed.Routes during a mixed-adapter forward: one adapter per row

    # -- shapes -------------------------------------------------------------------------------
    @property
    def in_out(self) -> tuple[int, int]:
        base = self.base_layer
        if self.kind == "embedding":
            return base.num_embeddings, base.embedding_dim
        if self.kind.startswith("conv"):
            return base.in_channels, base.out_channels
        if self.transposed:
            return base.weight.shape[0], base.nf
        return base.in_features, base.out_features

    def __getattr__(self, name: str):
        return _getattr_or_fallback(self, name, "base_layer")  # in_features, stride, padding_idx, ...

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        n_in, n_out = self.in_out
        r = config.r
        kernel = tuple(self.base_layer.kernel_size) if self.kind.startswith("conv") else ()
        if config.group_size is not None:
            if self.kind != "linear" or self.transposed:
                raise ValueError(f"group_size (QA-LoRA) applies to linear layers only, not to a {type(self.base_layer).__name__}; "
                                 "exclude it with exclude_modules")
            from lorakit.quant.intn import check_group_size

            check_group_size(config.group_size, n_in, "this layer")
            n_in //= config.group_size  # A: (r, in/g)
        device = self.weight.device
        dtype = torch.float64 if is_dense(self.weight) and self.weight.dtype == torch.float64 else torch.float32
        a = torch.empty((r, n_in, *kernel), device=device, dtype=dtype)
        b = torch.zeros((n_out, r, *(1 for _ in kernel)), device=device, dtype=dtype)
        if self.kind == "embedding":  # PEFT's convention: A zero, B normal; the update starts at 0
            a.zero_()
            nn.init.normal_(b)
        elif config.init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        adapter = LoraAdapter(a, b, config.scaling, 0.0 if self.kind == "embedding" else config.dropout, config.group_size)
        if config.init == "pissa":
            self._init_pissa(adapter)
        if config.use_dora:  # m = ||W + ΔW||_c: the adapted layer starts as the base layer
            adapter.magnitude = nn.Parameter(self.weight_norm(adapter))
        self.lora[name] = adapter

    def _init_pissa(self, adapter: LoraAdapter) -> None:
        """PiSSA (Meng et al., 2024): W = U S Vᵀ; B = U_r √S_r / √s, A = √S_r V_rᵀ / √s, W ← W − s·B A."""
        if self.kind != "linear" or not is_dense(self.weight):
            raise ValueError(
                f"init='pissa' needs a dense linear layer, got a {self.kind} layer with a "
                f"{type(self.weight).__name__} weight: exclude it or use init='default'"
            )
        with torch.no_grad():
            w = self.weight.detach().float()
            w = w.T if self.transposed else w  # (out, in)
            u, s_vals, vh = torch.linalg.svd(w, full_matrices=False)
            r, s = adapter.r, adapter.scaling
            root = (s_vals[:r] / s).sqrt()
            adapter.B.copy_(u[:, :r] * root)  # (out, r)
            adapter.A.copy_(root[:, None] * vh[:r])  # (r, in)
            residual = w - s * (adapter.B.float() @ adapter.A.float())
            self.weight.copy_((residual.T if self.transposed else residual).to(self.weight.dtype))
            adapter.register_buffer("A0", adapter.A.detach().clone())
            adapter.register_buffer("B0", adapter.B.detach().clone())

    def delete_adapter(self, name: str) -> None:
        del self.lora[name]
        if self.active == name:
            self.active = None

    def rebase_(self, base: nn.Module) -> None:
        """Hold `base` (same shape, e.g. the dense form of a quantized layer) instead of the current base.

        The layer's bias stays authoritative (it may be trained with bias="lora_only").
        """
        if layer_kind(base) != self.kind or tuple(base.weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"cannot rebase a {self.kind} layer of shape {tuple(self.weight.shape)} onto {base}")
        self._parameters.pop("weight", None)
        self._modules.pop("weight", None)
        if isinstance(base.weight, nn.Parameter):
            self._parameters["weight"] = base.weight  # direct: __getattr__'s fallback would block setattr
        else:
            self._modules["weight"] = base.weight
        base.bias = self.bias
        object.__setattr__(self, "base_layer", base)

    def adapter(self) -> LoraAdapter | None:
        """The active adapter, or None (no adapter active here, or adapters disabled)."""
        if self.active is None or self.disabled:
            return None
        return self.lora[self.active]

    # -- math ---------------------------------------------------------------------------------
    def delta_weight(self, name: str | None = None, *, initial: bool = False) -> torch.Tensor:
        """The dense update ΔW = s · B A of adapter `name` (default: active), in W's layout, float32.

        `initial=True` gives the PiSSA initial update s · B0 A0 instead.
        """
        return self._delta(self.lora[name or self.active], initial)

    def _delta(self, adapter: LoraAdapter, initial: bool = False) -> torch.Tensor:
        a, b = (adapter.A0, adapter.B0) if initial else (adapter.A, adapter.B)
        r = adapter.r
        delta = adapter.scaling * (b.reshape(b.shape[0], r).float() @ a.reshape(r, -1).float())  # (out, in·k)
        if adapter.group_size is not None:  # QA-LoRA: ΔW = s·B·A·P, each pooled column spread over its group / g
            delta = delta.repeat_interleave(adapter.group_size, dim=1) / adapter.group_size  # (out, in)
        if self.kind == "embedding":
            return delta.T  # (num, dim)
        if self.kind.startswith("conv"):
            return delta.reshape(self.weight.shape)
        return delta.T if self.transposed else delta

    def weight_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """DoRA's n = ||W + ΔW||_c for `adapter`, without grad, in the adapter's dtype, shaped like its
        magnitude: (out,) linear and Conv1D, (dim,) embedding, (1, out, 1...) convNd."""
        with torch.no_grad():
            w = dense_weight(self.weight, adapter.A.dtype) + self._delta(adapter).to(adapter.A.dtype)  # W's layout
            if self.kind.startswith("conv"):  # (out, in, *k): one norm per filter
                return w.flatten(1).norm(dim=1).view(1, -1, *(1 for _ in w.shape[2:]))
            return w.norm(dim=0 if self.transposed or self.kind == "embedding" else 1)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.kind == "linear":
            if self.transposed:  # GPT-2 Conv1D: x (..., in) @ W (in, out)
                out = x.reshape(-1, x.shape[-1]) @ self.weight
                out = out + self.bias if self.bias is not None else out
                return out.reshape(*x.shape[:-1], out.shape[-1])
            return linear(x, self.weight, self.bias)  # dense, or dequantized on the fly
        if self.kind == "embedding":
            return F.embedding(x, self.weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return _conv(base, x, self.weight, self.bias)

    def adapter_forward(self, adapter: LoraAdapter, x: torch.Tensor, *, initial: bool = False) -> torch.Tensor:
        a, b = (adapter.A0, adapter.B0) if initial else (adapter.A, adapter.B)
        s = adapter.scaling
        if self.kind == "embedding":
            h = F.embedding(x, a.T, self.base_layer.padding_idx, None, 2.0, self.base_layer.scale_grad_by_freq, self.base_layer.sparse)
            return F.linear(h * s, b.to(h.dtype))  # (..., dim)
        dtype = x.dtype if x.is_floating_point() else a.dtype
        a, b = a.to(dtype), b.to(dtype)
        if self.kind == "linear":
            return F.linear(_lora_hidden(adapter, x, a), b)  # (..., r) -> (..., out)
        x = adapter.dropout(x)
        h = _conv(self.base_layer, x, a, None) * s  # (N, r, *spatial)
        return (F.conv1d if self.kind == "conv1d" else F.conv2d)(h, b)

    def dora_forward(self, adapter: LoraAdapter, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """DoRA's output from the base output `out` = W x + b (the module docstring's formula, PEFT's)."""
        scale = adapter.magnitude / self.weight_norm(adapter)  # m / n: the gradient reaches m, not n
        if self.kind == "embedding":
            return (out + self.adapter_forward(adapter, x)) * scale.to(out.dtype)
        conv = self.kind.startswith("conv")
        if isinstance(adapter.dropout, nn.Identity) or not self.training:
            xd, base = x, out  # W x = out − b
            if self.bias is not None:
                bias = self.bias.to(out.dtype)
                base = out - (bias.view(-1, *(1 for _ in range(out.dim() - 2))) if conv else bias)
        else:
            xd = adapter.dropout(x)
            base = (_conv(self.base_layer, xd, self.weight, None) if conv
                    else xd @ self.weight if self.transposed else linear(xd, self.weight))  # W drop(x)
        a, b = adapter.A.to(xd.dtype), adapter.B.to(xd.dtype)
        if conv:
            update = (F.conv1d if self.kind == "conv1d" else F.conv2d)(_conv(self.base_layer, xd, a, None) * adapter.scaling, b)
        else:
            update = F.linear(F.linear(xd, a) * adapter.scaling, b)  # (..., r) -> (..., out)
        return out + (scale - 1).to(out.dtype) * base + scale.to(out.dtype) * update

    def offset_forward(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """QA-LoRA over INT-N offsets deployed in `weight.offset_dtype` (fp16 in GGUF Q4_1 / Q5_1):
        the update the merged file will really hold, Δm = fp16(m + δ) − m (straight-through in δ), times
        each weight group's input sum:

            δ = s · (B A) / g_a  (out, in/g_a), spread over the weight's groups g_w  -> (out, in/g_w)
            y_update = Σ_G Δm[:, G] · Σ_{j∈G} drop(x)_j          (..., in) -> (..., out)

        Equal to s · B A pool(drop(x)) wherever fp16 holds m + δ exactly."""
        sums = group_sums(adapter.dropout(x), self.weight.group_size)  # (..., in/g_w)
        return F.linear(sums, self.moved_offset(adapter).to(sums.dtype))

    def moves_offsets(self, adapter: LoraAdapter) -> bool:
        """Whether `adapter` is QA-LoRA on offsets deployed in a coarser dtype (`weight.offset_dtype`: a GGUF
        Q4_1 / Q5_1 base), which trains through `moved_offset` rather than as a product added to the output."""
        return (self.kind == "linear" and adapter.group_size is not None
                and getattr(self.weight, "offset_dtype", None) is not None)

    def moved_offset(self, adapter: LoraAdapter) -> torch.Tensor:
        """Δm (out, in/g_w), float32: the offset change QA-LoRA's δ = s · (B A) / g_a makes in the deployed
        offsets (`IntNWeight.moved_offset`), differentiable in A and B (straight-through)."""
        weight = self.weight
        k = adapter.group_size // weight.group_size
        delta = (adapter.scaling * (adapter.B.float() @ adapter.A.float())) / adapter.group_size  # (out, in/g_a)
        if k > 1:
            delta = delta.repeat_interleave(k, dim=1)  # (out, in/g_w)
        return weight.moved_offset(delta)

    def merges_for_inference(self, adapter: LoraAdapter | None) -> bool:
        """Whether, inside `dequantize_once()` without grad, this layer computes with one held dense weight
        with `adapter` merged (`merged_weight`): a linear layer's LoRA or QA-LoRA adapter, no DoRA, no
        dropout at work, not disabled."""
        return (adapter is not None and self.kind == "linear" and not self.transposed and not self.disabled
                and adapter.magnitude is None
                and (isinstance(adapter.dropout, nn.Identity) or not adapter.dropout.training))

    @property
    def held_shape(self) -> tuple[int, int] | None:
        """(out, in) of the merged copy `dequantize_once` holds for this layer when its weight is dense (a
        quantized weight's own copy is counted with it, and this one replaces it); else None."""
        adapter = None if self.active is None else self.lora[self.active]
        if self.routes is None and self.merges_for_inference(adapter) and is_dense(self.weight):
            return tuple(self.weight.shape)
        return None

    def merged_weight(self, adapter: LoraAdapter, dtype: torch.dtype) -> torch.Tensor:
        """W + ΔW (out, in) in `dtype`, what the layer computes with `adapter` active; QA-LoRA on deployed offsets:
        the weight over its moved grid, the very Ŵ' that training and the merged file use."""
        if self.moves_offsets(adapter):
            return self.weight.dequantize(dtype, self.moved_offset(adapter))
        # not dense_weight: inside dequantize_once that would keep the base's dense copy as well as this one
        base = self.weight.float() if is_dense(self.weight) else self.weight.dequantize(torch.float32)
        return (base + self._delta(adapter)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routes is not None:
            return self.routes.layer_forward(self, x)
        adapter = None if self.active is None else self.lora[self.active]
        if self.merges_for_inference(adapter):
            w = held(self, (self.active, x.dtype), lambda: self.merged_weight(adapter, x.dtype))
            if w is not None:  # evaluation / generation inside dequantize_once(): one GEMM
                return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if (adapter is not None and self.kind == "linear" and not self.transposed and not self.disabled
                and adapter.magnitude is None and not self.moves_offsets(adapter)):
            # out += (s · A drop(x)) Bᵀ as one GEMM into the base output: no (..., out) temporary and no separate
            # add pass. On 2-D rows, so the in-place GEMM writes a fresh tensor, not a view of one (autograd
            # would otherwise rebuild the whole output gradient through as_strided: a fill and a copy per
            # layer). Safe in place: a frozen-weight linear saves x, not its output.
            rows = x.reshape(-1, x.shape[-1])  # (N, in)
            out = self.base_forward(rows)  # (N, out)
            if out.dtype == x.dtype:
                h = _lora_hidden(adapter, rows, adapter.A.to(x.dtype))  # (N, r)
                out = out.addmm_(h, adapter.B.to(x.dtype).t())
            else:
                out = out + self.adapter_forward(adapter, rows)
            return out.view(*x.shape[:-1], out.shape[-1])
        if (adapter is not None and not self.transposed and not self.disabled and adapter.magnitude is None
                and self.moves_offsets(adapter)
                and (isinstance(adapter.dropout, nn.Identity) or not adapter.dropout.training)):
            # QA-LoRA on deployed offsets: the base with its offsets moved, in one GEMM (offset_linear), which
            # is what the merged file computes; offset_forward (the update alone) equals it in exact arithmetic.
            return offset_linear(x, self.weight, self.bias, self.moved_offset(adapter))
        out = self.base_forward(x)
        if adapter is None:
            return out
        if self.disabled:
            # PiSSA moved s·B0A0 out of W: add it back so "disabled" means the original model.
            return out + self.adapter_forward(adapter, x, initial=True) if adapter.is_pissa else out
        if adapter.magnitude is not None:
            return self.dora_forward(adapter, x, out)
        if self.moves_offsets(adapter):  # with dropout while training: the update through the dropped-out sums
            return out + self.offset_forward(adapter, x)
        return out + self.adapter_forward(adapter, x)

    def extra_repr(self) -> str:
        n_in, n_out = self.in_out
        weight = "dense" if is_dense(self.weight) else type(self.weight).__name__
        return f"kind={self.kind}, in={n_in}, out={n_out}, weight={weight}, active={self.active!r}"


class SavedModule(nn.Module):
    """A module trained in full, one copy per adapter (PEFT's `modules_to_save`).

    The original module's parameters, buffers and children are registered under their own names,
    so its state-dict keys do not change; each adapter's trainable copy lives in `copies[name]`.
    A copy may start from another module than the original (a task's new head: a 10-class linear
    layer where the base has ImageNet's 1000), so adapters with different class sets share one base.
    """

    is_saved_module = True

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for key, param in original._parameters.items():
            self.register_parameter(key, param)
        for key, buf in original._buffers.items():
            self.register_buffer(key, buf, persistent=key not in original._non_persistent_buffers_set)
        for key, child in original._modules.items():
            self.add_module(key, child)
        object.__setattr__(self, "original", original)  # after registering: __getattr__ falls back to it
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.routes = None  # lorakit.adapters.mixed.Routes during a mixed-adapter forward

    def add_adapter(self, name: str, start: nn.Module | None = None) -> None:
        """Give adapter `name` its trainable copy: a copy of the original, or `start` (e.g. a new classifier
        head for another class set, whose shape may differ from the original's)."""
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.copies[name] = copy.deepcopy(self.original) if start is None else start

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        if self.active is None or self.disabled:
            return self.original
        return self.copies[self.active]

    def __getattr__(self, name: str):
        return _getattr_or_fallback(self, name, "original")

    def forward(self, *args, **kwargs):
        if self.routes is not None:
            return self.routes.saved_forward(self, *args, **kwargs)
        return self.current()(*args, **kwargs)


def head_like(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """A new module like `module` (an `nn.Linear` or `nn.Conv2d` head) but with as many outputs as `state`'s
    weight has, when that is the only difference; None otherwise (same shape, or not a head that can be
    re-made). Loading an adapter whose head serves another class set than the base's makes its copy with it."""
    weight = state.get("weight")
    if weight is None or type(module) not in (nn.Linear, nn.Conv2d) or weight.shape == module.weight.shape:
        return None
    if weight.ndim != module.weight.ndim or weight.shape[1:] != module.weight.shape[1:]:
        return None
    kw = {"bias": "bias" in state, "dtype": module.weight.dtype, "device": module.weight.device}
    if type(module) is nn.Linear:
        return nn.Linear(module.in_features, weight.shape[0], **kw)
    return nn.Conv2d(module.in_channels, weight.shape[0], module.kernel_size, module.stride, module.padding,
                     module.dilation, module.groups, padding_mode=module.padding_mode, **kw)


def _conv(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The base conv's computation with another weight and bias: `_conv_forward` for torch's own conv
    classes; a subclass with its own forward (padding in forward) runs that forward with them swapped in."""
    if type(base).forward in (nn.Conv1d.forward, nn.Conv2d.forward):
        return base._conv_forward(x, weight, bias)
    return torch.func.functional_call(base, {"weight": weight, "bias": bias}, (x,))


def _lora_hidden(adapter: LoraAdapter, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A linear adapter's rank-r state h = s · A pool(drop(x)): (..., in) -> (..., r)."""
    return F.linear(adapter.pool(adapter.dropout(x)), a) * adapter.scaling


def _getattr_or_fallback(module: nn.Module, name: str, fallback: str):
    """nn.Module's attribute lookup, then the wrapped module's (unregistered, in __dict__[fallback])."""
    try:
        return nn.Module.__getattr__(module, name)
    except AttributeError:
        wrapped = module.__dict__.get(fallback)
        if wrapped is None:
            raise
        return getattr(wrapped, name)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, SavedModule))
