"""A tiny Llama with the embedded model's real tokenizer and chat template, and a small instruction file:
what the trainer and CLI tests run on (a training step takes milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_tiny_model_dir(directory: Path) -> Path:
    import transformers

    from lorakit.models.default import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_instruction_file(path: Path, n: int = 48) -> Path:
    from lorakit.data.stdlib_docs import TRAIN_MODULES, docstring_pairs

    pairs = docstring_pairs(TRAIN_MODULES)[:n]
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in pairs))
    return path


def tiny_run_overrides(model_dir: Path, data: Path, out: Path, method: str = "lora", steps: int = 6) -> list[str]:
    return [f"model.path={model_dir}", "model.dtype=float32", f"data.train={data}", "data.valid_fraction=0.25",
            "data.max_tokens=64", f"method={method}", f"output_dir={out}", f"train.steps={steps}",
            "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=1", "train.eval_every=3", "train.save_every=2",
            "adapter.r=4", "adapter.alpha=8"]


def tiny_assets(tmp_path_factory, name: str = "assets") -> tuple[Path, Path]:
    """(tiny model directory, instruction file) in a fresh temporary directory; skips the test when the
    embedded model (whose tokenizer the tiny model uses) is not installed."""
    import pytest

    try:
        from lorakit.models.default import default_model_dir

        default_model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp(name)
    return make_tiny_model_dir(d / "model"), make_instruction_file(d / "train.jsonl")
