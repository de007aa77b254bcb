"""The configuration of a `lorakit train` run, resolved one way:

    dataclass defaults  ->  YAML file  ->  `key=value` overrides  ->  RunConfig  ->  run_dir/config.yaml

    config = load_config("run.yaml", ["train.lr=1e-4", "adapter.target_modules=[q_proj,v_proj]"])
    save_config(config, Path(config.output_dir) / RUN_CONFIG_FILE)
    config = read_run_config(run_dir)      # what merge, export and eval read back

A file mirrors the dataclasses: top-level `method` and `output_dir`, and one mapping per section.

    method: qalora
    model: {path: null, dtype: auto}       # null: the embedded SmolLM2-135M-Instruct GGUF
    adapter: {r: 16, alpha: 32, target_modules: all-linear}
    train: {steps: 200, lr: 2e-4}

Values, in the file and in overrides, are YAML (`model.path=null`, `train.packing=true`) with one
change from YAML 1.1: an exponent without a dot (`1e-4`) is a number, not the string "1e-4".
Every key and value is checked where it enters: an unknown key names the closest valid one, a
wrong value names its key and what it may be (the field's type, `Literal` choices and bounds).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.adapters.config import LoraConfig, finite
from lorakit.io import write_text

RUN_CONFIG_FILE = "config.yaml"


def _setting(default: Any, **bounds: float | str | bool) -> Any:
    """A field with bounds on its value: ge (>=), gt (>), lt (<); `what` replaces the generated description;
    `empty=True` lets a list be empty."""
    return field(default=default, metadata=bounds)


@dataclass
class ModelConfig:
    """The base model: a local Hugging Face directory, a .gguf file, or None for the embedded default
    (SmolLM2-135M-Instruct, Q4_1 GGUF). `dtype` "auto" picks the hardware's compute dtype."""

    path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        _validate(self, "model")


@dataclass
class DataConfig:
    """Training text. `train`: a JSONL, CSV or Parquet file, or None for the embedded dataset of
    standard-library docstring pairs. `valid`: a file, or None to hold out `valid_fraction` of
    `train` (the embedded dataset has its own held-out modules). `shape` "auto" infers text,
    instruction or chat rows from the columns. `max_tokens` truncates each example; `packing`
    concatenates examples into rows of `max_tokens`; `train_on_prompt` keeps the loss on prompts;
    `group_by_length` batches rows of similar lengths (less padding; as good a fine-tune as random batches
    with a constant lr in `benchmarks/bench_quality.py`), or uniformly random rows when false.

    For image tasks, `train`/`valid` name an ImageFolder directory, an IDX file or "fashion-mnist"
    (image-classification; `lorakit.tasks.image_classification`) or a YOLO data.yaml (object-detection);
    `image_size` overrides the model's input size, `augment` turns training augmentation on or off, and
    `max_examples` / `max_valid_examples` take a seeded random subset of the training / validation images."""

    train: str | None = None
    valid: str | None = None
    valid_fraction: float = _setting(0.05, ge=0, lt=1)
    shape: Literal["auto", "text", "instruction", "chat"] = "auto"
    max_tokens: int = _setting(512, ge=2)
    train_on_prompt: bool = False
    packing: bool = False
    group_by_length: bool = True
    image_size: int | None = _setting(None, ge=16)
    augment: bool = True
    max_examples: int | None = _setting(None, ge=1)
    max_valid_examples: int | None = _setting(None, ge=1)

    def __post_init__(self) -> None:
        _validate(self, "data")


@dataclass
class AdapterConfig:
    """The adapter (see `LoraConfig`). `target_modules` null means the task's default: "all-linear" for a
    causal LM, "all-conv" for image tasks; [] with `modules_to_save` trains only those modules, in full
    (an image task always trains its new head in full). `group_size`: QA-LoRA's pooling groups, and the INT-N groups
    of a non-GGUF base, used by method qalora only. `bits` and `quant_method` ("rtn" or "gptq"): how
    qalora quantizes a base that is not already a GGUF (`IntNConfig`)."""

    r: int = _setting(16, ge=1)
    alpha: float = _setting(32.0, gt=0)
    dropout: float = _setting(0.0, ge=0, lt=1)
    target_modules: str | list[str] | None = _setting(
        None, empty=True,
        what="a regex, 'all-linear', 'all-conv', a list of module names ([]: none, with modules_to_save), or null "
             "(the task's default)")
    exclude_modules: str | list[str] | None = _setting(None, what="a regex, a non-empty list of module names, or null")
    modules_to_save: list[str] | None = _setting(None, what="a list of module names trained in full beside the adapter, or null")
    use_rslora: bool = False
    group_size: int = _setting(32, ge=1)
    bits: Literal[2, 3, 4, 5, 8] = 4
    quant_method: Literal["rtn", "gptq"] = "rtn"

    def __post_init__(self) -> None:
        _validate(self, "adapter")


@dataclass
class TrainConfig:
    """The optimisation. `steps` (optimizer steps) wins over `epochs` when set. One step sees
    batch_size * grad_accum examples. `schedule`: the lr after `warmup_steps` of linear warmup, "constant"
    by default (at a fixed budget of steps it beat decaying to 0: `benchmarks/bench_quality.py`), or "cosine" /
    "linear" decay to 0 at the last step. `max_grad_norm` 0 turns clipping off; `eval_every` 0 never
    evaluates during training; `save_every` 0 saves a checkpoint only at the end. Under torchrun,
    `batch_size` is per process and `fsdp` shards the frozen base's decoder blocks over the processes
    (`lorakit.training.fsdp`). `compile` runs the decoder blocks through torch.compile (`lorakit.training.compile`:
    pays on long runs of short rows; eager with a warning where it cannot build). `report_to` also sends the logged numbers to these trackers (`lorakit.report.trackers`;
    [] writes metrics.jsonl only)."""

    steps: int | None = _setting(None, ge=1)
    epochs: float = _setting(1.0, gt=0)
    batch_size: int = _setting(8, ge=1)
    grad_accum: int = _setting(1, ge=1)
    lr: float = _setting(2e-4, gt=0)
    weight_decay: float = _setting(0.0, ge=0)
    warmup_steps: int = _setting(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    max_grad_norm: float = _setting(1.0, ge=0)
    gradient_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    eval_every: int = _setting(50, ge=0)
    save_every: int = _setting(50, ge=0)
    log_every: int = _setting(1, ge=1)
    seed: int = _setting(0, ge=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _validate(self, "train")
        if self.compile and self.fsdp:
            raise ValueError("train.compile=true with train.fsdp=true is not supported: FSDP's sharded blocks are not "
                             "compiled by lorakit; set one of them to false")


@dataclass
class RunConfig:
    """Everything a `lorakit train` run needs. `task`: what the model learns (`lorakit.tasks`). `method`:
    "lora" (dense base), "qlora" (NF4 base), "qalora" (INT-N base and group-pooled adapter, mergeable into
    INT-N exactly), "dora" (lora's dense base, DoRA adapter: `LoraConfig.use_dora`), "qdora" (qlora's NF4
    base, DoRA adapter); null means the task's default: qalora for a causal LM, lora for image tasks. A DoRA
    adapter merges into a dense model only (`lorakit merge`), so there is no INT-N (qalora) DoRA."""

    method: Literal["lora", "qlora", "qalora", "dora", "qdora"] | None = None
    task: Literal["causal-lm", "image-classification", "object-detection"] = "causal-lm"
    output_dir: str = "runs/lorakit"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _validate(self, "")
        image_task = self.task != "causal-lm"
        if self.method is None:
            self.method = "lora" if image_task else "qalora"
        if self.adapter.target_modules is None:
            self.adapter.target_modules = "all-conv" if image_task else "all-linear"
        d, default = self.data, DataConfig()
        if image_task:
            text_only = [k for k in ("shape", "max_tokens", "train_on_prompt", "packing", "group_by_length")
                         if getattr(d, k) != getattr(default, k)]
            if text_only or self.method not in ("lora", "dora"):
                what = f"data.{text_only[0]}" if text_only else f"method={self.method}"
                raise ValueError(f"{what} does not apply to task={self.task}: image tasks train method=lora or dora "
                                 f"(a dense base); remove it" + ("" if text_only else ", or set method=lora"))
            if self.model.dtype not in ("auto", "float32"):  # the image models compute in float32 only
                raise ValueError(f"model.dtype={self.model.dtype} does not apply to task={self.task}: image tasks "
                                 f"compute in float32; remove it")
        else:
            image_only = [k for k in ("image_size", "max_examples", "max_valid_examples") if getattr(d, k) is not None]
            if image_only or not d.augment:
                name = image_only[0] if image_only else "augment"
                raise ValueError(f"data.{name} applies to image tasks only (task=image-classification or "
                                 f"object-detection); this run is task={self.task}")

    @property
    def base_method(self) -> Literal["lora", "qlora", "qalora"]:
        """The method whose base model this run trains on: dora trains on lora's, qdora on qlora's."""
        return {"dora": "lora", "qdora": "qlora"}.get(self.method, self.method)

    def lora_config(self) -> LoraConfig:
        """The adapter's `LoraConfig`; `group_size` only for qalora, `use_dora` for dora and qdora."""
        a = self.adapter
        return LoraConfig(r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=a.target_modules,
                          exclude_modules=a.exclude_modules, use_rslora=a.use_rslora, modules_to_save=a.modules_to_save,
                          group_size=a.group_size if self.method == "qalora" else None,
                          use_dora=self.method in ("dora", "qdora"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from nested mappings, as strictly as a file: unknown keys and bad values are errors.
        A section left empty in YAML (`train:` with nothing under it) keeps its defaults."""
        _check_keys(data, cls, "")
        values = dict(data)
        for name, section in _SECTIONS.items():
            if name in values:
                settings = {} if values[name] is None else values[name]
                _check_keys(settings, section, name)
                values[name] = section(**settings)
        return cls(**values)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path` (None: no file), then each `key=value` override in order.

    An error names where the bad key or value came from: the file, or the override.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    data = {} if path is None else _read_yaml_file(Path(path))
    config = _from_source(data, "the defaults" if path is None else str(path))
    for text in overrides:
        data = _merge(data, _parse_override(text))
        config = _from_source(data, f"override {text!r}")
    return config


def save_config(config: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically; `load_config(path, [])` reads it back equal."""
    header = "# lorakit train: the resolved configuration of this run (defaults <- file <- overrides)\n"
    return write_text(path, header + yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The `RunConfig` a `lorakit train` run saved in `run_dir/config.yaml`."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not the output directory of a `lorakit train` run")
    return _from_source(_read_yaml_file(path), str(path))


# -- YAML --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus floats with an exponent and no dot (1e-4), as YAML 1.2 reads them."""


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting the strings `_Loader` would read as floats (the string '1e5')."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                               list("-+0123456789."))


def _parse_yaml(text: str, where: str, *, lines: bool = True) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except ValueError as e:  # a value YAML reads but cannot build, e.g. the date 2024-13-45
        raise ValueError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid YAML: nested too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None and lines else ""
        problem = getattr(e, "problem", None) or str(e)
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and lines and context_mark is not None:
            problem += f" ({context}, from line {context_mark.line + 1})"
        raise ValueError(f"{where}{at}: not valid YAML: {problem}") from None


def _read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None
    data = _parse_yaml(text, str(path))
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of settings (e.g. 'train: {{lr: 2e-4}}'), "
                         f"got {type(data).__name__}: {data!r}")
    return data


def _parse_override(text: str) -> dict[str, Any]:
    """'train.lr=1e-4' -> {'train': {'lr': 0.0001}}; the key must be a valid dotted key or section."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"override {text!r} has no '=': write key=value, e.g. train.lr=1e-4 or model.path=null")
    if key not in _KEYS:
        raise ValueError(f"override {text!r}: {_unknown_key(key)}")
    value = _parse_yaml(raw, f"override {text!r}", lines=False)
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _from_source(data: Mapping[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# -- checks ------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a type hint (turned into a ValueError naming the key)."""


def _validate(config: Any, section: str) -> None:
    """Check each field of a config dataclass against its type hint and bounds; normalise ints to floats."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        key = f"{section}.{f.name}" if section else f.name
        given, hint = getattr(config, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(given, hint):  # a section is built by from_dict or by the caller in code
                raise TypeError(f"{key} must be of type {hint.__name__}, got {type(given).__name__}: {given!r}")
            continue
        try:
            value = [] if given == [] and f.metadata.get("empty") else _coerce(given, hint)
        except _Mismatch:
            raise ValueError(f"{key}={given!r} must be {_describe(hint, f.metadata)}{_suggest(given, hint)}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _within(value, f.metadata):
            raise ValueError(f"{key}={given!r} must be {_describe(hint, f.metadata)}")
        setattr(config, f.name, value)


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch
    if origin is list:  # a list of choices may choose none; a list of names may not be empty
        if isinstance(value, (list, tuple)) and (value or typing.get_origin(args[0]) is Literal):
            return [_coerce(v, args[0]) for v in value]
        raise _Mismatch
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool) and finite(value):
        return float(value)
    if hint is str and isinstance(value, str) and value:
        return value
    assert hint in (bool, int, float, str), f"no check for type {hint!r}"
    raise _Mismatch


def _within(value: float, bounds: Mapping[str, Any]) -> bool:
    return (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
            and value < bounds.get("lt", math.inf))


def _describe(hint: Any, bounds: Mapping[str, Any]) -> str:
    if "what" in bounds:
        return bounds["what"]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg, bounds) if arg is not type(None) else "null" for arg in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list and typing.get_origin(args[0]) is Literal:
        return f"a list of names from {list(typing.get_args(args[0]))}, or [] for none"
    if origin is list:
        return "a list of non-empty strings"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a non-empty string (quote it if YAML reads it as something else, e.g. '123' or 'no')"
    what = "an integer" if hint is int else "a number"
    if "ge" in bounds and "lt" in bounds:
        return f"{what} in [{bounds['ge']}, {bounds['lt']})"
    limits = [f"{op} {bounds[name]}" for name, op in (("ge", ">="), ("gt", ">"), ("lt", "<")) if name in bounds]
    return " ".join([what, *limits])


def _suggest(value: Any, hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Literal[...] | None: suggest from the choices
        choices = [a for a in typing.get_args(hint) if a is not type(None)]
        return _suggest(value, choices[0]) if len(choices) == 1 else ""
    if typing.get_origin(hint) is list and typing.get_origin(typing.get_args(hint)[0]) is Literal:
        choice = typing.get_args(hint)[0]
        if isinstance(value, str):
            return f" (a list, e.g. [{value}])" if value in typing.get_args(choice) else _suggest(value, choice)
        bad = [v for v in value if v not in typing.get_args(choice)] if isinstance(value, (list, tuple)) else []
        return _suggest(bad[0], choice) if bad else ""
    if typing.get_origin(hint) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, [c for c in typing.get_args(hint) if isinstance(c, str)], n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


# -- keys --------------------------------------------------------------------------------------------

_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}
_KEYS = [f.name for f in dataclasses.fields(RunConfig)]  # every valid key, dotted: 'method', 'train', 'train.lr', ...
_KEYS += [f"{name}.{f.name}" for name, section in _SECTIONS.items() for f in dataclasses.fields(section)]

# Names other libraries use (Hugging Face Trainer, PEFT) -> ours: a suggestion only, never accepted.
_SYNONYMS = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs", "rank": "r", "lora_r": "r",
             "lora_alpha": "alpha", "lora_dropout": "dropout", "per_device_train_batch_size": "batch_size",
             "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule", "max_seq_length": "max_tokens",
             "max_length": "max_tokens", "max_seq_len": "max_tokens", "cutoff_len": "max_tokens",
             "model_name_or_path": "path", "torch_dtype": "dtype", "output": "output_dir", "imgsz": "image_size",
             "img_size": "image_size", "lora_target": "target_modules"}


def _check_keys(data: Any, cls: type, section: str) -> None:
    if not isinstance(data, Mapping):
        where = section or "the configuration"
        raise ValueError(f"{where} must be a mapping of settings (e.g. 'train: {{lr: 2e-4}}'), "
                         f"got {type(data).__name__}: {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(_unknown_key(f"{section}.{key}" if section else str(key)))


def _unknown_key(key: str) -> str:
    """'unknown key ...; did you mean ...?', trying in turn: a synonym from another library, the same name
    in another section, a close name in the same section, a close dotted key (difflib)."""
    section, _, name = key.rpartition(".")
    if key in _KEYS:  # 'train.lr' written as one key in a file (or a from_dict mapping)
        return f"unknown key {key!r}: dotted keys are for overrides; in a file, nest it: '{section}: {{{name}: ...}}'"
    name = _SYNONYMS.get(name, name)
    same_name = [k for k in _KEYS if "." in k and k.rpartition(".")[2] == name]
    same_name.sort(key=lambda k: k.rpartition(".")[0] != section)  # prefer the section the user wrote
    if section in _SECTIONS:  # compare names only: the shared 'train.' prefix would make 'train.zzz' close to 'train.lr'
        names = [k.rpartition(".")[2] for k in _KEYS if k.startswith(section + ".")]
        close = [f"{section}.{n}" for n in difflib.get_close_matches(name, names, n=1, cutoff=0.5)]
    else:
        close = difflib.get_close_matches(key, _KEYS, n=1)
    if same_name or close:
        return f"unknown key {key!r}; did you mean {(same_name or close)[0]!r}?"
    if section in _SECTIONS:
        return f"unknown key {key!r}; the keys in {section!r} are {[k for k in _KEYS if k.startswith(section + '.')]}"
    return f"unknown key {key!r}; the top-level keys are {[k for k in _KEYS if '.' not in k]}"
