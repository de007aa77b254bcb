"""Choosing the next token of one row, and cutting its text at stop strings.

    temperature 0:  argmax(logits)                                            greedy, deterministic
    otherwise:      p = softmax(logits / temperature); keep the smallest set of most likely tokens whose
                    mass reaches top_p (the top token always stays); draw from p renormalised on that set
                    with the request's own generator (seeded by `seed`, so a seed repeats its text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row's logits (vocab,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one occurred)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def stable_prefix(text: str, stop: tuple[str, ...]) -> str:
    """The part of an unfinished text that is safe to stream: without an incomplete UTF-8 character at the end
    and without a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[:len(text) - held]
