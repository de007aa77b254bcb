"""The causal language model task: next-token prediction on text, instruction or chat rows.

    examples   Example(input_ids, labels) per row (`lorakit.data.render`); labels are -100 on prompt and
               padding positions, so only answer tokens carry a loss
    batches    length-grouped (or random, `data.group_by_length`; or packed, `data.packing`) rows of one
               epoch (`lorakit.data.batching`)
    loss       mean cross-entropy over the loss-bearing tokens of the batch (`lorakit.tasks.losses`):

                   loss = - 1/N · Σ_{t: labels[t+1] != -100} log p(labels[t+1] | ids[≤t])

    weight     N, the number of loss-bearing tokens
    metrics    valid_loss (token-weighted mean over the validation rows) and valid_ppl = exp(valid_loss)

The model comes from `config.model` prepared for `config.method` (`load_model`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch
from torch import nn

from lorakit.tasks.base import before_after, change, compute_dtype

IGNORE = -100


class CausalLM:
    """The `Task` of a causal LM run; `tokenizer` may be given with a model the caller loaded."""

    unit = "tokens"
    speed_label = "useful tok/s"

    def __init__(self, config, tokenizer=None) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def load_model(self) -> nn.Module:
        model, self.tokenizer = load_model(self.config, calibration=_calibration(self.config))
        return model

    def adapt(self, model: nn.Module, lora_config) -> list[str]:
        import lorakit

        return lorakit.inject_adapters(model, lora_config)

    def adapter_metadata(self) -> None:
        return None

    def examples(self):
        return load_examples(self.config, self.tokenizer)

    def epoch_batches(self, examples, epoch: int, batch_size: int) -> list:
        return epoch_batches(examples, self.config, epoch, batch_size)

    def collate(self, rows, dtype: torch.dtype, device: torch.device | None) -> dict:
        return batch_inputs(rows, pad_id_of(self.tokenizer), dtype, device)

    def weight(self, batch: dict) -> int:
        return count_loss_tokens(batch)

    def loss(self, model, batch: dict) -> torch.Tensor:
        # FSDP gathers a block's weights at every forward: a prefix's extra decoder call (and the held dense
        # copies) would undo the sharding, and ranks must call the decoder alike
        return micro_loss(model, batch, share_prefix=not self.config.train.fsdp)

    def evaluate(self, model, examples, world) -> dict[str, float]:
        loss = evaluate(model, examples, pad_id_of(self.tokenizer), world=world, loss_fn=self.loss,
                        hold=not self.config.train.fsdp)  # dense copies would undo FSDP's sharding
        return {"valid_loss": loss, "valid_ppl": math.exp(loss)}

    def summary(self, before: dict | None, after: dict | None, per_s: float) -> dict:
        return {"valid_loss": after["valid_loss"] if after else None, **before_after(before, after, "valid_ppl"),
                "useful_tokens_per_s": per_s}

    def describe(self, before: dict | None, after: dict | None, per_s: float) -> str:
        return f"{change(before, after, 'valid_ppl', 'valid ppl', 3)}, {per_s:.0f} useful tokens/s"


# --- model --------------------------------------------------------------------------------------

def load_model(config, *, dtype: torch.dtype | None = None, calibration=None):
    """(model, tokenizer) of `config.model` prepared for `config.method`:

        method   .gguf file (or the default model)         Hugging Face directory
        lora     dense (dequantized) weights                dense weights
        qlora    dense, then NF4 (`quantize_`)              streamed into NF4 (`load_quantized`)
        qalora   the file's own INT-N codes (no requant)    streamed into INT-N (`IntNConfig`, fp16 scales:
                                                            GGUF-exact); GPTQ: dense, then `quantize_`
    """
    import lorakit
    from lorakit.models.default import default_gguf_path, load_causal_lm
    from lorakit.training.hardware import resolve_compute_dtype

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
    quant = None
    if method == "qlora":
        quant = lorakit.NF4Config()
    elif method == "qalora":
        quant = lorakit.IntNConfig(bits=config.adapter.bits, group_size=config.adapter.group_size,
                                   method=config.adapter.quant_method, scale_dtype="float16")
    gptq = getattr(quant, "method", None) == "gptq"  # needs the dense model and calibration batches
    if quant is not None and not gptq:  # streamed: never the whole dense model in memory
        from transformers import AutoTokenizer

        from lorakit.quant.stream import StreamMismatch

        try:
            model = lorakit.load_quantized(path, quant, dtype=dtype)
            return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
        except StreamMismatch as e:  # keys transformers renames on load: dense, then quantized (more memory)
            print(f"lorakit: {e}; loading it dense instead", file=sys.stderr)
    model, tokenizer = load_causal_lm(path, dtype)
    if quant is not None:  # GPTQ, or a checkpoint that does not stream
        lorakit.quantize_(model, quant, calibration=calibration if gptq else None)
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


MERGED_GGUF = "merged.gguf"


def run_gguf(run_dir: str | Path, config=None) -> Path | None:
    """A GGUF file holding exactly what a QA-LoRA run on a GGUF base trained: RUN_DIR/merged.gguf, the adapter
    merged into the file's own INT-N offsets (lossless), written on first use and again when the adapter is
    newer than it. None for other runs (their merge into 4 bits would re-quantize: not what was trained)."""
    import lorakit
    from lorakit.models.default import default_gguf_path
    from lorakit.training.run_config import read_run_config

    run_dir = Path(run_dir)
    config = config or read_run_config(run_dir)
    if config.task != "causal-lm" or config.method != "qalora" or not is_gguf(config.model.path):
        return None
    out = run_dir / MERGED_GGUF
    adapter = run_dir / "adapter"
    newest = max((f.stat().st_mtime for f in adapter.iterdir() if f.is_file()), default=0.0)
    if out.is_file() and out.stat().st_mtime >= newest:
        return out
    model, _, _ = load_trained(run_dir)
    lorakit.merge_(model)  # exact: into the INT-N offsets
    lorakit.export_gguf(model, out, template=config.model.path or default_gguf_path(), merged=str(adapter))
    return out


def calibration_batches(examples, n: int = 32) -> list[torch.Tensor]:
    """GPTQ calibration input_ids (1, T) from the first `n` training examples."""
    return [torch.tensor(e.input_ids)[None] for e in examples[:n]]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
        examples = batching.pack(examples, config.data.max_tokens)
    if config.data.group_by_length:
        order = batching.length_grouped_batches(examples, batch_size, t.seed, epoch)
    else:
        order = batching.random_batches(len(examples), batch_size, t.seed, epoch)
    return [[examples[i] for i in batch] for batch in order]


def batch_inputs(rows, pad_id: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> dict:
    """Tensors for one micro-batch on `device`; `dtype` is the compute dtype (a packed row's 4-D mask must
    match it)."""
    from lorakit.data import batching

    batch = batching.collate(rows, pad_id, dtype)
    if device is not None and device.type != "cpu":
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return batch


def micro_loss(model, batch: dict, share_prefix: bool = True) -> torch.Tensor:
    from lorakit.tasks.losses import causal_lm_loss

    extra = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                          share_prefix=share_prefix, **extra)


def count_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# What one more evaluation batch costs beyond its tokens, in padded tokens: a forward reads every weight once
# whatever the batch holds (SmolLM2-135M on 2 cores: ~0.1 s for 1 row, as long as ~60 more tokens take).
BATCH_COST = 64


def evaluation_batches(lengths: list[int], batch_tokens: int, batch_cost: int = BATCH_COST) -> list[list[int]]:
    """Indices of rows in length order, cut into consecutive batches of at most `batch_tokens` padded tokens
    (rows x the batch's longest row; a longer row alone) that minimise the padded tokens computed plus
    `batch_cost` per batch.

    Over the rows sorted by length, l_1 <= ... <= l_n, with C(0) = 0:
        C(j) = min over i < j with (j - i) * l_j <= batch_tokens (or j - i = 1) of C(i) + (j - i) * l_j + batch_cost
    (a batch of rows i+1..j pads to its longest, l_j). O(n x batch_tokens / l) steps. Cutting greedily at the
    token cap instead padded 16% of the embedded validation rows' computed tokens; this pads 6%.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [max(1, lengths[i]) for i in order]
    cost = [0] + [float("inf")] * len(order)  # cost[j]: the cheapest cut of the j shortest rows
    first = [0] * (len(order) + 1)  # first[j]: where the last batch of that cut begins
    for j in range(1, len(order) + 1):
        longest = sorted_lengths[j - 1]
        for i in range(max(0, j - max(1, batch_tokens // longest)), j):
            c = cost[i] + (j - i) * longest + batch_cost
            if c < cost[j]:
                cost[j], first[j] = c, i
    batches, j = [], len(order)
    while j:
        batches.append(order[first[j]:j])
        j = first[j]
    return batches[::-1]


@torch.no_grad()
def evaluate(model, examples, pad_id: int, batch_tokens: int = 2048, world=None, loss_fn=micro_loss,
             hold: bool = True) -> float:
    """Token-weighted mean loss over `examples` (exp of it is the perplexity), in length-sorted batches of at
    most `batch_tokens` padded tokens; with several processes each evaluates every P-th batch and the sums are
    all-reduced. `hold`: inside `dequantize_once` (when the copies fit in half the free memory) each layer's
    weight with its adapter merged is built once for all batches, and a prompt prefix every row shares is
    computed once. On a CPU in bf16/fp16, short queries are attended in float32 as in training
    (`lorakit.kernels.attention`), so a run's validation and a later `evaluate` agree."""
    from lorakit.kernels.attention import float32_attention
    from lorakit.quant.linear import dequantize_once_if_it_fits
    from lorakit.training.distributed import World

    world = world or World()
    was_training = model.training
    model.eval()
    batches = evaluation_batches([len(e.input_ids) for e in examples], batch_tokens)
    total, count = 0.0, 0
    dtype = compute_dtype(model)
    mine = batches[world.rank::world.size]
    with dequantize_once_if_it_fits(model, dtype) if hold else contextlib.nullcontext(), float32_attention(model):
        for i in range(-(-len(batches) // world.size)):  # as many forwards on every process (FSDP gathers in each)
            index = mine[i] if i < len(mine) else batches[0][:1]  # no batch left here: one row, not counted
            batch = batch_inputs([examples[j] for j in index], pad_id, dtype, world.device)
            n = count_loss_tokens(batch) if i < len(mine) else 0
            loss = loss_fn(model, batch)
            if n:
                total += loss.item() * n
                count += n
    total, count = world.sum(total, count)
    model.train(was_training)
    return total / max(count, 1)
