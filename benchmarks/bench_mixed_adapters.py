"""Mixed-adapter batches on the embedded SmolLM2-135M (its Q4_1 codes, `dequantize_once`): 8 rows over 4 LoRA
adapters (r=16, all-linear) in one batch, against 4 batches of 2 rows each with its adapter active (the same
tokens), and against one batch of 8 rows with a single adapter (the ceiling). Prefill (a forward of 8 x T
tokens) and greedy decoding with a KV cache (prefill + `--new` steps), best of `--repeats`.

    python benchmarks/bench_mixed_adapters.py [--prompt-tokens 64] [--new 16] [--repeats 3]
"""

import argparse
import time

import torch

import lorakit
from lorakit.models.default import default_gguf_path
from lorakit.quant.linear import dequantize_once

NAMES = ["n0", "n1", "n2", "n3"]


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = lorakit.load_gguf(default_gguf_path())
    for i, name in enumerate(NAMES):
        lorakit.inject_adapters(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"), name=name)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
    rows = [NAMES[i // 2] for i in range(8)]  # [n0, n0, n1, n1, ...]: rows grouped as a server would group them
    ids = torch.randint(0, tokenizer.vocab_size, (8, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    def mixed_forward():
        return model(ids, adapter_names=rows).logits

    def separate_forward():
        out = []
        for k, name in enumerate(NAMES):
            lorakit.set_active(model, name)
            out.append(model(ids[2 * k: 2 * k + 2]).logits)
        return torch.cat(out)

    def single_forward():
        lorakit.set_active(model, NAMES[0])
        return model(ids).logits

    def mixed_generate():
        with lorakit.mixed_adapters(model, rows):
            return model.generate(ids, attention_mask=torch.ones_like(ids), **gen)

    def separate_generate():
        out = []
        for k, name in enumerate(NAMES):
            lorakit.set_active(model, name)
            part = ids[2 * k: 2 * k + 2]
            out.append(model.generate(part, attention_mask=torch.ones_like(part), **gen))
        return torch.cat(out)

    def single_generate():
        lorakit.set_active(model, NAMES[0])
        return model.generate(ids, attention_mask=torch.ones_like(ids), **gen)

    with torch.no_grad(), dequantize_once():
        diff = (mixed_forward() - separate_forward()).abs().max().item()
        same = torch.equal(mixed_generate(), separate_generate())
        tokens = 8 * args.prompt_tokens
        print(f"threads {torch.get_num_threads()}; 8 rows x {args.prompt_tokens} prompt tokens, 4 adapters (r=16)")
        print(f"mixed vs separate: max |logit diff| {diff:.2e}; same generated tokens: {same}")
        for label, mixed, separate, single, count in (
            ("prefill", mixed_forward, separate_forward, single_forward, tokens),
            (f"generate {args.new}", mixed_generate, separate_generate, single_generate, 8 * args.new),
        ):
            t_mixed, t_sep, t_single = (best(f, args.repeats) for f in (mixed, separate, single))
            print(f"{label:12s} tokens/s: mixed batch of 8 {count / t_mixed:8.1f} | 4 batches of 2 "
                  f"{count / t_sep:8.1f} ({t_sep / t_mixed:.2f}x slower) | one adapter, batch of 8 "
                  f"{count / t_single:8.1f}")


if __name__ == "__main__":
    main()
