"""Greedy generation on the embedded Q4_1 GGUF (its own 4-bit codes): dequantizing every weight for every token
(the training path's on-the-fly dequantization) against `dequantize_once()` (one dense copy per weight while grad
is off), side by side in one process, same prompt and tokens.

    python benchmarks/bench_generate.py [--tokens 16] [--repeats 2]
"""

import argparse
import time

import torch

import lorakit
from lorakit.models.default import default_gguf_path
from lorakit.quant.linear import dequantize_once


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = lorakit.load_gguf(default_gguf_path())
    ids = tokenizer("What does shlex.quote do?", return_tensors="pt").input_ids

    def generate() -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False,
                             min_new_tokens=args.tokens, pad_token_id=tokenizer.eos_token_id)
        return out, (time.perf_counter() - start) / args.tokens

    with torch.no_grad():
        generate()  # warm-up
        for _ in range(args.repeats):
            plain, plain_s = generate()
            with dequantize_once():
                once, once_s = generate()
            print(f"ms/token: on the fly {plain_s * 1e3:.0f}, dequantize_once {once_s * 1e3:.0f} "
                  f"({plain_s / once_s:.1f}x); same tokens: {torch.equal(plain, once)}")


if __name__ == "__main__":
    main()
