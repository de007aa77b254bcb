"""lorakit: LoRA, QLoRA and QA-LoRA fine-tuning for PyTorch models, on the hardware you have."""

from lorakit.config import LoraConfig
from lorakit.inject import (
    ParameterReport,
    active_adapter,
    adapter_names,
    delete_adapter,
    disable_adapters,
    inject_adapters,
    parameter_report,
    set_active,
)
from lorakit.layers import LoraLayer, SavedModule
from lorakit.merge import merge_, unmerge_
from lorakit.peft_format import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "ParameterReport", "SavedModule", "active_adapter", "adapter_names",
    "delete_adapter", "disable_adapters", "inject_adapters", "load_adapter", "merge_", "parameter_report",
    "save_adapter", "set_active", "unmerge_",
]
