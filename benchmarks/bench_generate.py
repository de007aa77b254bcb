"""Greedy generation on the embedded Q4_1 GGUF (its own 4-bit codes, as a QA-LoRA run's base), side by side in
one process, same prompt (the chat template) and the same number of new tokens:

    on the fly          every weight dequantized for every token (the training path's dequantization)
    dequantize_once     one dense copy per weight for the whole generation (`lorakit generate`, `lorakit eval`
                        and the training loop's validation, when the copy fits in memory)
    llama.cpp           llama-cpp-python on the same .gguf file, same threads (skipped when not installed:
                        `pip install llama-cpp-python`, a 3-10 minute build)

Decode speed excludes the prompt: (tokens - 1) / (time for `tokens` new tokens - time for 1), best of
--repeats. Also prints how many of the greedy tokens lorakit and llama.cpp agree on before the first
difference (llama.cpp multiplies Q4_1 blocks by 8-bit-quantized activations, lorakit in float32).

    python benchmarks/bench_generate.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lorakit
from lorakit.demo import chat_ids
from lorakit.models.default import default_gguf_path
from lorakit.quant.linear import dequantize_once

RESULTS = Path(__file__).parent / "results" / "generate.json"
PROMPT = "What does `shlex.quote` do? Explain it with an example."


def lorakit_generate(model, ids: torch.Tensor, tokens: int, once: bool) -> tuple[list[int], float]:
    start = time.perf_counter()
    with torch.no_grad(), (dequantize_once() if once else torch.no_grad()):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start


def llama_generate(llm, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    llm.reset()
    start = time.perf_counter()
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == tokens:
            break
    return out, time.perf_counter() - start


def decode_rate(run, tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Best-of-`repeats` decode tokens/s, and the `tokens` generated."""
    first = min(run(1)[1] for _ in range(repeats))
    best, out = float("inf"), None
    for _ in range(repeats):
        out, seconds = run(tokens)
        best = min(best, seconds)
    return (tokens - 1) / max(best - first, 1e-9), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = default_gguf_path()
    model, tokenizer = lorakit.load_gguf(path)
    ids = torch.tensor([chat_ids(tokenizer, PROMPT)])  # the prompt `lorakit generate` builds
    result = {"gguf": str(path), "prompt_tokens": ids.shape[1], "new_tokens": args.tokens, "threads": args.threads}
    result["on_the_fly_tok_s"], fly = decode_rate(lambda n: lorakit_generate(model, ids, n, False), args.tokens,
                                                  args.repeats)
    result["dequantize_once_tok_s"], once = decode_rate(lambda n: lorakit_generate(model, ids, n, True),
                                                        args.tokens, args.repeats)
    result["same_tokens_on_the_fly_and_once"] = fly == once
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: `pip install llama-cpp-python` to compare with llama.cpp")
    else:
        from lorakit.formats.llamacpp import open_model  # as lorakit opens it (AMX buffers off where reported)

        llm = open_model(llama_cpp, model_path=str(path), n_ctx=512, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False, logits_all=False)
        result["llama_cpp_tok_s"], theirs = decode_rate(lambda n: llama_generate(llm, ids[0].tolist(), n),
                                                        args.tokens, args.repeats)
        result["agreeing_tokens"] = next((i for i, (a, b) in enumerate(zip(once, theirs)) if a != b), len(once))
        result["llama_cpp_over_lorakit"] = result["llama_cpp_tok_s"] / result["dequantize_once_tok_s"]
    print(json.dumps(result, indent=1))
    from lorakit.io import write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
