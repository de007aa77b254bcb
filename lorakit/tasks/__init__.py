"""Tasks: what a model learns (examples, batches, loss, metrics); the loop in `lorakit.training.loop`
runs any of them through the `Task` interface (`lorakit.tasks.base`).

    config.task            Task                                        module
    causal-lm              CausalLM (text, instruction, chat rows)     lorakit.tasks.causal_lm
    image-classification   ImageClassification                         lorakit.tasks.image_classification
    object-detection       ObjectDetection (YOLO)                      lorakit.tasks.detection
"""

from __future__ import annotations


def make_task(config, **given):
    """The `Task` of `config.task`; `given` are objects the caller already holds (a causal LM's tokenizer)."""
    if config.task == "image-classification":
        from lorakit.tasks.image_classification import ImageClassification

        return ImageClassification(config)
    if config.task == "object-detection":
        from lorakit.tasks.detection import ObjectDetection

        return ObjectDetection(config)
    from lorakit.tasks.causal_lm import CausalLM

    return CausalLM(config, tokenizer=given.get("tokenizer"))
