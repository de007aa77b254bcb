"""Models lorakit ships with or knows how to load from local files: the embedded SmolLM2 GGUF
(`default`), ImageNet classifiers (`classifiers`), Darknet YOLO detectors (`darknet`)."""

from lorakit.models.classifiers import (
    CLASSIFIERS,
    Classifier,
    conv_names,
    imagenet_classes,
    load_classifier,
    replace_classifier_,
)
from lorakit.models.darknet import Darknet, load_darknet, load_yolov3_tiny, new_heads, replace_head_, yolov3_tiny_files
from lorakit.models.default import (
    DEFAULT_MODEL,
    cache_root,
    default_gguf_path,
    default_model_dir,
    load_causal_lm,
)

__all__ = [
    "CLASSIFIERS", "Classifier", "DEFAULT_MODEL", "cache_root", "conv_names", "default_gguf_path", "default_model_dir",
    "imagenet_classes", "load_causal_lm", "load_classifier", "replace_classifier_",
    "Darknet", "load_darknet", "load_yolov3_tiny", "new_heads", "replace_head_", "yolov3_tiny_files",
]
