"""`lorakit train`: the training loop, one readable function, and the pieces it is built from.

A run reads a `RunConfig` (`lorakit.training.run_config`) and writes, under ``output_dir``:

    config.yaml         the resolved config (merge, export and eval read it back)
    metrics.jsonl       one line per logged step: loss, lr, grad_norm, tokens/s, peak memory; and validation loss/ppl
    checkpoints/        step-NNNNNN/: adapter, optimizer, scheduler, RNG, data position (`lorakit.training.checkpoint`)
    adapter/            the final adapter, PEFT format (adapter_config.json, adapter_model.safetensors)
    loss_curve.png      train loss (raw and smoothed), validation loss and lr (`lorakit.report.plot`; needs matplotlib)
    tensorboard/ wandb/ mlruns/   what the trackers of `train.report_to` write (`lorakit.report.trackers`)
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

Under torchrun (`lorakit.training.distributed`) each of the P processes takes a slice of every global micro-batch
of `batch_size` x P rows and only adapter gradients are all-reduced; rank 0 writes every file. A
checkpoint records that global batch, so a run resumes on any number of processes that divides it (each
then takes global / P' rows) and continues with the same batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.training.checkpoint import CheckpointMismatch, complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.training.distributed import World, close_world, init_world, split_rows
from lorakit.io import read_json, write_json

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
    from lorakit.training.hardware import resolve_compute_dtype
    from lorakit.models.default import default_gguf_path, load_causal_lm

    dtype = dtype or resolve_compute_dtype(config.model.dtype)
    path = config.model.path
    method = config.base_method  # dora / qdora train on lora's / qlora's base
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
    from lorakit.training.run_config import read_run_config

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


def epoch_batches(examples, config, epoch: int, batch_size: int | None = None) -> list:
    """The (global) micro-batches of one epoch (lists of rows), a pure function of (seed, epoch, batch_size);
    `batch_size` defaults to `config.train.batch_size`."""
    from lorakit.data import batching

    t = config.train
    batch_size = batch_size or t.batch_size
    if config.data.packing:
        rows = batching.pack(examples, config.data.max_tokens)
        order = batching.length_grouped_batches(rows, batch_size, t.seed, epoch)
        return [[rows[i] for i in batch] for batch in order]
    order = batching.length_grouped_batches(examples, batch_size, t.seed, epoch)
    return [[examples[i] for i in batch] for batch in order]


def batch_inputs(rows, pad_id: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> dict:
    """Tensors for one micro-batch on `device`; `dtype` is the compute dtype (a packed row's 4-D mask must
    match it)."""
    from lorakit.data import batching

    batch = batching.collate(rows, pad_id, dtype)
    if device is not None and device.type != "cpu":
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def micro_loss(model, batch: dict) -> torch.Tensor:
    from lorakit.tasks.losses import causal_lm_loss

    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], **extra)


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate(model, examples, pad_id: int, batch_size: int = 8, world: World | None = None) -> float:
    """Token-weighted mean loss over `examples` (exp of it is the perplexity), in length-sorted batches;
    with several processes each evaluates every P-th batch and the sums are all-reduced."""
    world = world or World()
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in range(world.rank * batch_size, len(order), batch_size * world.size):
        rows = [examples[i] for i in order[start:start + batch_size]]
        batch = batch_inputs(rows, pad_id, _dtype(model), world.device)
        n = count_loss_tokens(batch)
        if n:
            total += micro_loss(model, batch).item() * n
            count += n
    total, count = world.sum(total, count)
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

def train(config, *, resume: bool = False, progress: bool = True, model=None, tokenizer=None,
          world: World | None = None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring for what it writes.
    Under torchrun (WORLD_SIZE > 1) this process joins the process group (`lorakit.training.distributed`)."""
    own_world = world is None
    world = world or init_world()
    try:
        return _train(config, resume, progress, model, tokenizer, world)
    finally:
        if own_world:
            close_world(world)


def _train(config, resume: bool, progress: bool, model, tokenizer, world: World) -> TrainResult:
    import lorakit
    from lorakit.training.memory import peak_memory_bytes
    from lorakit.report.progress import MetricsLog, ProgressBar
    from lorakit.training.run_config import save_config
    from lorakit.report.trackers import Report, open_trackers

    config = absolute_paths(config)
    run_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise ValueError(f"nothing to resume in {run_dir}: it has no complete checkpoint (checkpoints/step-*/state.json)")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume, or set output_dir to a new "
                         f"directory (nothing there is overwritten)")
    t = config.train
    global_batch = _global_batch(config, checkpoint, world)
    world.barrier()  # every process has looked at run_dir before rank 0 writes into it
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    trackers = open_trackers(config, run_dir, checkpoint) if world.main else []  # before the model: fails fast
    torch.manual_seed(t.seed)
    if model is None:
        model, tokenizer = _load_for_training(config)
    pad = pad_id_of(tokenizer)
    train_examples, valid_examples, stats = load_examples(config, tokenizer)

    lorakit.inject_adapters(model, config.lora_config())
    if t.gradient_checkpointing:
        lorakit.enable_gradient_checkpointing(model)
    lorakit.fuse_for_training_(model)
    dtype = _dtype(model)
    shards = None
    if t.fsdp:
        from lorakit.training.fsdp import shard_base_

        shards = shard_base_(model, world)  # moves the model to world.device too
    elif world.device.type != "cpu":
        model.to(world.device)
    params = [p for p in model.parameters() if p.requires_grad]
    world.broadcast_params(params)
    if world.rank:
        torch.manual_seed(t.seed + world.rank)  # dropout masks differ per process; rank 0 keeps the 1-process stream
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    per_epoch = len(epoch_batches(train_examples, config, 0, global_batch))
    total_steps = t.steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))

    step, epoch, batch_index, tokens_seen, seconds = 0, 0, 0, 0, 0.0
    valid_before = None
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, world)
        step, epoch, batch_index = state["step"], state["epoch"], state["batch"]
        tokens_seen, seconds, valid_before = state["tokens"], state["seconds"], state.get("valid_loss_before")
    metrics = (Report(MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=step if checkpoint else -1), trackers)
               if world.main else None)  # metrics.jsonl, and each tracker of train.report_to
    log = metrics.log if metrics else (lambda *a, **k: None)
    if valid_examples and valid_before is None:
        valid_before = evaluate(model, valid_examples, pad, world=world)
        log(0, valid_loss=valid_before, valid_ppl=math.exp(valid_before))
    bar = ProgressBar(total_steps, enabled=progress and world.main)
    batches = epoch_batches(train_examples, config, epoch, global_batch)
    model.train()
    last_loss, valid_loss = _last_losses(run_dir) if checkpoint is not None else (float("nan"), None)
    sent_bytes, comm_seconds, first_step = 0, 0.0, step
    while step < total_steps:
        start = time.perf_counter()
        micro = []
        for _ in range(t.grad_accum):
            if batch_index >= len(batches):
                epoch, batch_index = epoch + 1, 0
                batches = epoch_batches(train_examples, config, epoch, global_batch)
            rows = split_rows(batches[batch_index], world)
            micro.append(batch_inputs(rows, pad, dtype, world.device) if rows else None)
            batch_index += 1
        local_tokens = sum(count_loss_tokens(b) for b in micro if b is not None)
        n_tokens = int(world.sum(local_tokens)[0])  # every process weighs its tokens by the global count
        loss_sum, bad = 0.0, None
        for batch in micro:
            n = count_loss_tokens(batch) if batch is not None else 0
            if n == 0:
                continue
            loss = micro_loss(model, batch)
            if not torch.isfinite(loss):
                bad = loss.item()
                break
            (loss * (n / n_tokens)).backward()
            loss_sum += loss.item() * n
        loss_sum, any_bad = world.sum(loss_sum, bad is not None)
        if any_bad:
            kept = latest_checkpoint(run_dir)
            raise TrainingStopped(
                f"the loss became {bad if bad is not None else 'non-finite'} at step {step + 1}; nothing was updated. "
                f"The last good checkpoint is {kept or 'none (no checkpoint was written yet)'}. Lower train.lr, check "
                f"the data, or use model.dtype=float32; then resume with --resume")
        comm_start = time.perf_counter()
        sent_bytes = world.all_reduce_grads(params)
        comm_seconds += time.perf_counter() - comm_start
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
        peak = peak_memory_bytes(world.device)
        if step % t.log_every == 0 or step == total_steps:
            log(step, loss=last_loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens_per_s=speed,
                peak_memory_bytes=peak, epoch=epoch, **({"allreduce_bytes": sent_bytes} if world.distributed else {}))
        bar.update(step, last_loss, speed, lr=scheduler.get_last_lr()[0], peak_memory_bytes=peak)
        if valid_examples and (_every(step, t.eval_every) or step == total_steps):
            valid_loss = evaluate(model, valid_examples, pad, world=world)
            log(step, valid_loss=valid_loss, valid_ppl=math.exp(valid_loss))
        if _every(step, t.save_every) or step == total_steps:
            rng = world.gather_rng()
            if world.main:
                save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                {"epoch": epoch, "batch": batch_index, "tokens": tokens_seen, "seconds": seconds,
                                 "valid_loss_before": valid_before, "global_batch": global_batch,
                                 "processes": world.size}, rng_states=rng)
            world.barrier()
    lorakit.unfuse_(model)
    useful = tokens_seen / seconds if seconds else 0.0
    result = TrainResult(run_dir, step, last_loss, valid_loss,
                         math.exp(valid_before) if valid_before is not None else None,
                         math.exp(valid_loss) if valid_loss is not None else None, useful, seconds)
    if world.main:
        lorakit.save_adapter(model, run_dir / "adapter")
        _write_curve(run_dir)
        write_json(run_dir / "summary.json", {
            "method": config.method, "steps": step, "train_loss": last_loss, "valid_loss": valid_loss,
            "valid_ppl_before": result.valid_ppl_before, "valid_ppl_after": result.valid_ppl_after,
            "useful_tokens_per_s": useful, "train_seconds": seconds, "data": stats,
            "trainable_parameters": sum(p.numel() for p in params),
            "processes": world.size, "global_batch": global_batch * t.grad_accum,
            "allreduce_bytes_per_step": sent_bytes,
            "allreduce_seconds_per_step": comm_seconds / max(step - first_step, 1),
            **({"fsdp": {"blocks": shards.blocks, "sharded_base_bytes": shards.sharded_bytes,
                         "local_base_bytes": shards.local_bytes, "replicated_bytes": shards.replicated_bytes}}
               if shards else {}),
        })
        metrics.close()
    bar.close(f"{step} steps, train loss {last_loss:.4f}"
              + (f", valid ppl {result.valid_ppl_before:.3f} -> {result.valid_ppl_after:.3f}"
                 if result.valid_ppl_after is not None else "") + f", {useful:.0f} useful tokens/s"
              + (f" over {world.size} processes" if world.distributed else ""))
    world.barrier()
    model.eval()
    return result


def _every(step: int, interval: int) -> bool:
    """Whether a periodic action (validation, checkpoint) falls on `step`; an interval of 0 means never
    (the loop still validates and saves at the last step)."""
    return interval > 0 and step % interval == 0


def _load_checkpoint(checkpoint: Path, model, optimizer, scheduler, world: World) -> dict:
    """`load_checkpoint`, and when the newest checkpoint is damaged (disk error, a hand edit), an error that
    names the previous intact one and how to resume from it."""
    try:
        return load_checkpoint(checkpoint, model, optimizer, scheduler, rank=world.rank)
    except CheckpointMismatch:
        raise
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise _damaged(checkpoint, e) from None


def _damaged(checkpoint: Path, error: Exception) -> ValueError:
    older = [p for p in complete_checkpoints(checkpoint.parent.parent) if p != checkpoint]
    hint = (f"; the previous checkpoint {older[-1].name} is there: move {checkpoint} out of checkpoints/ and "
            f"resume again to continue from it" if older else "; no earlier checkpoint is left")
    return ValueError(f"cannot resume from {checkpoint}: {error}{hint}")


def _last_losses(run_dir: Path) -> tuple[float, float | None]:
    """The last logged train and validation loss of a run (a resumed run that has no step left to take
    still reports them)."""
    from lorakit.report.progress import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r["loss"] for r in records if "loss" in r]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r and r["step"] > 0]
    return (train[-1] if train else float("nan")), (valid[-1] if valid else None)


def _global_batch(config, checkpoint: Path | None, world: World) -> int:
    """Rows per global micro-batch: `batch_size` x processes for a new run; a resumed run keeps its own, which
    the processes must divide."""
    if checkpoint is None:
        return config.train.batch_size * world.size
    try:
        state = read_json(checkpoint / "state.json", "checkpoint state")
        global_batch = int(state.get("global_batch", config.train.batch_size))
    except (ValueError, TypeError, AttributeError) as e:
        raise _damaged(checkpoint, e) from None
    if global_batch % world.size:
        raise ValueError(f"{checkpoint} was trained with a global batch of {global_batch} rows "
                         f"({state.get('processes', 1)} process(es)); {world.size} processes cannot split it "
                         f"evenly: resume with a number of processes that divides {global_batch}")
    if world.main and world.size != state.get("processes", 1):
        print(f"lorakit train: resuming a {state.get('processes', 1)}-process run on {world.size}: each process takes "
              f"{global_batch // world.size} rows of every {global_batch}-row batch, so the batches stay the same")
    return global_batch


def absolute_paths(config):
    """The config with its file paths absolute, so `merge`, `export` and `eval` work from any directory."""
    from dataclasses import replace

    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    return replace(config, output_dir=absolute(config.output_dir),
                   model=replace(config.model, path=absolute(config.model.path)),
                   data=replace(config.data, train=absolute(config.data.train), valid=absolute(config.data.valid)))


def _write_curve(run_dir: Path) -> None:
    """loss_curve.png from the run's metrics (`lorakit.report.plot`); without matplotlib the run still finishes, with a note."""
    import sys

    from lorakit.report.plot import plot_runs

    try:
        plot_runs([run_dir], run_dir / "loss_curve.png")
    except ImportError as e:
        print(f"lorakit train: no loss_curve.png: {e}", file=sys.stderr)
