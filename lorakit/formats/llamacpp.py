"""Run exported GGUF files in llama.cpp (through llama-cpp-python) and compare with lorakit's model.

Optional: needs ``pip install llama-cpp-python`` (builds llama.cpp, ~10 minutes on 2 cores). The tests
and benchmarks use it to check the export contracts; `lorakit generate` uses it, when it is installed, to
answer with a GGUF file (`generate_ids`): llama.cpp decodes a 4-bit model several times faster than
PyTorch can on a CPU (`benchmarks/bench_generate.py`). Nothing else in lorakit imports it.

    logits = llama_logits("ft.gguf", sequences)                  # list of float32 (T, vocab)
    logits = llama_logits("base.gguf", sequences, lora="a.gguf")  # base + llama.cpp LoRA adapter
    nll, n = label_nll(logits, label_rows)                         # summed next-token NLL, token count
    agree = top1_agreement(logits, lorakit_logits)

llama.cpp computes Q4_1 / Q5_1 matmuls against activations quantized to 8 bits per 32 (Q8_1), so its
logits differ from a float32 forward over the same weights by a little even for identical weights.

On a CPU that reports AMX (`amx_tile` in its flags) every model is opened with llama.cpp's extra buffer types
off (`use_extra_bufts = false`: its weights repacked for AMX tiles): llama-cpp-python 0.3.36 built here
(AVX512-BF16 + AMX Xeon, 2 vCPUs, the OS enabling AMX: PyTorch's oneDNN runs AMX in the same process) dies
with SIGILL at `tileloadd` in `ggml_backend_amx_mul_mat` as soon as it evaluates 8 or more tokens at once
(a prompt, perplexity), which no Python code can catch; llama.cpp reports the same class of crash
(ggml-org/llama.cpp#28756, #28328). Without them the same file, the same Q4_1 kernels (AVX-512) answer
correctly. `LORAKIT_LLAMA_CPP_AMX=1` keeps llama.cpp's AMX buffers, where they work.
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


def amx_buffers_off() -> bool:
    """Whether lorakit opens llama.cpp models with its extra (AMX) buffer types off: the CPU reports AMX and
    `LORAKIT_LLAMA_CPP_AMX` is not 1 (the module docstring)."""
    from lorakit.training.hardware import cpu_flags

    return os.environ.get("LORAKIT_LLAMA_CPP_AMX", "") != "1" and "amx_tile" in (cpu_flags() or set())


def open_model(llama_cpp, **kwargs):
    """`llama_cpp.Llama(**kwargs)`, with llama.cpp's extra buffer types off where `amx_buffers_off()`.
    llama-cpp-python's constructor takes no such argument: it builds the model parameters from
    `llama_model_default_params()`, which is wrapped for the constructor's duration."""
    if not amx_buffers_off():
        return llama_cpp.Llama(**kwargs)
    low = llama_cpp.llama_cpp  # the ctypes bindings, where Llama looks the default parameters up
    defaults = low.llama_model_default_params
    if not hasattr(defaults(), "use_extra_bufts"):  # a llama-cpp-python without the field: nothing to turn off
        return llama_cpp.Llama(**kwargs)

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        low.llama_model_default_params = defaults


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class Generator:
    """Greedy decoding of token ids with llama.cpp on one GGUF file (one context, reused across prompts).

    The caller tokenizes (lorakit's tokenizer of the same file, its chat template), so both engines see the
    same prompt ids; llama.cpp multiplies 4-bit blocks by 8-bit activations, so its tokens may part from
    PyTorch's float32 ones after a few dozen tokens (`benchmarks/bench_generate.py` counts them)."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int | None = None):
        llama_cpp = _llama_cpp()
        threads = n_threads or os.cpu_count()
        self.n_ctx = n_ctx
        self.llm = open_model(llama_cpp, model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, verbose=False)

    def generate_ids(self, prompt: Sequence[int], max_new_tokens: int, stop: Sequence[int] = ()) -> list[int]:
        """Up to `max_new_tokens` greedy tokens after `prompt`, ending early at a token of `stop` (not returned)."""
        if len(prompt) + max_new_tokens > self.n_ctx:
            raise ValueError(f"{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} exceed the llama.cpp "
                             f"context of {self.n_ctx}; lower max_new_tokens or shorten the prompt")
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        stop = set(stop) | {self.llm.token_eos()}
        for token in self.llm.generate(list(map(int, prompt)), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            if token in stop:
                break
            out.append(int(token))
            if len(out) == max_new_tokens:
                break
        return out

    def close(self) -> None:
        self.llm.close()


def llama_logits(path: str | os.PathLike, sequences: Sequence[Sequence[int]], *, lora: str | os.PathLike | None = None,
                 n_threads: int | None = None) -> list[np.ndarray]:
    """Next-token logits float32 (T, vocab) of every position of each token sequence, one llama.cpp context."""
    llama_cpp = _llama_cpp()
    n_ctx = max(len(s) for s in sequences) + 8
    llm = open_model(llama_cpp, model_path=str(path), lora_path=None if lora is None else str(lora),
                     logits_all=True, n_ctx=max(n_ctx, 64), n_batch=max(n_ctx, 64),
                     n_threads=n_threads or os.cpu_count(), verbose=False)
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
