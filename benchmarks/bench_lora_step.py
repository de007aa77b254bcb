"""One LoRA training step (forward + backward + AdamW) on CPU: lorakit vs Hugging Face PEFT.

Three sides: lorakit and PEFT with the same Hugging Face loss (the adapter layers alone), and
lorakit's own step, which computes the loss with `lorakit.causal_lm_loss` (fused chunked
cross-entropy). All adapt the same randomly initialised LlamaForCausalLM (a SmolLM-135M-shaped config,
fewer layers by default) with the same LoRA config (r=16, alpha=32, all-linear, fp32). Steps are
interleaved, alternating which side goes first, so machine noise hits both; we report the median
of the timed steps, in wall time and in this process's CPU time. On a shared machine other
processes stretch wall time by whole seconds at random; CPU time (summed over torch's threads)
is far less sensitive to that, so compare CPU ms there, and use --steps 10 or more.

    python benchmarks/bench_lora_step.py --steps 10 --layers 4 --seq 256 --batch 4

Prints a table, then one JSON line (the last line of stdout) for scripts.
A ratio peft/lorakit >= 1.0 means lorakit is not slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


def lorakit_model(base: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    import lorakit

    model = copy.deepcopy(base)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules="all-linear"))
    return model


def peft_model(base: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    import peft

    cfg = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(copy.deepcopy(base), cfg)


class Trainer:
    """One side of the comparison: a model, its AdamW over the trainable parameters, one batch."""

    def __init__(self, name: str, model: torch.nn.Module, batch: torch.Tensor, fused_loss: bool = False):
        self.name, self.model, self.batch, self.fused_loss = name, model.train(), batch, fused_loss
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.times_ms: list[float] = []
        self.cpu_ms: list[float] = []
        self.losses: list[float] = []

    def step(self, timed: bool) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        if self.fused_loss:  # lorakit's training step: chunked cross-entropy, no (tokens x vocab) logits
            import lorakit

            loss = lorakit.causal_lm_loss(self.model, self.batch, self.batch)
        else:
            loss = self.model(input_ids=self.batch, labels=self.batch, use_cache=False).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        elapsed, elapsed_cpu = (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3
        self.losses.append(loss.item())
        if timed:
            self.times_ms.append(elapsed)
            self.cpu_ms.append(elapsed_cpu)


def main() -> None:
    args = parse_args()
    base = build_base(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g)  # (B, T)
    sides = [Trainer("lorakit", lorakit_model(base, args), batch), Trainer("peft", peft_model(base, args), batch),
             Trainer("lorakit+ce", lorakit_model(base, args), batch, fused_loss=True)]
    del base
    lk, pf, lkce = sides
    if lk.trainable != pf.trainable:
        raise SystemExit(f"not the same adapter: lorakit trains {lk.trainable:,} parameters, peft {pf.trainable:,}")

    for i in range(args.warmup + args.steps):
        for side in sides if i % 2 == 0 else sides[::-1]:  # alternate who goes first
            side.step(timed=i >= args.warmup)
    # B starts at zero on both sides, so the first loss is the base model's loss on both.
    first_loss_diff = abs(lk.losses[0] - pf.losses[0])
    if first_loss_diff > 1e-4:
        raise SystemExit(f"first-step losses differ: lorakit {lk.losses[0]:.6f}, peft {pf.losses[0]:.6f}")

    med = {s.name: statistics.median(s.times_ms) for s in sides}
    med_cpu = {s.name: statistics.median(s.cpu_ms) for s in sides}
    ratio = med["peft"] / med["lorakit"]
    ratio_cpu = med_cpu["peft"] / med_cpu["lorakit"]
    ratio_step = med["peft"] / med["lorakit+ce"]
    tokens = args.batch * args.seq
    print(f"LoRA step, LlamaForCausalLM hidden 576, {args.layers} layers, vocab 49152, batch {args.batch} x {args.seq}, "
          f"r={args.r}, alpha={args.alpha:g}, all-linear, fp32, {torch.get_num_threads()} threads, "
          f"{args.warmup} warmup + {args.steps} timed steps (median)")
    print(f"{'':10} {'ms/step':>10} {'min':>10} {'max':>10} {'cpu ms':>10} {'tokens/s':>10} {'trainable':>12} {'last loss':>10}")
    for s in sides:
        print(f"{s.name:10} {med[s.name]:10.1f} {min(s.times_ms):10.1f} {max(s.times_ms):10.1f} {med_cpu[s.name]:10.1f} "
              f"{tokens / med[s.name] * 1e3:10.0f} {s.trainable:12,} {s.losses[-1]:10.4f}")
    print(f"ratio peft/lorakit = {ratio:.3f} wall, {ratio_cpu:.3f} cpu "
          f"(>= 1.0: lorakit not slower; wall {'ok' if ratio >= 1.0 else 'slower'}, cpu {'ok' if ratio_cpu >= 1.0 else 'slower'})")
    print(f"ratio peft/lorakit+ce = {ratio_step:.3f} wall (lorakit's own step: adapters + fused chunked cross-entropy)")
    print(json.dumps({
        "bench": "lora_step", "lorakit_ms": round(med["lorakit"], 2), "peft_ms": round(med["peft"], 2),
        "ratio_peft_over_lorakit": round(ratio, 4),
        "lorakit_cpu_ms": round(med_cpu["lorakit"], 2), "peft_cpu_ms": round(med_cpu["peft"], 2),
        "ratio_cpu_peft_over_lorakit": round(ratio_cpu, 4),
        "lorakit_ce_ms": round(med["lorakit+ce"], 2), "ratio_peft_over_lorakit_ce": round(ratio_step, 4),
        "lorakit_ce_last_loss": lkce.losses[-1], "lorakit_ce_first_loss_diff": abs(lkce.losses[0] - pf.losses[0]),
        "lorakit_times_ms": [round(t, 2) for t in lk.times_ms], "peft_times_ms": [round(t, 2) for t in pf.times_ms],
        "trainable_params": lk.trainable, "first_loss_diff": first_loss_diff,
        "config": {"layers": args.layers, "seq": args.seq, "batch": args.batch, "r": args.r, "alpha": args.alpha,
                   "steps": args.steps, "warmup": args.warmup, "hidden": 576, "vocab": 49152, "dtype": "float32"},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
