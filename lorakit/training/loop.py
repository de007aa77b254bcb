"""`lorakit train`: the training loop, for any task (`lorakit.tasks`), in three readable parts:
`_start` (set up or resume), `_step` (one optimizer step) and `_finish` (write the results).

A run reads a `RunConfig` (`lorakit.training.run_config`) and writes, under ``output_dir``:

    config.yaml         the resolved config (merge, export and eval read it back)
    metrics.jsonl       one line per logged step: loss, lr, grad_norm, {unit}/s, peak memory; and the task's
                        validation metrics (valid_loss, and valid_ppl, valid_accuracy, ...)
    checkpoints/        step-NNNNNN/: adapter, optimizer, scheduler, RNG, data position (`lorakit.training.checkpoint`)
    adapter/            the final adapter, PEFT format (adapter_config.json, adapter_model.safetensors)
    loss_curve.png      train loss (raw and smoothed), validation loss and lr (`lorakit.report.plot`; needs matplotlib)
    tensorboard/ wandb/ mlruns/   what the trackers of `train.report_to` write (`lorakit.report.trackers`)
    summary.json        what was trained, in which compute dtype (`compute_dtype`: what `model.dtype` resolved
                        to), for how long, how well, and the peak memory (`peak_rss_bytes`: the process
                        high-water mark; on CUDA also `cuda_max_memory_allocated_bytes`) and how many
                        blocks ran compiled (`compiled_blocks`: `train.compile`, `lorakit.training.compile`)

The task supplies the examples, batches, loss and metrics and the loop never looks inside them; a
"unit" below is what the task's loss averages over (a causal LM's loss-bearing tokens, images).
One optimizer step = `grad_accum` micro-batches of `batch_size` examples. The loss of a step is the
mean over all units of its micro-batches (each micro-batch's mean loss is weighted by its unit count), so
accumulation gives the same gradient as one big batch. lr: linear warmup over `warmup_steps`, then constant
(the default) or cosine (or linear) decay to 0 at the last step. Gradients are clipped to `max_grad_norm`
(0: never). The batch order of each epoch is a pure function of (seed, epoch), so a checkpoint holds the
data position as (epoch, batch index) and `resume` continues with the same batches, the same
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.training.checkpoint import CheckpointMismatch, complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.training.distributed import World, close_world, init_world, split_rows
from lorakit.io import read_json, write_json


class TrainingStopped(RuntimeError):
    """The run stopped on its own (non-finite loss); the message says why and what was kept."""


@dataclass
class TrainResult:
    """What a run did. `valid_before` / `valid_after`: the task's validation metrics (None without validation
    data); `per_s`: loss units (the task's `unit`) per second of training."""

    run_dir: Path
    steps: int
    train_loss: float
    valid_before: dict | None
    valid_after: dict | None
    per_s: float
    seconds: float

    @property
    def valid_loss(self) -> float | None:
        return self.valid_after["valid_loss"] if self.valid_after else None

    # the causal-LM task's numbers, by the names its users read
    @property
    def valid_ppl_before(self) -> float | None:
        return self.valid_before.get("valid_ppl") if self.valid_before else None

    @property
    def valid_ppl_after(self) -> float | None:
        return self.valid_after.get("valid_ppl") if self.valid_after else None

    @property
    def useful_tokens_per_s(self) -> float:
        return self.per_s


def lr_lambda(config, total_steps: int):
    """lr factor of optimizer step `step` (0-based): linear warmup, then cosine / linear decay to 0, or constant."""
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else max(0.0, 1 - progress)

    return factor


# --- the loop ------------------------------------------------------------------------------------

def train(config, *, resume: bool = False, progress: bool = True, model=None, tokenizer=None,
          world: World | None = None) -> TrainResult:
    """Run (or resume) the training `config` describes; see the module docstring for what it writes.
    `model` (and, for a causal LM, its `tokenizer`) replace loading `config.model`. Under torchrun
    (WORLD_SIZE > 1) this process joins the process group (`lorakit.training.distributed`)."""
    from lorakit.tasks import make_task
    from lorakit.training.compile import uncompile_blocks_

    own_world = world is None
    world = world or init_world()
    run = None
    try:
        run = _start(config, resume, progress, make_task(config, tokenizer=tokenizer), model, world)
        while run.step < run.total_steps:
            _step(run)
        return _finish(run)
    finally:
        if run is not None and run.compiled_blocks:
            uncompile_blocks_(run.model)  # the model goes back to the caller eager, also after an error
        if own_world:
            close_world(world)


@dataclass
class _Run:
    """The state of a run between steps: what `_start` builds, `_step` advances and `_finish` writes."""

    config: object
    task: object
    world: World
    run_dir: Path
    model: nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_examples: list
    valid_examples: list
    stats: dict
    global_batch: int
    total_steps: int
    metrics: object  # report.trackers.Report on rank 0, None elsewhere
    bar: object
    dtype: torch.dtype  # the compute dtype of the frozen base
    shards: object = None
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    seen: int = 0  # loss units (the task's `unit`) trained on
    seconds: float = 0.0
    valid_seconds: float = 0.0  # time spent in validation (not in `seconds`)
    valid_before: dict | None = None
    valid_after: dict | None = None
    last_loss: float = float("nan")
    batches: list = field(default_factory=list)
    sent_bytes: int = 0
    comm_seconds: float = 0.0
    first_step: int = 0
    compiled_blocks: int = 0  # train.compile: the blocks torch.compile runs (0: eager)

    def log(self, step: int, **numbers) -> None:
        if self.metrics is not None:
            self.metrics.log(step, **numbers)


def _start(config, resume: bool, progress: bool, task, model, world: World) -> _Run:
    """Set a run up: its directory, trackers, model with adapters, optimizer and schedule, and, when resuming,
    the checkpoint's state; then the validation metrics of the starting point."""
    import lorakit
    from lorakit.report.progress import MetricsLog, ProgressBar
    from lorakit.report.trackers import Report, open_trackers
    from lorakit.tasks.base import compute_dtype
    from lorakit.training.allocator import keep_freed_memory
    from lorakit.training.run_config import save_config

    keep_freed_memory()  # glibc: large freed buffers stay for the next step's (lorakit.training.allocator)
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
        model = task.load_model()
    train_examples, valid_examples, stats = task.examples()

    task.adapt(model, config.lora_config())
    if t.gradient_checkpointing:
        lorakit.enable_gradient_checkpointing(model)
    lorakit.fuse_for_training_(model)
    dtype = compute_dtype(model)
    shards = None
    if t.fsdp:
        from lorakit.training.fsdp import shard_base_

        shards = shard_base_(model, world)  # moves the model to world.device too
    elif world.device.type != "cpu":
        model.to(world.device)
    compiled_blocks = _compile(model, world) if t.compile else 0
    params = [p for p in model.parameters() if p.requires_grad]
    world.broadcast_params(params)
    if world.rank:
        torch.manual_seed(t.seed + world.rank)  # dropout masks differ per process; rank 0 keeps the 1-process stream
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    per_epoch = len(task.epoch_batches(train_examples, 0, global_batch))
    total_steps = t.steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    run = _Run(config, task, world, run_dir, model, params, optimizer, scheduler, train_examples, valid_examples,
               stats, global_batch, total_steps, None, None, dtype, shards, compiled_blocks=compiled_blocks)
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, world)
        run.step, run.epoch, run.batch_index = state["step"], state["epoch"], state["batch"]
        run.seen, run.seconds, run.valid_before = state["tokens"], state["seconds"], _valid_before(state)
        run.valid_seconds = state.get("valid_seconds", 0.0)
    run.metrics = (Report(MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=run.step if checkpoint else -1),
                          trackers) if world.main else None)  # metrics.jsonl, and each tracker of train.report_to
    if valid_examples and run.valid_before is None:
        run.valid_before = _validate(run)
        run.log(0, **run.valid_before)
    run.bar = ProgressBar(total_steps, enabled=progress and world.main, speed_label=task.speed_label)
    run.batches = task.epoch_batches(train_examples, run.epoch, global_batch)
    model.train()
    if checkpoint is not None:
        run.last_loss, run.valid_after = _last_losses(run_dir)
    run.first_step = run.step
    return run


def _compile(model: nn.Module, world: World) -> int:
    """`train.compile`: the model's blocks compiled (how many), or 0 with a warning where Inductor cannot build."""
    from lorakit.training.compile import compile_blocks_, inductor_problem

    problem = inductor_problem(world.device.type)
    if problem is not None:
        if world.main:
            print(f"lorakit train: train.compile=true, but torch.compile cannot build code on this "
                  f"{world.device.type} ({problem}); training eager. A CPU needs a C++ compiler "
                  f"(apt-get install g++); set train.compile=false to silence this", file=sys.stderr)
        return 0
    return compile_blocks_(model)


def _step(run: _Run) -> None:
    """One optimizer step: `grad_accum` micro-batches, each process on its slice of the global batch, the loss
    of each weighted by its share of the step's loss units; then clip, update, log, validate and save."""
    t, task, world = run.config.train, run.task, run.world
    start = time.perf_counter()
    micro = []
    for _ in range(t.grad_accum):
        if run.batch_index >= len(run.batches):
            run.epoch, run.batch_index = run.epoch + 1, 0
            run.batches = task.epoch_batches(run.train_examples, run.epoch, run.global_batch)
        rows = split_rows(run.batches[run.batch_index], world)
        micro.append(task.collate(rows, run.dtype, world.device) if rows else None)
        run.batch_index += 1
    local_units = sum(task.weight(b) for b in micro if b is not None)
    n_units = int(world.sum(local_units)[0])  # every process weighs its units by the global count
    loss_sum, bad = 0.0, None
    for batch in micro:
        n = task.weight(batch) if batch is not None else 0
        if n == 0:
            continue
        loss = task.loss(run.model, batch)
        (loss * (n / n_units)).backward()
        value = loss.item()  # read after backward: on a GPU the host queues backward before it waits
        if not math.isfinite(value):
            bad = value if bad is None else bad  # the step goes on: every rank runs the same forwards (FSDP)
        loss_sum += value * n
    loss_sum, any_bad = world.sum(loss_sum, bad is not None)
    if any_bad:
        raise _stopped(run, f"the loss became {bad if bad is not None else 'non-finite'} at step {run.step + 1}",
                       "Lower train.lr, check the data, or use model.dtype=float32")
    comm_start = time.perf_counter()
    run.sent_bytes = world.all_reduce_grads(run.params)
    run.comm_seconds += time.perf_counter() - comm_start
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, t.max_grad_norm or math.inf))  # 0: measure, never clip
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise _stopped(run, f"the gradients became non-finite (norm {grad_norm}) at step {run.step + 1} with a finite "
                            "loss", "Use model.dtype=float32 or lower train.lr")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    elapsed = time.perf_counter() - start
    run.seconds += elapsed
    run.seen += n_units
    run.last_loss = loss_sum / max(n_units, 1)
    _report_step(run, grad_norm, n_units / elapsed if elapsed > 0 else 0.0)
    if run.valid_examples and (_every(run.step, t.eval_every) or run.step == run.total_steps):
        run.valid_after = _validate(run)
        run.log(run.step, **run.valid_after)
    if _every(run.step, t.save_every) or run.step == run.total_steps:
        rng = world.gather_rng()
        if world.main:
            save_checkpoint(run.run_dir, run.step, run.model, run.optimizer, run.scheduler,
                            {"epoch": run.epoch, "batch": run.batch_index, "tokens": run.seen, "seconds": run.seconds,
                             "valid_seconds": run.valid_seconds,
                             "valid_before": run.valid_before, "global_batch": run.global_batch,
                             "processes": world.size}, rng_states=rng)
        world.barrier()


def _stopped(run: _Run, what: str, fix: str) -> TrainingStopped:
    """The error that ends a step before its update: what went wrong, the checkpoint to resume from, the fix."""
    kept = latest_checkpoint(run.run_dir)
    return TrainingStopped(
        f"{what}; nothing was updated. The last good checkpoint is "
        f"{kept or 'none (no checkpoint was written yet)'}. {fix}; then resume with --resume")


def _validate(run: _Run) -> dict:
    """The task's validation metrics of the model now; the time it takes goes to `run.valid_seconds`."""
    from lorakit.training.compile import eager

    start = time.perf_counter()
    with eager():  # no-grad calls would compile graphs of their own (train.compile)
        metrics = run.task.evaluate(run.model, run.valid_examples, run.world)
    run.valid_seconds += time.perf_counter() - start
    return metrics


def _report_step(run: _Run, grad_norm: float, speed: float) -> None:
    """The step's numbers to metrics.jsonl, the trackers and the progress bar (side outputs only)."""
    from lorakit.training.memory import peak_memory_bytes

    t, world = run.config.train, run.world
    lr = run.scheduler.get_last_lr()[0]
    peak = peak_memory_bytes(world.device)
    if run.step % t.log_every == 0 or run.step == run.total_steps:
        run.log(run.step, loss=run.last_loss, lr=lr, grad_norm=grad_norm, **{f"{run.task.unit}_per_s": speed},
                peak_memory_bytes=peak, epoch=run.epoch,
                **({"allreduce_bytes": run.sent_bytes} if world.distributed else {}))
    run.bar.update(run.step, run.last_loss, speed, lr=lr, peak_memory_bytes=peak)


def _finish(run: _Run) -> TrainResult:
    """Write the adapter, the loss curve and summary.json (rank 0), close the side outputs, return the result."""
    import lorakit
    from lorakit.report.progress import format_bytes
    from lorakit.training.memory import peak_memory_bytes, peak_rss_bytes

    world, task = run.world, run.task
    lorakit.unfuse_(run.model)
    peak_rss = peak_rss_bytes()
    cuda_peak = peak_memory_bytes(world.device) if world.device.type == "cuda" else None
    per_s = run.seen / run.seconds if run.seconds else 0.0
    result = TrainResult(run.run_dir, run.step, run.last_loss, run.valid_before, run.valid_after, per_s, run.seconds)
    if world.main:
        lorakit.save_adapter(run.model, run.run_dir / "adapter", task=task.adapter_metadata())
        _write_curve(run.run_dir)
        shards = run.shards
        write_json(run.run_dir / "summary.json", {
            "method": run.config.method, "compute_dtype": str(run.dtype).removeprefix("torch."),
            "compiled_blocks": run.compiled_blocks,
            "steps": run.step, "train_loss": run.last_loss,
            **task.summary(run.valid_before, run.valid_after, per_s),
            "train_seconds": run.seconds, "valid_seconds": run.valid_seconds, "peak_rss_bytes": peak_rss,
            **({"cuda_max_memory_allocated_bytes": cuda_peak} if cuda_peak is not None else {}),
            "data": run.stats,
            "trainable_parameters": sum(p.numel() for p in run.params),
            "processes": world.size, "global_batch": run.global_batch * run.config.train.grad_accum,
            "allreduce_bytes_per_step": run.sent_bytes,
            "allreduce_seconds_per_step": run.comm_seconds / max(run.step - run.first_step, 1),
            **({"fsdp": {"blocks": shards.blocks, "sharded_base_bytes": shards.sharded_bytes,
                         "local_base_bytes": shards.local_bytes, "replicated_bytes": shards.replicated_bytes}}
               if shards else {}),
        })
        run.metrics.close()
    run.bar.close(f"{run.step} steps, train loss {run.last_loss:.4f}"
                  + task.describe(run.valid_before, run.valid_after, per_s)
                  + f", peak RSS {format_bytes(peak_rss)}"
                  + (f", GPU peak {format_bytes(cuda_peak)}" if cuda_peak is not None else "")
                  + (f" over {world.size} processes" if world.distributed else ""))
    world.barrier()
    run.model.eval()
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


def _last_losses(run_dir: Path) -> tuple[float, dict | None]:
    """The last logged train loss and validation metrics of a run (a resumed run that has no step left to
    take still reports them)."""
    from lorakit.report.progress import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r["loss"] for r in records if "loss" in r]
    valid = [{k: v for k, v in r.items() if k.startswith("valid_")} for r in records
             if "valid_loss" in r and r["step"] > 0]
    return (train[-1] if train else float("nan")), (valid[-1] if valid else None)


def _valid_before(state: dict) -> dict | None:
    """The validation metrics of the starting point a checkpoint holds (checkpoints written before tasks
    existed hold a causal LM's loss only)."""
    if "valid_before" in state:
        return state["valid_before"]
    loss = state.get("valid_loss_before")
    return None if loss is None else {"valid_loss": loss, "valid_ppl": math.exp(loss)}


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
    """The config with its file paths absolute, so `merge`, `export` and `eval` work from any directory. A
    model or data value that names no existing file is kept as written: a built-in name ("mobilenet-v2",
    "fashion-mnist"), or a missing file whose error then shows what the user typed."""
    from dataclasses import replace

    def absolute(path, existing_only: bool = True):
        if path is None or (existing_only and not Path(path).expanduser().exists()):
            return path
        return str(Path(path).expanduser().resolve())

    return replace(config, output_dir=absolute(config.output_dir, existing_only=False),
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
