"""Tasks: what a model learns (examples, batches, loss, metrics); the loop in `lorakit.training.loop`
runs any of them through the `Task` interface (`lorakit.tasks.base`).

    causal-lm              CausalLM (text, instruction, chat rows)     lorakit.tasks.causal_lm
"""

from __future__ import annotations


def make_task(config, **given):
    """The `Task` of `config.task`; `given` are objects the caller already holds (a causal LM's tokenizer)."""
    from lorakit.tasks.causal_lm import CausalLM

    return CausalLM(config, tokenizer=given.get("tokenizer"))
