"""lorakit: LoRA, QLoRA and QA-LoRA fine-tuning for PyTorch models, on the hardware you have."""

from lorakit.training.recompute import disable_gradient_checkpointing, enable_gradient_checkpointing
from lorakit.adapters.config import LoraConfig
from lorakit.formats.hf import export_hf
from lorakit.training.hardware import cast_base_, cpu_has_fast_bf16, default_compute_dtype, default_device, resolve_compute_dtype
from lorakit.adapters.inject import (
    ParameterReport,
    active_adapter,
    adapter_names,
    delete_adapter,
    disable_adapters,
    inject_adapters,
    parameter_report,
    set_active,
)
from lorakit.adapters.layers import LoraLayer, SavedModule
from lorakit.adapters.mixed import mixed_adapters
from lorakit.kernels import fuse_for_training_, unfuse_
from lorakit.tasks.losses import causal_lm_loss, chunked_cross_entropy
from lorakit.training.memory import PeakMemory, current_rss_bytes, peak_rss_bytes, reset_peak_rss
from lorakit.adapters.merge import dequantize_and_merge_, merge_, unmerge_
from lorakit.formats.peft import load_adapter, save_adapter
from lorakit.quant import (
    IntNConfig,
    IntNWeight,
    FP4Weight,
    Int4Weight,
    MemoryReport,
    NF4Config,
    NF4Weight,
    QuantizationReport,
    QuantizedLinear,
    dequantize_,
    load_quantized,
    memory_report,
    quantize_,
)

__version__ = "0.1.0"

_LAZY = {  # need optional packages (gguf: the [hf] extra): imported on first use, so `import lorakit` stays light
    "load_gguf": "lorakit.formats.gguf_load",
    "export_gguf": "lorakit.formats.gguf_export",
    "export_gguf_adapter": "lorakit.formats.gguf_export",
    "export_onnx": "lorakit.formats.onnx",  # onnx, onnxscript, onnxruntime: the [onnx] extra
    "check_onnx": "lorakit.formats.onnx",
    "quantize_int8": "lorakit.formats.onnx",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

__all__ = [
    "PeakMemory", "cast_base_", "export_hf", "causal_lm_loss", "chunked_cross_entropy", "cpu_has_fast_bf16", "current_rss_bytes",
    "default_compute_dtype", "default_device", "disable_gradient_checkpointing", "enable_gradient_checkpointing",
    "peak_rss_bytes", "reset_peak_rss", "resolve_compute_dtype", "fuse_for_training_", "unfuse_",
    "FP4Weight", "Int4Weight", "IntNConfig", "IntNWeight", "MemoryReport", "NF4Config", "NF4Weight", "QuantizationReport", "QuantizedLinear",
    "dequantize_", "dequantize_and_merge_", "load_quantized", "memory_report", "quantize_",
    "LoraConfig", "LoraLayer", "ParameterReport", "SavedModule", "active_adapter", "adapter_names",
    "delete_adapter", "disable_adapters", "inject_adapters", "load_adapter", "merge_", "mixed_adapters", "parameter_report",
    "save_adapter", "set_active", "unmerge_", "load_gguf", "export_gguf", "export_gguf_adapter",
    "export_onnx", "check_onnx", "quantize_int8",
]
