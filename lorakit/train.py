"""`lorakit train`: the training loop, one readable function, and the pieces it is built from.

A run reads a `RunConfig` (`lorakit.run_config`) and writes, under ``output_dir``:

    config.yaml         the resolved config (merge, export and eval read it back)
    metrics.jsonl       one line per logged step: loss, lr, grad_norm, tokens/s; and validation loss/ppl
    checkpoints/        step-NNNNNN/: adapter, optimizer, scheduler, RNG, data position (`lorakit.checkpoint`)
    adapter/            the final adapter, PEFT format (adapter_config.json, adapter_model.safetensors)
    loss_curve.png      train and validation loss
    summary.json        what was trained, for how long, and how well

One optimizer step = `grad_accum` micro-batches of `batch_size` examples. The loss of a step is the
mean over all loss-bearing tokens of its micro-batches (each micro-batch's mean loss is weighted by its
token count), so accumulation gives the same gradient as one big batch. lr: linear warmup over
`warmup_steps`, then cosine (or linear) decay to 0 at the last step, or constant. Gradients are clipped
to `max_grad_norm`. The batch order of each epoch is a pure function of (seed, epoch), so a checkpoint
holds the data position as (epoch, batch index) and `resume` continues with the same batches, the same
dropout masks (RNG restored) and the same optimizer state: a run killed with SIGKILL and resumed ends
with the adapter an uninterrupted run ends with. A non-finite loss stops the run before the optimizer
step, keeping the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.io import write_json

IGNORE = -100


class TrainingStopped(RuntimeError):
    """The run stopped on its own (non-finite loss); the message says why and what was kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float
    valid_loss: float | None
    valid_ppl_before: float | None
    valid_ppl_after: float | None
    useful_tokens_per_s: float
    seconds: float


# --- model --------------------------------------------------------------------------------------

def load_model(config, *, dtype: torch.dtype | None = None, calibration=None):
    """(model, tokenizer) of `config.model` prepared for `config.method`:

        method   .gguf file (or the default model)         Hugging Face directory
        lora     dense (dequantized) weights                dense weights
        qlora    dense, then NF4 (`quantize_`)              streamed into NF4 (`load_quantized`)
        qalora   the file's own INT-N codes (no requant)    INT-N (`IntNConfig`, fp16 scales: GGUF-exact)
    """
    import lorakit
    from lorakit.hardware import resolve_compute_dtype
    from lorakit.models.default import default_gguf_path, load_causal_lm

    dtype = dtype or resolve_compute_dtype(config.model.dtype)
    path = config.model.path
    method = config.method
    if is_gguf(path):
        source = default_gguf_path() if path is None else Path(path).expanduser()
        model, tokenizer = lorakit.load_gguf(source, dtype, quantized=method == "qalora")
        if method == "qalora":
            _check_gguf_groups(model, config.adapter.group_size)
        if method == "qlora":
            lorakit.quantize_(model, lorakit.NF4Config())
        return model, tokenizer
    if method == "qlora":
        from transformers import AutoTokenizer

        model = lorakit.load_quantized(path, lorakit.NF4Config(), dtype=dtype)
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, tokenizer = load_causal_lm(path, dtype)
    if method == "qalora":
        quant = lorakit.IntNConfig(bits=config.adapter.bits, group_size=config.adapter.group_size,
                                   method=config.adapter.quant_method, scale_dtype="float16")
        lorakit.quantize_(model, quant, calibration=calibration if quant.method == "gptq" else None)
    return model, tokenizer


def is_gguf(path) -> bool:
    """A model path that names a GGUF file (None: the embedded default model, a GGUF file too)."""
    return path is None or str(path).lower().endswith(".gguf")


def _calibration(config) -> list[torch.Tensor] | None:
    """GPTQ calibration batches from the training data, when `config` quantizes a Hugging Face model with GPTQ."""
    if config.method != "qalora" or config.adapter.quant_method != "gptq" or is_gguf(config.model.path):
        return None
    from lorakit.models.default import load_causal_lm

    _, tok = load_causal_lm(config.model.path)
    return calibration_batches(load_examples(config, tok)[0])


def _load_for_training(config):
    """`load_model`, with GPTQ calibration batches from the training data when the method needs them."""
    return load_model(config, calibration=_calibration(config))


def _check_gguf_groups(model: nn.Module, group_size: int) -> None:
    from lorakit.quant.intn import IntNWeight

    groups = {m.group_size for m in model.modules() if isinstance(m, IntNWeight)}
    bad = sorted(g for g in groups if group_size % g)
    if bad:
        raise ValueError(f"adapter.group_size={group_size} is not a multiple of the GGUF file's block size {bad[0]}: "
                         f"QA-LoRA merges into the file's offsets only when each adapter group covers whole blocks; "
                         f"set adapter.group_size={bad[0]}")


def load_trained(run_dir: str | Path, *, dtype: torch.dtype | None = None):
    """(model with the run's adapter loaded, tokenizer, config) of a finished run, in float32 by default:
    the precision merges and exports are exact in (dense tensors then hold the file's own values)."""
    import lorakit
    from lorakit.run_config import read_run_config

    config = read_run_config(run_dir)
    model, tokenizer = load_model(config, dtype=dtype or torch.float32, calibration=_calibration(config))
    lorakit.load_adapter(model, Path(run_dir) / "adapter")
    return model.eval(), tokenizer, config


def calibration_batches(examples, n: int = 32) -> list[torch.Tensor]:
    """GPTQ calibration input_ids (1, T) from the first `n` training examples."""
    return [torch.tensor(e.input_ids)[None] for e in examples[:n]]


# --- data ---------------------------------------------------------------------------------------

def load_examples(config, tokenizer):
    """(train, valid) lists of Example(input_ids, labels), and a dict of data statistics."""
    from lorakit.data import records, render

    data = config.data
    if data.train is None:
        train_set, valid_set = default_datasets()
    else:
        train_set = records.read_records(data.train, data.shape)
        if data.valid is not None:
            valid_set = records.read_records(data.valid, train_set.shape)
        elif data.valid_fraction > 0:
            train_set, valid_set = records.split(train_set, data.valid_fraction, config.train.seed)
        else:
            valid_set = None
    train, train_report = render.encode(tokenizer, train_set, data.max_tokens, data.train_on_prompt)
    valid, _ = render.encode(tokenizer, valid_set, data.max_tokens, data.train_on_prompt) if valid_set else ([], None)
    if not train:
        raise ValueError(f"no training example has a loss-bearing token after truncation to data.max_tokens="
                         f"{data.max_tokens}: raise it, or check the data")
    stats = {"shape": train_set.shape, "train_examples": len(train), "valid_examples": len(valid),
             "train_loss_tokens": sum(_loss_tokens(e) for e in train), "truncated": train_report.truncated,
             "dropped": train_report.dropped}
    return train, valid, stats


def default_datasets():
    """The embedded default data: instruction pairs from the standard library's docstrings, validation
    modules held out (`lorakit.data.stdlib_docs`)."""
    from lorakit.data.records import Dataset
    from lorakit.data.stdlib_docs import TRAIN_MODULES, VALID_MODULES, docstring_pairs

    def dataset(modules):
        pairs = docstring_pairs(modules)
        rows = [{"instruction": q, "input": "", "output": a} for q, a in pairs]
        return Dataset("stdlib docstrings", "instruction", rows, list(range(1, len(rows) + 1)), "row")

    return dataset(TRAIN_MODULES), dataset(VALID_MODULES)


def _loss_tokens(example) -> int:
    return sum(1 for y in example.labels[1:] if y != IGNORE)


def epoch_batches(examples, config, epoch: int) -> list:
    """The micro-batches of one epoch (lists of rows), a pure function of (seed, epoch)."""
    from lorakit.data import batching

    t = config.train
    if config.data.packing:
        rows = batching.pack(examples, config.data.max_tokens)
        order = batching.length_grouped_batches(rows, t.batch_size, t.seed, epoch)
        return [[rows[i] for i in batch] for batch in order]
    order = batching.length_grouped_batches(examples, t.batch_size, t.seed, epoch)
    return [[examples[i] for i in batch] for batch in order]


def batch_inputs(rows, pad_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """Tensors for one micro-batch; `dtype` is the compute dtype (a packed row's 4-D mask must match it)."""
    from lorakit.data import batching

    return batching.collate(rows, pad_id, dtype)


def micro_loss(model, batch: dict) -> torch.Tensor:
    from lorakit.losses import causal_lm_loss

    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], **extra)


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate(model, examples, pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean loss over `examples` (exp of it is the perplexity), in length-sorted batches."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = batch_inputs([examples[i] for i in order[start:start + batch_size]], pad_id, _dtype(model))
        n = count_loss_tokens(batch)
        if n:
            total += micro_loss(model, batch).item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def lr_lambda(config, total_steps: int):
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else max(0.0, 1 - progress)

    return factor


def _dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- the loop ------------------------------------------------------------------------------------

def train(config, *, resume: bool = False, progress: bool = True, model=None, tokenizer=None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring for what it writes."""
    import lorakit
    from lorakit.plot import loss_curve_png
    from lorakit.progress import MetricsLog, ProgressBar
    from lorakit.run_config import save_config

    config = absolute_paths(config)
    run_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise ValueError(f"nothing to resume in {run_dir}: it has no complete checkpoint (checkpoints/step-*/state.json)")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume, or set output_dir to a new "
                         f"directory (nothing there is overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    t = config.train
    torch.manual_seed(t.seed)
    if model is None:
        model, tokenizer = _load_for_training(config)
    pad = pad_id_of(tokenizer)
    train_examples, valid_examples, stats = load_examples(config, tokenizer)

    lorakit.inject_adapters(model, config.lora_config())
    if t.gradient_checkpointing:
        lorakit.enable_gradient_checkpointing(model)
    lorakit.fuse_for_training_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    per_epoch = len(epoch_batches(train_examples, config, 0))
    total_steps = t.steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))

    step, epoch, batch_index, tokens_seen, seconds = 0, 0, 0, 0, 0.0
    valid_before = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
        tokens_seen, seconds, valid_before = state["tokens"], state["seconds"], state.get("valid_loss_before")
    metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=step if checkpoint else -1)
    if valid_examples and valid_before is None:
        valid_before = evaluate(model, valid_examples, pad)
        metrics.log(0, valid_loss=valid_before, valid_ppl=math.exp(valid_before))
    bar = ProgressBar(total_steps, enabled=progress)
    batches = epoch_batches(train_examples, config, epoch)
    model.train()
    last_loss = float("nan")
    valid_loss = None
    kill_at = int(os.environ.get("LORAKIT_TEST_KILL_AFTER_STEP", "0"))  # for the kill-and-resume test
    while step < total_steps:
        start = time.perf_counter()
        micro = []
        for _ in range(t.grad_accum):
            if batch_index >= len(batches):
                epoch, batch_index = epoch + 1, 0
                batches = epoch_batches(train_examples, config, epoch)
            micro.append(batch_inputs(batches[batch_index], pad, _dtype(model)))
            batch_index += 1
        n_tokens = sum(count_loss_tokens(b) for b in micro)
        loss_sum = 0.0
        for batch in micro:
            n = count_loss_tokens(batch)
            if n == 0:
                continue
            loss = micro_loss(model, batch)
            if not torch.isfinite(loss):
                kept = latest_checkpoint(run_dir)
                raise TrainingStopped(
                    f"the loss became {loss.item()} at step {step + 1}; nothing was updated. The last good checkpoint "
                    f"is {kept or 'none (no checkpoint was written yet)'}. Lower train.lr, check the data, or use "
                    f"model.dtype=float32; then resume with --resume")
            (loss * (n / n_tokens)).backward()
            loss_sum += loss.item() * n
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - start
        seconds += elapsed
        tokens_seen += n_tokens
        last_loss = loss_sum / max(n_tokens, 1)
        speed = n_tokens / elapsed if elapsed > 0 else 0.0
        if step % t.log_every == 0 or step == total_steps:
            metrics.log(step, loss=last_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                          tokens_per_s=speed, epoch=epoch)
        bar.update(step, last_loss, speed, lr=scheduler.get_last_lr()[0])
        if valid_examples and (step % t.eval_every == 0 or step == total_steps):
            valid_loss = evaluate(model, valid_examples, pad)
            metrics.log(step, valid_loss=valid_loss, valid_ppl=math.exp(valid_loss))
        if step % t.save_every == 0 or step == total_steps:
            save_checkpoint(run_dir, step, model, optimizer, scheduler,
                            {"epoch": epoch, "batch": batch_index, "tokens": tokens_seen, "seconds": seconds,
                             "valid_loss_before": valid_before})
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    lorakit.unfuse_(model)
    lorakit.save_adapter(model, run_dir / "adapter")
    _write_curve(run_dir, loss_curve_png)
    useful = tokens_seen / seconds if seconds else 0.0
    result = TrainResult(run_dir, step, last_loss, valid_loss,
                         math.exp(valid_before) if valid_before is not None else None,
                         math.exp(valid_loss) if valid_loss is not None else None, useful, seconds)
    write_json(run_dir / "summary.json", {
        "method": config.method, "steps": step, "train_loss": last_loss, "valid_loss": valid_loss,
        "valid_ppl_before": result.valid_ppl_before, "valid_ppl_after": result.valid_ppl_after,
        "useful_tokens_per_s": useful, "train_seconds": seconds, "data": stats,
        "trainable_parameters": sum(p.numel() for p in params),
    })
    bar.close(f"{step} steps, train loss {last_loss:.4f}"
              + (f", valid ppl {result.valid_ppl_before:.3f} -> {result.valid_ppl_after:.3f}"
                 if result.valid_ppl_after is not None else "") + f", {useful:.0f} tokens/s")
    model.eval()
    return result


def absolute_paths(config):
    """The config with its file paths absolute, so `merge`, `export` and `eval` work from any directory."""
    from dataclasses import replace

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    return replace(config, output_dir=absolute(config.output_dir),
                   model=replace(config.model, path=absolute(config.model.path)),
                   data=replace(config.data, train=absolute(config.data.train), valid=absolute(config.data.valid)))


def _write_curve(run_dir: Path, loss_curve_png) -> None:
    from lorakit.progress import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    loss_curve_png(run_dir / "loss_curve.png", train, valid, title="lorakit train: loss")
