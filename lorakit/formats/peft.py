"""Adapter directories in Hugging Face PEFT's format, both ways.

A directory holds
    adapter_config.json          PEFT's LoraConfig (PEFT loads it with PeftModel.from_pretrained)
    adapter_model.safetensors    the adapter tensors under PEFT's keys (table below)
    lorakit.json                 what PEFT has no field for (base quantization, PiSSA conversion)

Keys are `base_model.model.<module name>` + a suffix:

    lorakit tensor                    PEFT suffix                shape
    LoraLayer linear/conv  A          .lora_A.weight             (r, in, *k)
    LoraLayer linear/conv  B          .lora_B.weight             (out, r, *1)
    LoraLayer embedding    A          .lora_embedding_A          (r, num_embeddings)
    LoraLayer embedding    B          .lora_embedding_B          (embedding_dim, r)
    DoRA magnitude m                  .lora_magnitude_vector     (out,); embedding (embedding_dim,); conv (1, out, *1)
    adapted bias (bias="lora_only")   .base_layer.bias           (out,)
    base weight (PEFT, embeddings)    .base_layer.weight         as the base; read only, copied into it
    SavedModule copy parameter p      .p  (or .modules_to_save.p) as in the module

QA-LoRA adapters (group_size g) are written in PEFT's `use_qalora` format, which PEFT applies to
GPTQ layers: PEFT feeds A the group mean times in/g, lorakit (the paper's AvgPool1d) the group
mean, so the file holds A / (in/g). With `qalora_as_lora=True` they are written instead as an
exact plain LoRA that PEFT runs on any dense base: A' = A spread over each group, divided by g.

PiSSA adapters are written as plain LoRA against the original weight W = W_res + s·B0A0:
A' = [A; A0] (2r x in), B' = [B, −B0] (out x 2r), alpha scaled so s stays the same.
Loading is strict: every tensor in the file must land in a module of the right shape, and a
PEFT feature lorakit does not implement (LoRA bias, ...) is an error naming the field. DoRA adapters
(`use_dora`) are PEFT's own layout: A and B as above plus the magnitude, on the same base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.inject import adapter_state, adapter_to_write, attach_adapter
from lorakit.io import read_json, read_safetensors, write_json, write_safetensors
from lorakit.adapters.layers import LoraLayer, SavedModule, head_like, lora_layers, saved_modules
from lorakit.adapters.walk import layer_kind, matches

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORAKIT_FILE = "lorakit.json"
CONFIG_FINGERPRINT_KEY = "lorakit.config_fingerprint"  # in the weights' safetensors metadata
PREFIX = "base_model.model."

SUFFIXES = {  # (kind is embedding, tensor) -> PEFT suffix
    (False, "A"): ".lora_A.weight",
    (False, "B"): ".lora_B.weight",
    (True, "A"): ".lora_embedding_A",
    (True, "B"): ".lora_embedding_B",
}
BIAS_SUFFIX = ".base_layer.bias"
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA's m
BASE_WEIGHT_SUFFIX = ".base_layer.weight"  # PEFT saves whole embedding weights (save_embedding_layers); loaded into the base

# Quantized-weight attributes recorded in lorakit.json, so a QLoRA / QA-LoRA adapter names its base's format.
QUANT_SETTINGS = ("quant_type", "bits", "group_size", "block_size", "double_quant", "double_quant_block_size")

# PEFT LoraConfig fields and what lorakit does with them on load.
QALORA_FIELDS = ("use_qalora", "qalora_group_size")  # read into LoraConfig.group_size
PEFT_FIELDS_MAPPED = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
                      "exclude_modules": "exclude_modules", "use_rslora": "use_rslora", "modules_to_save": "modules_to_save",
                      "bias": "bias", "use_dora": "use_dora"}
PEFT_FIELDS_IGNORED = {  # bookkeeping, or only about how PEFT initialises / wraps: no effect on loaded outputs
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "init_lora_weights", "fan_in_fan_out", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "loftq_config", "eva_config", "corda_config", "megatron_config", "megatron_core", "layer_replication",
    "ensure_weight_tying", "target_parameters", "lora_ga_config", "arrow_config", "kasa_config",
    "monteclora_config", "velora_config", "use_bdlora", "alora_invocation_tokens", "trainable_token_indices",
    "astra_config",  # peft 0.22: ASTRA initialisation (like corda_config: how A, B and the base were made)
}
PEFT_FIELDS_UNSUPPORTED = {  # field -> value that is fine; anything else changes the math and is refused
    "lora_bias": False,
}
# The fields whose values change what a loaded adapter computes: fingerprinted beside the weights.
MATH_FIELDS = (*PEFT_FIELDS_MAPPED, *QALORA_FIELDS, *PEFT_FIELDS_UNSUPPORTED, "rank_pattern", "alpha_pattern")


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None, *, qalora_as_lora: bool = False,
                 task: dict | None = None) -> Path:
    """Write adapter `name` (default: the active one) as a PEFT adapter directory; return it.

    `qalora_as_lora`: write a QA-LoRA adapter as the equivalent plain LoRA (loads in PEFT on any
    dense base) instead of PEFT's `use_qalora` format (GPTQ bases only). `task`: what the adapter was
    trained for (an image task's class names, model and input size), kept in lorakit.json.
    """
    name, config = adapter_to_write(model, name, "save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    module_names, transposed, pissa = [], False, False
    for module_name, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        adapter = layer.lora[name]
        a, b = adapter.A.detach(), adapter.B.detach()
        if adapter.is_pissa:
            a, b, pissa = torch.cat([a, adapter.A0]), torch.cat([b, -adapter.B0], dim=1), True
        if adapter.group_size is not None:
            g = adapter.group_size
            a = a.repeat_interleave(g, dim=1) / g if qalora_as_lora else a / a.shape[1]  # a.shape[1] = in/g
        emb = layer.kind == "embedding"
        tensors[PREFIX + module_name + SUFFIXES[emb, "A"]] = a
        tensors[PREFIX + module_name + SUFFIXES[emb, "B"]] = b
        if adapter.magnitude is not None:
            tensors[PREFIX + module_name + MAGNITUDE_SUFFIX] = adapter.magnitude.detach()
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[PREFIX + module_name + BIAS_SUFFIX] = layer.bias.detach()
        module_names.append(module_name)
        transposed |= layer.transposed
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.copies:
            for key, value in wrapper.copies[name].state_dict().items():
                tensors[f"{PREFIX}{module_name}.{key}"] = value
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r, alpha = (2 * config.r, config.alpha * (math.sqrt(2) if config.use_rslora else 2)) if pissa else (config.r, config.alpha)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_list(model, module_names),
        "exclude_modules": None,
        "use_rslora": config.use_rslora,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
        "fan_in_fan_out": transposed,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": config.use_dora,
        "lora_bias": False,
        "use_qalora": config.group_size is not None and not qalora_as_lora,
        "qalora_group_size": config.group_size if config.group_size is not None and not qalora_as_lora else 16,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    lorakit_meta = {
        "format_version": 1,
        "adapter_name": name,
        "config": config.to_dict(),
        "pissa_converted_to_lora": pissa,
        "qalora": None if config.group_size is None else {
            "group_size": config.group_size, "pooling": "mean (AvgPool1d)",
            "written_as": "plain LoRA (A spread over each group / g)" if qalora_as_lora else "PEFT use_qalora (A / (in/g))",
        },
        "base_weights": _describe_base(model, module_names),
        **({"task": task} if task else {}),
    }
    # Each file is written atomically; the weights (written first) record a fingerprint of the config's
    # math, so a save interrupted between the two files is caught on load instead of pairing new weights
    # with an old config.
    metadata = {"format": "pt", CONFIG_FINGERPRINT_KEY: config_fingerprint(peft_config)}
    write_safetensors(directory / WEIGHTS_FILE, tensors, metadata=metadata)
    write_json(directory / CONFIG_FILE, peft_config)
    write_json(directory / LORAKIT_FILE, lorakit_meta)
    return directory


def _target_list(model: nn.Module, module_names: list[str]) -> list[str]:
    """A PEFT target list that selects exactly these modules: their last names if those select
    nothing else in the model, else the full module names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    lora_internals = {f"{n}." for n, _ in lora_layers(model)}
    selected = {
        n for n, _ in model.named_modules()
        if matches(n, short) and not any(n.startswith(prefix) for prefix in lora_internals)
    }
    return short if selected == set(module_names) else sorted(module_names)


def _describe_base(model: nn.Module, module_names: list[str]) -> dict:
    kinds: dict[str, int] = {}
    settings = {}
    for module_name in module_names:
        weight = model.get_submodule(module_name).weight
        key = "dense" if isinstance(weight, torch.Tensor) else type(weight).__name__
        kinds[key] = kinds.get(key, 0) + 1
        if key != "dense":
            settings[key] = {k: getattr(weight, k) for k in QUANT_SETTINGS if hasattr(weight, k)}
    return {"weight_types": kinds, "quantization": settings or None}


def config_fingerprint(raw: dict) -> str:
    """SHA-256 of the adapter config's fields that change what the adapter computes (`MATH_FIELDS`); edits
    to bookkeeping such as base_model_name_or_path leave it unchanged."""
    fields = {k: raw.get(k) for k in sorted(MATH_FIELDS)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _check_pair(directory: Path, raw: dict) -> None:
    """The weights and adapter_config.json come from the same save (checked when lorakit wrote the weights)."""
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        expected = (f.metadata() or {}).get(CONFIG_FINGERPRINT_KEY)
    if expected is not None and expected != config_fingerprint(raw):
        raise ValueError(f"{directory}: {CONFIG_FILE} is not the config {WEIGHTS_FILE} was saved with (a save was "
                         f"interrupted between the two files, or r / lora_alpha / targets were edited or copied from "
                         f"another adapter); save the adapter again")


def read_peft_config(directory: str | Path) -> tuple[LoraConfig, dict]:
    """Parse adapter_config.json into a LoraConfig (+ the raw dict), refusing what would change the math."""
    raw = read_json(Path(directory) / CONFIG_FILE, "PEFT adapter config")
    if not isinstance(raw, dict):
        raise ValueError(f"{directory}/{CONFIG_FILE} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory} holds a {raw.get('peft_type')!r} adapter; lorakit loads LORA adapters only")
    for field_name, fine in PEFT_FIELDS_UNSUPPORTED.items():
        if raw.get(field_name, fine) not in (fine, None):
            raise ValueError(f"{directory}: {field_name}={raw[field_name]!r} is not supported by lorakit; "
                             f"re-train or convert the adapter without it")
    unknown = set(raw) - set(PEFT_FIELDS_MAPPED) - PEFT_FIELDS_IGNORED - set(PEFT_FIELDS_UNSUPPORTED) - set(QALORA_FIELDS)
    if unknown:
        raise ValueError(f"{directory}/{CONFIG_FILE} has fields lorakit does not know: {sorted(unknown)}; "
                         "they may change how the adapter computes, so it is refused rather than guessed")
    kwargs = {ours: raw[theirs] for theirs, ours in PEFT_FIELDS_MAPPED.items() if raw.get(theirs) is not None}
    kwargs.setdefault("target_modules", [])  # recorded only: the tensors say where the adapter goes
    if kwargs.get("bias") not in (None, "none", "lora_only"):
        raise ValueError(f"{directory}: bias={kwargs['bias']!r} is not supported (lorakit has 'none' and 'lora_only')")
    init = raw.get("init_lora_weights", True)
    kwargs["init"] = "gaussian" if init == "gaussian" else "default"
    if raw.get("use_qalora"):
        kwargs["group_size"] = raw.get("qalora_group_size")
    _check_alpha_pattern(raw.get("alpha_pattern"), directory)
    try:
        return LoraConfig(**kwargs), raw
    except ValueError as e:
        raise ValueError(f"{directory}/{CONFIG_FILE}: {e}") from None


def _check_alpha_pattern(pattern, directory) -> None:
    """PEFT's alpha_pattern: null or {module-name regex: alpha}; its values are checked where they apply."""
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise ValueError(f"{directory}/{CONFIG_FILE}: alpha_pattern={pattern!r} must be an object mapping "
                         'module-name regexes to alpha values, e.g. {"v_proj": 16}')
    for key in pattern:
        try:
            re.compile(_pattern_regex(key))
        except re.error as e:
            raise ValueError(f"{directory}/{CONFIG_FILE}: alpha_pattern key {key!r} is not a valid regex ({e})") from None


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> list[str]:
    """Load a PEFT-format adapter directory into `model` as adapter `name` (made active).

    Works on a plain model or one that already has other adapters. Returns the adapted module
    names. Every tensor must match a module of this model with the right shape; otherwise nothing
    is changed and the error names the module.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    config, raw = read_peft_config(directory)
    tensors = read_safetensors(directory / WEIGHTS_FILE, "adapter weights")
    _check_pair(directory, raw)
    state = adapter_state(model)
    if state.merged:
        raise RuntimeError("the model has merged adapters: call lorakit.unmerge_(model) before loading another")
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; load it under another name=...")

    layers, biases, saved, base_weights = _group_tensors(tensors, config)
    per_module = {}
    for module_name, ab in layers.items():
        module = _module(model, module_name, directory)
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(f"{directory}: {module_name} is a {type(module).__name__}, which lorakit cannot adapt")
        if "m" in ab and not config.use_dora:
            raise ValueError(f"{directory}: {module_name} has a DoRA magnitude ({MAGNITUDE_SUFFIX[1:]}) but {CONFIG_FILE} "
                             "says use_dora=false; the two files do not belong together")
        if set(ab) != {"A", "B", *("m" if config.use_dora else "")}:
            missing = sorted({"A", "B", *("m" if config.use_dora else "")} - set(ab))
            raise ValueError(f"{directory}: {module_name} lacks {missing} in {WEIGHTS_FILE} (m: DoRA's "
                             f"{MAGNITUDE_SUFFIX[1:]}); the file is incomplete")
        r = ab["A"].shape[0]
        alpha = _pattern_value(raw.get("alpha_pattern") or {}, module_name, config.alpha)
        try:
            per_module[module_name] = dataclasses.replace(config, r=r, alpha=alpha, init="default")
        except ValueError as e:
            raise ValueError(f"{directory}/{CONFIG_FILE}: alpha_pattern gives {module_name} {e}") from None
        _check_shapes(module, module_name, ab, r, directory, config.group_size)
        if config.group_size is not None:
            ab["A"] = ab["A"] * ab["A"].shape[1]  # PEFT's use_qalora A = lorakit's A / (in/g)
    for module_name, bias in biases.items():
        module = _module(model, module_name, directory)
        if module_name not in layers or getattr(module, "bias", None) is None or module.bias.shape != bias.shape:
            raise ValueError(f"{directory}: bias for {module_name} {tuple(bias.shape)} does not fit the model's layer")
    for module_name, weight in base_weights.items():
        module = _module(model, module_name, directory)
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.shape != weight.shape:
            raise ValueError(f"{directory}: base weight for {module_name} {tuple(weight.shape)} does not fit the model's layer")
    saved_names, starts = list(saved), {}
    for module_name, values in saved.items():
        module = _module(model, module_name, directory)
        target = module.original if isinstance(module, SavedModule) else module
        expected = target.state_dict()
        resized = head_like(target, values)  # a head for another class set than the base's
        if resized is not None:
            starts[module_name] = resized
            expected = resized.state_dict()
        for key, value in values.items():
            if key not in expected or expected[key].shape != value.shape:
                got = tuple(expected[key].shape) if key in expected else "missing"
                raise ValueError(f"{directory}: {module_name}.{key} {tuple(value.shape)} does not match the model ({got})")
    if not layers and not saved:
        raise ValueError(f"{directory}/{WEIGHTS_FILE} holds no LoRA tensors and no module trained in full")

    attach_adapter(model, name, config, list(layers), saved_names, per_module, starts)
    with torch.no_grad():
        for module_name, ab in layers.items():
            adapter = model.get_submodule(module_name).lora[name]
            adapter.A.copy_(ab["A"])
            adapter.B.copy_(ab["B"])
            if "m" in ab:
                adapter.magnitude.copy_(ab["m"])
        for module_name, bias in biases.items():
            model.get_submodule(module_name).bias.copy_(bias)
        for module_name, weight in base_weights.items():
            model.get_submodule(module_name).weight.copy_(weight)
        for module_name, values in saved.items():
            copy = model.get_submodule(module_name).copies[name]
            copy.load_state_dict({**copy.state_dict(), **values})
    return list(layers)


def _group_tensors(tensors: dict[str, torch.Tensor], config: LoraConfig):
    layers: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    suffix_to_ab = {suffix: ab for (_, ab), suffix in SUFFIXES.items()}
    saved_patterns = config.modules_to_save or []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"unexpected key {key!r} in {WEIGHTS_FILE}: PEFT keys start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        for suffix, ab in suffix_to_ab.items():
            if rest.endswith(suffix):
                layers.setdefault(rest[: -len(suffix)], {})[ab] = value
                break
        else:
            if rest.endswith(MAGNITUDE_SUFFIX):
                layers.setdefault(rest[: -len(MAGNITUDE_SUFFIX)], {})["m"] = value
                continue
            if rest.endswith(BIAS_SUFFIX):
                biases[rest[: -len(BIAS_SUFFIX)]] = value
                continue
            if rest.endswith(BASE_WEIGHT_SUFFIX):
                base_weights[rest[: -len(BASE_WEIGHT_SUFFIX)]] = value
                continue
            module_name, key_in_module = _split_saved(rest.replace(".modules_to_save.", "."), saved_patterns)
            if module_name is None:
                raise ValueError(f"{WEIGHTS_FILE} has tensor {key!r} that lorakit does not know "
                                 "(LoRA biases and other PEFT variants are not supported)")
            saved.setdefault(module_name, {})[key_in_module] = value
    return layers, biases, saved, base_weights


def _split_saved(rest: str, patterns: list[str]) -> tuple[str | None, str]:
    parts = rest.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if any(head == p or head.endswith("." + p) for p in patterns):
            return head, ".".join(parts[i:])
    return None, rest


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: dict, module_name: str, default: float) -> float:
    for key, value in pattern.items():
        if re.match(_pattern_regex(key), module_name):
            return value
    return default


def _module(model: nn.Module, module_name: str, directory: Path) -> nn.Module:
    try:
        return model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"{directory} was saved for another model: it has weights for {module_name!r}, "
                         "which this model does not have") from None


def _check_shapes(module: nn.Module, module_name: str, ab: dict[str, torch.Tensor], r: int, directory: Path,
                  group_size: int | None) -> None:
    probe = module if isinstance(module, LoraLayer) else LoraLayer(module)
    n_in, n_out = probe.in_out
    if group_size is not None:
        if n_in % group_size:
            raise ValueError(f"{directory}: qalora_group_size={group_size} does not divide {module_name}'s input size {n_in}")
        n_in //= group_size
    kernel = tuple(probe.base_layer.kernel_size) if probe.kind.startswith("conv") else ()
    expected = {"A": (r, n_in, *kernel), "B": (n_out, r, *(1 for _ in kernel)),
                "m": (1, n_out, *(1 for _ in kernel)) if kernel else (n_out,)}
    for key, shape in expected.items():
        if key in ab and tuple(ab[key].shape) != shape:
            what = MAGNITUDE_SUFFIX[1:] if key == "m" else f"lora_{key}"
            raise ValueError(f"{directory} was saved for another model: {what} of {module_name} has shape "
                             f"{tuple(ab[key].shape)}, this model's layer needs {shape}")
