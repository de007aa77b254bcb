"""Examples -> batches: length grouping, packing, and collation into tensors.

Padding wastes compute: a batch of B rows is padded to its longest row T_max, so

    padding_fraction = sum_batches (B * T_max - sum_i T_i) / sum_batches (B * T_max)

Two ways to cut it:

Length grouping (`length_grouped_batches`). Shuffle all indices, cut them into mega-chunks of
50 * batch_size, sort each chunk by length, slice it into batches, then shuffle the batch order.
Rows in a batch have similar lengths; which rows meet still changes every epoch. Deterministic
in (seed, epoch). The last batch may be short.

Packing (`pack`). Concatenate whole examples into rows of at most max_tokens, greedy first-fit:
each example goes into the first row with room (a max segment tree over the rows' free space
finds it in O(log n)). Each packed row records per token its `segment` (which example, 0, 1, ...)
and `position_ids` restarting at 0 per example. `collate` turns segments into a 4-D additive mask

    mask[b, 0, i, j] = 0      if segment[b, i] == segment[b, j] and j <= i
                       min    otherwise     (min = torch.finfo(dtype).min)

so a token attends only to earlier tokens of its own example: with these position_ids each
example's logits equal those of the example run alone (tested to 1e-5 in fp32 on a Llama).
Hugging Face models (transformers >= 5) take such a (B, 1, T, T) tensor as `attention_mask` and
use it as-is: sdpa passes it to scaled_dot_product_attention as attn_mask, eager adds it to the
scores. Its dtype must be the model's compute dtype (sdpa rejects a float mask of another
dtype). A bool mask would do for sdpa but is silently wrong in eager (added as 0/1), hence float.
flash_attention_* implementations expect a 2-D padding mask, not this one: use sdpa or eager.
The first label of each segment is IGNORE: it would be "predicted" from the previous example's
last token.

    batches = length_grouped_batches(examples, batch_size=8, seed=0, epoch=0)  # list[list[int]]
    batch = collate([examples[i] for i in batches[0]], pad_id)
    # {"input_ids": (B, T), "labels": (B, T), "attention_mask": (B, T)}
    rows = pack(examples, max_tokens=2048)
    batch = collate(rows[:4], pad_id, dtype=torch.bfloat16)
    # {"input_ids", "labels", "position_ids": (B, T), "attention_mask": (B, 1, T, T) bf16}
    loss = causal_lm_loss(model, **batch)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from lorakit.data.render import IGNORE, Example

MEGA_CHUNK = 50  # batches per sorted chunk in length grouping


class Packed(NamedTuple):
    input_ids: list[int]  # (T,) several examples, concatenated
    labels: list[int]  # (T,) IGNORE on each example's first token
    position_ids: list[int]  # (T,) 0, 1, ... restarting for each example
    segment: list[int]  # (T,) 0 for the first example's tokens, 1 for the second's, ...


def length_grouped_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices into `examples`, in batches of similar lengths; the same (seed, epoch) gives the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = MEGA_CHUNK * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start: start + chunk], key=lambda i: len(examples[i].input_ids), reverse=True)
        batches += [part[k: k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices 0..n-1 shuffled and cut into batches (no length grouping); the same (seed, epoch) gives the
    same batches. Each batch pads to its longest row, so this costs more compute than length grouping."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return [order[k: k + batch_size] for k in range(0, n, batch_size)]


def pack(examples: Sequence[Example], max_tokens: int) -> list[Packed]:
    """Whole examples concatenated into rows of <= max_tokens tokens, greedy first-fit in the given order."""
    lengths = [len(e.input_ids) for e in examples]
    if 0 in lengths:
        raise ValueError(f"example {lengths.index(0)} has no tokens; drop empty examples before packing "
                         "(encode never makes them)")
    too_long = [k for k, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than max_tokens={max_tokens} (example {too_long[0]}: "
            f"{lengths[too_long[0]]} tokens); encode with the same max_tokens, which truncates them"
        )
    rows = []
    for members in _first_fit(lengths, max_tokens):
        ids, labels, positions, segment = [], [], [], []
        for s, k in enumerate(members):
            ex = examples[k]
            ids += ex.input_ids
            labels += [IGNORE] + list(ex.labels[1:])
            positions += range(len(ex.input_ids))
            segment += [s] * len(ex.input_ids)
        rows.append(Packed(ids, labels, positions, segment))
    return rows


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: item i goes into the first bin with room for lengths[i].

    free[] is a max segment tree over bins (leaves free[size + b] = room left in bin b; bins not
    yet opened have `capacity`), so the leftmost bin with room is one root-to-leaf walk."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()  # >= number of bins ever needed
    free = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def collate(rows: Sequence[Example | Packed], pad_id: int,
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one batch (labels IGNORE on padding). Example rows get a (B, T)
    attention_mask; Packed rows get position_ids and the (B, 1, T, T) block-causal mask in `dtype`."""
    if not rows:
        raise ValueError("collate needs at least one row")
    packed = [isinstance(r, Packed) for r in rows]
    if any(packed) != all(packed):
        raise ValueError("collate got packed and unpacked rows together; batch one kind at a time")
    B, T = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[b, : len(r.labels)] = torch.tensor(r.labels)
    if not packed[0]:
        lengths = torch.tensor([len(r.input_ids) for r in rows])
        attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # padding: segment -1, attends to padding only
    for b, r in enumerate(rows):
        position_ids[b, : len(r.position_ids)] = torch.tensor(r.position_ids)
        segment[b, : len(r.segment)] = torch.tensor(r.segment)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": block_causal_mask(segment, dtype)}


def block_causal_mask(segment: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive mask: 0 where key j <= query i in the same segment,
    finfo(dtype).min elsewhere. Every query sees at least itself, so no softmax row is all-masked."""
    T = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones((T, T), dtype=torch.bool).tril()  # (T, T)
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def padding_fraction(batches: Iterable[Sequence[Example | Packed]]) -> float:
    """Padded tokens / all tokens over `batches` (lists of rows), each batch padded to its longest row."""
    padded = total = 0
    for batch in batches:
        lengths = [len(r.input_ids) for r in batch]
        width = len(lengths) * max(lengths, default=0)
        padded += width - sum(lengths)
        total += width
    return padded / total if total else 0.0
