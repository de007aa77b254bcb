"""Quantize a model's frozen linear weights in place, undo it, and measure what it costs.

- `quantize_(model, NF4Config(...), filter_fn)` swaps every selected ``nn.Linear`` for a frozen
  `QuantizedLinear` and returns a `QuantizationReport`: per layer and in total, the weight bytes
  before and after, bits per parameter, and the error it made, max |Ŵ - W| and ‖Ŵ - W‖_F / ‖W‖_F.
  Quantizing a merged dense model is how QLoRA re-quantizes: explicitly, with that report.
- `dequantize_(model)` turns every quantized weight back into a dense frozen weight (the first
  step of the QLoRA dequantize-and-merge); nothing is re-quantized.
- `memory_report(model)`: bytes and bits per parameter of the base, and the trainable bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lorakit.adapters.config import check_keys
from lorakit.quant.blockwise import WEIGHT_TYPES, check_block_size
from lorakit.quant.intn import check_bits, check_group_size
from lorakit.quant.linear import QuantizedLinear, is_quantized_weight
from lorakit.adapters.walk import Patterns, find_targets, replace_module


@dataclass
class NF4Config:
    """How the frozen base is stored (QLoRA defaults: NF4, block 64, 8-bit double quantization in blocks of 256).

    `quant_type` is "nf4", "fp4" or "int4" (symmetric). `target_modules` / `exclude_modules` follow
    PEFT's rules (see `lorakit.adapters.walk`); "all-linear" is every linear layer but the output head.
    """

    block_size: int = 64
    double_quant: bool = True
    double_quant_block_size: int = 256
    quant_type: str = "nf4"
    target_modules: Patterns = "all-linear"
    exclude_modules: Patterns = None

    def __post_init__(self):
        check_block_size("block_size", self.block_size)
        check_block_size("double_quant_block_size", self.double_quant_block_size)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")
        if self.quant_type not in WEIGHT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; choose one of {sorted(WEIGHT_TYPES)}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)
                    or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
                raise ValueError(
                    f"{name}={value!r} must be a regex string, a list of module names, or None "
                    "(e.g. 'all-linear' or ['q_proj', 'v_proj'])"
                )

    def describe(self) -> str:
        dq = f", absmax in 8 bits per {self.double_quant_block_size}" if self.double_quant else ""
        return f"{self.quant_type}, block {self.block_size}{dq}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NF4Config:
        check_keys(data, cls, "NF4Config")
        return cls(**data)


@dataclass
class IntNConfig:
    """A group-wise asymmetric INT-N base (QA-LoRA's; see `lorakit.quant.intn`).

    `bits` in {2, 3, 4, 5, 8}; `group_size` consecutive input columns share a float scale and
    offset (32 matches llama.cpp's Q4_1 / Q5_1 blocks). `method` "rtn" is round-to-nearest min-max;
    "gptq" (Frantar et al., 2022; `lorakit.quant.gptq`) compensates each column's rounding error on
    the columns not yet quantized, using calibration activations passed to `quantize_`, with
    static groups under `act_order` (columns by descending Hessian diagonal). `scale_dtype`
    "float16" keeps scales and offsets on fp16 values, as llama.cpp's Q4_1 / Q5_1 store them: the
    GGUF export is then exact, and QA-LoRA trains against the fp16 offsets it will be merged into.
    """

    bits: int = 4
    group_size: int = 32
    method: str = "rtn"
    act_order: bool = True
    scale_dtype: str = "float32"
    target_modules: Patterns = "all-linear"
    exclude_modules: Patterns = None

    def __post_init__(self):
        check_bits(self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer (32, 64 or 128)")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method={self.method!r} must be 'rtn' (round to nearest) or 'gptq' (needs calibration data)")
        if self.scale_dtype not in ("float32", "float16"):
            raise ValueError(f"scale_dtype={self.scale_dtype!r} must be 'float32' or 'float16' (llama.cpp's Q4_1 / Q5_1)")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order={self.act_order!r} must be True or False (GPTQ only)")

    def describe(self) -> str:
        how = "GPTQ" + (", act-order" if self.act_order else "") if self.method == "gptq" else "round to nearest"
        fp16 = ", fp16 scales" if self.scale_dtype == "float16" else ""
        return f"INT{self.bits}, group {self.group_size}, {how}{fp16}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IntNConfig:
        check_keys(data, cls, "IntNConfig")
        return cls(**data)


@dataclass
class LayerQuantization:
    """One layer's quantization: sizes and the error it made (errors over the float32 values)."""

    name: str
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int
    max_abs_error: float
    error_norm: float    # ‖Ŵ - W‖_F
    weight_norm: float   # ‖W‖_F

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / math.prod(self.shape)

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.weight_norm if self.weight_norm else 0.0


@dataclass
class QuantizationReport:
    """What `quantize_` did: one `LayerQuantization` per swapped layer, and totals."""

    config: NF4Config
    layers: list[LayerQuantization] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / sum(math.prod(layer.shape) for layer in self.layers)

    @property
    def max_abs_error(self) -> float:
        return max(layer.max_abs_error for layer in self.layers)

    @property
    def relative_error(self) -> float:
        """‖Ŵ - W‖_F / ‖W‖_F over all swapped weights together."""
        weight = math.sqrt(sum(layer.weight_norm**2 for layer in self.layers))
        return math.sqrt(sum(layer.error_norm**2 for layer in self.layers)) / weight if weight else 0.0

    def __str__(self) -> str:
        rows = [f"quantize_: {len(self.layers)} linear weights -> {self.config.describe()}",
                f"{'layer':<40} {'shape':>11} {'before':>10} {'after':>10} {'bits':>6} {'max|err|':>9} {'rel.err':>8}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            rows.append(f"{layer.name:<40} {shape:>11} {_size(layer.bytes_before):>10} {_size(layer.bytes_after):>10} "
                        f"{layer.bits_per_param:>6.3f} {layer.max_abs_error:>9.2e} {layer.relative_error:>8.4f}")
        rows.append(f"{'total':<40} {'':>11} {_size(self.bytes_before):>10} {_size(self.bytes_after):>10} "
                    f"{self.bits_per_param:>6.3f} {self.max_abs_error:>9.2e} {self.relative_error:>8.4f}")
        return "\n".join(rows)


def quantize_(model: nn.Module, config: NF4Config | IntNConfig | None = None, filter_fn=None,
              calibration=None) -> QuantizationReport:
    """Swap each selected ``nn.Linear`` for a frozen `QuantizedLinear`, in place; report sizes and errors.

    `filter_fn(name, module) -> bool` narrows the selection of `config.target_modules`.
    `calibration`: input_ids batches (B, T) for `IntNConfig(method="gptq")`.
    """
    config = config or NF4Config()
    names = find_targets(model, config.target_modules, config.exclude_modules, accept=filter_fn)
    check_linear_targets(model, names)
    if isinstance(config, IntNConfig):  # every layer checked before any is swapped: no half-quantized model
        for name in names:
            check_group_size(config.group_size, model.get_submodule(name).in_features, name)
    report = QuantizationReport(config)
    if getattr(config, "method", "rtn") == "gptq":
        return _quantize_gptq(model, config, names, calibration, report)
    if calibration is not None:
        raise ValueError("calibration data is only used by IntNConfig(method='gptq'); drop it or switch the method")
    for name in names:
        dense = model.get_submodule(name)
        quantized = QuantizedLinear.from_linear(dense, config)
        replace_module(model, name, quantized)
        report.layers.append(_measure(name, dense.weight.detach(), quantized.weight))
    return report


def _quantize_gptq(model: nn.Module, config: IntNConfig, names: list[str], calibration, report) -> QuantizationReport:
    """GPTQ the selected layers, then hold them as IntNWeight. Keeps a copy of the original weights
    only to report the error GPTQ made."""
    from lorakit.quant.gptq import quantize_gptq_
    from lorakit.quant.intn import IntNWeight

    if calibration is None:
        raise ValueError("IntNConfig(method='gptq') needs calibration=[input_ids batches (B, T)], "
                         "e.g. 16 sequences of 256 tokens of text like the data you will run")
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    scale_dtype = getattr(torch, config.scale_dtype)
    codes = quantize_gptq_(model, calibration, config.bits, config.group_size, target_modules=names,
                           act_order=config.act_order, scale_dtype=scale_dtype)
    for name in names:
        dense = model.get_submodule(name)
        c = codes[name]
        weight = IntNWeight.from_codes(c.codes, c.scale, c.offset, config.bits, dense.weight.dtype,
                                       None if scale_dtype == torch.float32 else scale_dtype)
        replace_module(model, name, QuantizedLinear(weight, dense.bias))
        report.layers.append(_measure(name, originals.pop(name), weight))
    return report


def check_linear_targets(model: nn.Module, names: list[str]) -> None:
    """A clear error if a selected module is not a plain ``nn.Linear`` (the only kind `quantize_` swaps)."""
    others = {n: type(m).__name__ for n in names if not isinstance(m := model.get_submodule(n), nn.Linear)}
    if others:
        raise TypeError(
            f"only nn.Linear layers can be quantized, but the selection includes {others}. An already quantized "
            "layer needs dequantize_ first; GPT-2 style Conv1D is not supported. Narrow the selection with "
            "exclude_modules or filter_fn."
        )


def _measure(name: str, w: torch.Tensor, quantized: nn.Module) -> LayerQuantization:
    w32 = w.float()
    err = quantized.dequantize(torch.float32) - w32
    return LayerQuantization(
        name=name, shape=tuple(w.shape), bytes_before=w.numel() * w.element_size(), bytes_after=quantized.nbytes,
        max_abs_error=err.abs().max().item(),
        error_norm=torch.linalg.vector_norm(err).item(), weight_norm=torch.linalg.vector_norm(w32).item(),
    )


def dequantize_(model: nn.Module) -> list[str]:
    """Make every quantized weight dense again (frozen, in its original dtype); return the modules changed.

    A `QuantizedLinear` becomes an ``nn.Linear``; a layer that holds a quantized weight by reference
    (an adapter layer) gets a dense ``weight`` Parameter. State-dict keys become ``<name>.weight``.
    """
    changed = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            replace_module(model, name, module.to_dense())
        elif getattr(module, "is_lora_layer", False) and isinstance(module.base_layer, QuantizedLinear):
            module.rebase_(module.base_layer.to_dense())  # the adapter layer and its base both become dense
        elif is_quantized_weight(weight := module._modules.get("weight")):
            # Not setattr: a layer whose __getattr__ falls back to its base layer would refuse a new `weight`.
            del module._modules["weight"]
            module._parameters["weight"] = nn.Parameter(weight.dequantize(weight.dtype), requires_grad=False)
        else:
            continue
        changed.append(name)
    return changed


@dataclass
class MemoryReport:
    """Where a model's weight bytes go. Base = quantized weights + frozen parameters; trainable = requires_grad."""

    quantized_params: int
    quantized_bytes: int
    frozen_params: int
    frozen_bytes: int
    trainable_params: int
    trainable_bytes: int

    @property
    def base_params(self) -> int:
        return self.quantized_params + self.frozen_params

    @property
    def base_bytes(self) -> int:
        return self.quantized_bytes + self.frozen_bytes

    @property
    def bits_per_param_quantized(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else math.nan

    @property
    def bits_per_param_base(self) -> float:
        return 8 * self.base_bytes / self.base_params if self.base_params else math.nan

    def __str__(self) -> str:
        return "\n".join([
            f"quantized weights: {self.quantized_params:>12,} params {_size(self.quantized_bytes):>10} "
            f"({self.bits_per_param_quantized:.3f} bits/param)",
            f"frozen dense:      {self.frozen_params:>12,} params {_size(self.frozen_bytes):>10}",
            f"base total:        {self.base_params:>12,} params {_size(self.base_bytes):>10} "
            f"({self.bits_per_param_base:.3f} bits/param)",
            f"trainable:         {self.trainable_params:>12,} params {_size(self.trainable_bytes):>10}",
        ])


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes of the base weights (quantized and frozen dense) and of the trainable parameters (tied counted once)."""
    quantized = [m for m in model.modules() if is_quantized_weight(m)]
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    return MemoryReport(
        quantized_params=sum(math.prod(m.shape) for m in quantized),
        quantized_bytes=sum(m.nbytes for m in quantized),
        frozen_params=sum(p.numel() for p in frozen), frozen_bytes=sum(p.numel() * p.element_size() for p in frozen),
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
    )


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
