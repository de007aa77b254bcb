"""`LoraConfig`: the hyperparameters of one LoRA adapter.

LoRA (Hu et al., 2021) freezes a weight W (out x in) and learns a low-rank update

    ΔW = scaling · B A,   A: (r x in),  B: (out x r),  scaling = alpha / r
                                                     (alpha / sqrt(r) with use_rslora)

so a layer computes y = W x + scaling · B (A dropout(x)). B starts at zero, so training starts
from the base model exactly.

DoRA (Liu et al., 2024; `use_dora=True`, PEFT's name) splits the adapted weight into a direction
and a trained magnitude m, one per output channel:

    W' = m ⊙ (W + ΔW) / ||W + ΔW||_c,   m initialised to ||W||_c (so W' = W at the start)

where ||·||_c is the L2 norm of each output channel (row of W), taken as a constant in backward
(the paper's section 4.3). See `lorakit.adapters.layers` for the forward and shapes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INITS = ("default", "gaussian", "pissa")
BIASES = ("none", "lora_only")


@dataclass
class LoraConfig:
    """Hyperparameters of one adapter; names follow the LoRA paper (`r`, `alpha`).

    Args:
        r: rank of the update, > 0.
        alpha: scale numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with
            `use_rslora`).
        dropout: dropout probability on the adapter's input, in [0, 1).
        target_modules: which layers get an adapter (PEFT's rules, see `lorakit.adapters.walk`): a regex
            matching the whole module name, a list of names or name suffixes, or "all-linear".
        exclude_modules: layers never to adapt, same rules; wins over `target_modules`.
        use_rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023).
        init: "default" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r^2), B zero), or
            "pissa" (A, B from the top-r SVD of W; W is replaced by the residual).
        modules_to_save: modules trained in full alongside the adapter (e.g. a classifier head).
        bias: "none", or "lora_only" to also train the biases of the adapted layers.
        group_size: QA-LoRA (Xu et al., 2023): the adapter sees its input averaged over groups of
            this many consecutive input columns (AvgPool1d), so A is (r x in/group_size) and
            ΔW = s·B·A·P (P averages each group) is constant inside each group. On a group-wise
            INT-N base with groups dividing this, `merge_` moves only the zeros and the merged
            model stays INT-N exactly. None: plain LoRA.
        use_dora: DoRA (Liu et al., 2024): also train a magnitude m per output channel, W' = m ⊙ (W + ΔW) /
            ||W + ΔW||_c. On linear (dense or NF4 base), GPT-2 Conv1D, embedding and convolution layers, as
            PEFT. It merges exactly into a dense weight only: not with group_size (QA-LoRA), since m / ||·||
            rescales whole rows and a merge into INT-N offsets needs an update constant in each group.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = False
    init: str = "default"
    modules_to_save: list[str] | None = None
    bias: str = "none"
    group_size: int | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check_int("r", self.r, minimum=1, hint="a typical rank is 8, 16 or 64")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not finite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} must be a positive number (a common choice is alpha = 2 * r)")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be a probability in [0, 1), e.g. 0.05")
        self.dropout = float(self.dropout)
        self.target_modules = _patterns("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if self.modules_to_save is not None:
            self.modules_to_save = _patterns("modules_to_save", self.modules_to_save, allow_none=True, allow_str=False)
        _check_choice("init", self.init, INITS)
        _check_choice("bias", self.bias, BIASES)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, minimum=1, hint="QA-LoRA uses 32, 64 or 128; None for plain LoRA")
            if self.init == "pissa":
                raise ValueError("init='pissa' cannot be combined with group_size (QA-LoRA); use init='default'")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora={self.use_rslora!r} must be true or false")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora={self.use_dora!r} must be true or false")
        if self.use_dora and self.group_size is not None:
            raise ValueError(
                f"use_dora=True cannot be combined with group_size={self.group_size} (QA-LoRA): DoRA rescales each whole "
                "output row by m / ||W + ΔW||, which is not constant inside a group, so it cannot merge into INT-N offsets "
                "(QA-LoRA's point). Use group_size=None: DoRA on a dense or NF4 base merges into a dense model "
                "(lorakit.merge_ / lorakit.dequantize_and_merge_)")
        if self.use_dora and self.init == "pissa":
            raise ValueError("use_dora=True cannot be combined with init='pissa'; use init='default' or 'gaussian'")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build from a mapping; an unknown key is an error naming the closest valid key."""
        check_keys(data, cls, "LoraConfig")
        return cls(**dict(data))


def check_keys(data: Mapping[str, Any], cls: type, what: str) -> None:
    """Reject keys that are not fields of dataclass `cls`, suggesting the nearest valid one."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a mapping of settings, got {type(data).__name__}: {data!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown {what} key {key!r}: {hint}valid keys are {valid}")


def finite(value: int | float) -> bool:
    """math.isfinite, False for an int too large for a float (10**400) instead of an OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_int(name: str, value: Any, *, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum} ({hint})")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}{hint}")


def _patterns(name: str, value: Any, *, allow_none: bool, allow_str: bool = True) -> Any:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required: a list of layer names, a regex, or 'all-linear'")
    if isinstance(value, str):
        if not allow_str:
            return [value]
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{name}={value!r} must be a string (regex) or a list of non-empty module names")

