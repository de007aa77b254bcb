"""QLoRA's frozen base: block-wise 4-bit weights (NF4, FP4, INT4), the layer that trains through them,
in-place quantization of a model, and streaming a Hugging Face checkpoint straight into 4 bits."""

from lorakit.quant.api import (
    IntNConfig,
    LayerQuantization,
    MemoryReport,
    NF4Config,
    QuantizationReport,
    dequantize_,
    memory_report,
    quantize_,
)
from lorakit.quant.blockwise import BlockwiseWeight, FP4Weight, Int4Weight, NF4Weight
from lorakit.quant.intn import IntNWeight
from lorakit.quant.linear import QuantizedLinear, linear
from lorakit.quant.stream import load_quantized

__all__ = [
    "IntNConfig", "IntNWeight",
    "BlockwiseWeight", "FP4Weight", "Int4Weight", "LayerQuantization", "MemoryReport", "NF4Config", "NF4Weight",
    "QuantizationReport", "QuantizedLinear", "dequantize_", "linear", "load_quantized", "memory_report", "quantize_",
]
