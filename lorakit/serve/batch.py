"""The rows a server decodes together: one KV cache, left-padded, that rows join and leave between steps.

Per row i the batch keeps its adapter name and the attention mask of its cached positions:

    cache layer keys / values   (B, kv_heads, L, head_dim)    row i's tokens right-aligned, padding on the left
    mask                        (B, L) long                    1 where a real token is cached
    next position of row i      mask[i].sum()                  (rotary positions count real tokens only)

    join(prompts):  prefill the new prompts as their own left-padded batch (their adapters routed per row),
                    left-pad the shorter of the two caches to the longer one's L, concatenate along B.
    step(tokens):   one token per row: (B, 1) in, mask gains a column of ones, (B, vocab) logits out.
    keep(rows):     drop the other rows, then the left columns no remaining row uses.

Every forward runs inside `mixed_adapters(model, names)`: one base GEMM for the batch, one adapter GEMM
pair per adapter present (lorakit.adapters.mixed). Only full-attention `DynamicLayer` caches are
supported (padding a sliding-window cache on the left would shift its window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.mixed import mixed_adapters


class Batch:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.names: list[str | None] = []  # adapter per row (None: the base)
        self.cache = None  # transformers DynamicCache, or None while the batch is empty
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (B, L)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def length(self) -> int:
        """L: cached positions per row, padding included."""
        return self.mask.shape[1]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, names) -> torch.Tensor:
        with mixed_adapters(self.model, names):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].float()  # (n, vocab)

    def join(self, prompts: list[list[int]], names: list[str | None]) -> torch.Tensor:
        """Prefill `prompts` (token ids) for adapters `names` and add them as the last rows; (n, vocab) logits."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (n, width)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, names)
        kinds = {type(layer).__name__ for layer in cache.layers}
        if kinds != {"DynamicLayer"}:
            raise ValueError(f"lorakit serve batches models with full-attention KV caches only; this model's cache "
                             f"has {sorted(kinds)} layers (sliding-window attention)")
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            length = max(self.length, width)
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
                mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
            self.mask = torch.cat([F.pad(self.mask, (length - self.length, 0)), F.pad(mask, (length - width, 0))])
        self.names += names
        return logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; (B, vocab) logits for the next ones."""
        assert len(tokens) == len(self), (len(tokens), len(self))
        positions = self.mask.sum(-1, keepdim=True)  # (B, 1): real tokens so far
        self.mask = F.pad(self.mask, (0, 1), value=1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        return self._forward(ids, self.mask, positions, self.cache, self.names)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); then drop the left columns that are padding in every row."""
        if not rows:
            self.names, self.cache = [], None
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask = self.mask[index]
        self.names = [self.names[i] for i in rows]
        unused = int((self.mask.cumsum(-1) == 0).all(0).sum())  # leading columns with no real token in any row
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, unused:]
            layer.values = layer.values[index, :, unused:]


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, heads, L, d) -> (B, heads, length, d), zeros on the left of the position dimension."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))
