"""Models lorakit ships with or knows how to fetch from local files."""

from lorakit.models.darknet import Darknet, load_darknet, load_yolov3_tiny, replace_head_, yolov3_tiny_files

from lorakit.models.default import (
    DEFAULT_MODEL,
    cache_root,
    default_gguf_path,
    default_model_dir,
    load_causal_lm,
)

__all__ = [
    "DEFAULT_MODEL", "cache_root", "default_gguf_path", "default_model_dir", "load_causal_lm",
    "Darknet", "load_darknet", "load_yolov3_tiny", "replace_head_", "yolov3_tiny_files",
]
