"""Run exported GGUF files in llama.cpp (through llama-cpp-python) and compare with lorakit's model.

Optional: needs ``pip install llama-cpp-python`` (builds llama.cpp, ~10 minutes on 2 cores). The tests
and benchmarks use it to check the export contracts; lorakit itself never imports it.

    logits = llama_logits("ft.gguf", sequences)                  # list of float32 (T, vocab)
    logits = llama_logits("base.gguf", sequences, lora="a.gguf")  # base + llama.cpp LoRA adapter
    nll, n = label_nll(logits, label_rows)                         # summed next-token NLL, token count
    agree = top1_agreement(logits, lorakit_logits)

llama.cpp computes Q4_1 / Q5_1 matmuls against activations quantized to 8 bits per 32 (Q8_1), so its
logits differ from a float32 forward over the same weights by a little even for identical weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

IGNORE = -100


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python "
                          "(it compiles llama.cpp, ~10 minutes)") from e
    return llama_cpp


def llama_logits(path: str | os.PathLike, sequences: Sequence[Sequence[int]], *, lora: str | os.PathLike | None = None,
                 n_threads: int | None = None) -> list[np.ndarray]:
    """Next-token logits float32 (T, vocab) of every position of each token sequence, one llama.cpp context."""
    llama_cpp = _llama_cpp()
    n_ctx = max(len(s) for s in sequences) + 8
    llm = llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), logits_all=True,
                          n_ctx=max(n_ctx, 64), n_batch=max(n_ctx, 64), n_threads=n_threads or os.cpu_count(),
                          verbose=False)
    out = []
    try:
        for seq in sequences:
            llm.reset()
            llm.eval(list(map(int, seq)))
            out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    finally:
        llm.close()
    return out


def label_nll(logits: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> tuple[float, int]:
    """Σ −log p(labels[t + 1] | tokens ≤ t) over positions whose next label is not −100, and their count."""
    total, count = 0.0, 0
    for z, y in zip(logits, labels):
        y = np.asarray(y)
        z = z.astype(np.float64)[:-1]
        target = y[1:]
        keep = target != IGNORE
        if not keep.any():
            continue
        z, target = z[keep], target[keep]
        log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        total += float((log_z - z[np.arange(len(target)), target]).sum())
        count += int(keep.sum())
    return total, count


def top1_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Fraction of positions whose argmax token is the same in a and b."""
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)
