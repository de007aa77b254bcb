"""Write a (merged) model as a GGUF file llama.cpp runs, and a LoRA adapter as a llama.cpp adapter file.

`export_gguf(model, path, template=...)` writes the model into the layout of a *template* GGUF: the
file the model was loaded from (`load_gguf` remembers it), or the GGUF a Hugging Face copy was
converted from (the embedded default model's). Metadata (tokenizer, chat template, architecture
keys, alignment) is copied from the template, tensors keep its order and names, plus
``general.lorakit.merged`` naming what was merged in. Each tensor is written by the first rule that
applies:

    model weight                                    template type     written as                    error
    dense, equal to the template's dequantized      any               the template's bytes          0
    values
    IntNWeight, 4 / 5 bits, group 32, scales fp16,  Q4_0 / Q5_0       Q4_0 / Q5_0 (codes, d)        0
    offset = −2^(bits−1)·scale (symmetric)
    IntNWeight, 8 bits, group 32, symmetric         Q8_0              Q8_0                          0
    IntNWeight, 4 / 5 bits, group 32                any               Q4_1 / Q5_1: q, d = scale,    fp16 rounding of
                                                                      m = offset                    d and m
    anything else                                   F32 / F16 / BF16  that type                     0 / rounding
                                                    a block type      that type, re-quantized by    measured
                                                                      gguf.quants (Q4_K -> Q4_1,
                                                                      Q5_K -> Q5_1, Q6_K -> Q8_0)

So a file loaded with `load_gguf` and written back untouched is byte-identical per tensor, and after
a QA-LoRA `merge_` only the offsets m of the adapted tensors change (by the update, then rounded to
fp16). The returned `GGUFExportReport` lists every tensor's rule and the largest absolute weight
error it introduced; nothing lossy happens silently.

`export_gguf_adapter(model, path, template=...)` writes the active adapter in llama.cpp's LoRA
adapter format (``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; tensors
``<base tensor>.lora_a`` (r, in) and ``.lora_b`` (out, r), float32), which llama.cpp adds on top of a
base GGUF at load time (``--lora``). llama.cpp scales B A by alpha / r, so alpha is written as
scaling · r. A QA-LoRA adapter becomes the exact plain LoRA A' = A spread over each group / g. A DoRA
adapter has no llama.cpp adapter form (its magnitude rescales W's rows) and is refused: merge it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.formats import gguf_blocks
from lorakit.formats.gguf_load import (
    DENSE_TYPES,
    dense_values,
    decode_tensor,
    field_value,
    gguf_source,
    read_gguf,
    tensor_shape,
)
from lorakit.formats.gguf_names import CARRIED, check_architecture, hf_name, rope_heads, rope_perm
from lorakit.io import atomic_write
from lorakit.quant.linear import dense_weight

# What a K-quant (which lorakit reads but does not write) is written as.
K_EXPORT = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
OFFSET_TYPE = {4: "Q4_1", 5: "Q5_1"}
SYMMETRIC_TYPE = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
MERGED_KEY = "general.lorakit.merged"


@dataclass
class TensorExport:
    name: str
    type_in: str
    type_out: str
    rule: str            # "copied", "codes kept", "offsets moved", "re-quantized", "dense"
    max_abs_error: float  # largest |written − model| over the tensor's weights


@dataclass
class GGUFExportReport:
    path: Path
    tensors: list[TensorExport] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(t.max_abs_error == 0 for t in self.tensors)

    @property
    def max_abs_error(self) -> float:
        return max((t.max_abs_error for t in self.tensors), default=0.0)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.rule] = out.get(t.rule, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"GGUF export {self.path}: {len(self.tensors)} tensors, "
                 + ", ".join(f"{n} {rule}" for rule, n in sorted(self.counts().items()))
                 + f"; largest weight error {self.max_abs_error:.3g}"]
        worst = sorted((t for t in self.tensors if t.max_abs_error > 0), key=lambda t: -t.max_abs_error)[:5]
        for t in worst:
            lines.append(f"  {t.name}: {t.type_in} -> {t.type_out} ({t.rule}), max |error| {t.max_abs_error:.3g}")
        changed = [t for t in self.tensors if t.type_in != t.type_out]
        if changed:
            lines.append(f"  {len(changed)} tensors changed type, e.g. {changed[0].name}: "
                         f"{changed[0].type_in} -> {changed[0].type_out}")
        return "\n".join(lines)


def _template_path(model: nn.Module, template) -> Path:
    if template is not None:
        return Path(template).expanduser()
    source = gguf_source(model)
    if source is None:
        raise ValueError("export_gguf needs a template GGUF for the metadata (tokenizer, architecture): the model was "
                         "not loaded with lorakit.load_gguf, so pass template= the GGUF it was converted from (for "
                         "the embedded default model: lorakit.models.default_gguf_path())")
    return source.path


def _check_not_template(model: nn.Module, template, path, overwrite: bool) -> None:
    source = _template_path(model, template)
    out = Path(path).expanduser()
    if not overwrite and out.exists() and out.resolve() == Path(source).resolve():
        raise ValueError(f"{out} is the GGUF file this export reads from (the base); nothing was written. Write to "
                         f"a new file, or replace the base with overwrite=True (lorakit export: --force)")


def _open_template(model: nn.Module, template):
    """(reader, architecture, permutes RoPE rows, n_head, n_head_kv) of the template GGUF."""
    path = _template_path(model, template)
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture")
    _, permutes = check_architecture(arch, str(path))
    n_head = int(field_value(reader, f"{arch}.attention.head_count"))
    return reader, arch, permutes, n_head, int(field_value(reader, f"{arch}.attention.head_count_kv", n_head))


def _check_merged(model: nn.Module) -> None:
    from lorakit.adapters.layers import lora_layers

    pending = [name for name, layer in lora_layers(model) if layer.adapter() is not None]
    if pending:
        raise ValueError(f"{len(pending)} layers still carry an unmerged adapter (e.g. {pending[0]}): call "
                         f"lorakit.merge_(model) first, or export the adapter alone with export_gguf_adapter")


def _model_weight(model: nn.Module, hf: str):
    """The model's current value for parameter `hf`: a Tensor or a quantized weight module."""
    module_name, _, attr = hf.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if getattr(module, "is_lora_layer", False):
        module = module.base_layer
    value = getattr(module, attr, None)
    return value


def export_gguf(model: nn.Module, path: str | os.PathLike, *, template: str | os.PathLike | None = None,
                merged: str | None = None, overwrite: bool = False) -> GGUFExportReport:
    """Write `model` (adapters merged) as a GGUF file in `template`'s layout; see the module docstring.
    Writing over the template itself (the base being fine-tuned) needs `overwrite=True`."""
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    _check_merged(model)
    _check_not_template(model, template, path, overwrite)
    reader, arch, permutes, n_head, n_head_kv = _open_template(model, template)
    path = Path(path).expanduser()
    report = GGUFExportReport(path)
    tensors: list[tuple[str, np.ndarray, GGMLQuantizationType]] = []
    for t in reader.tensors:
        qin = t.tensor_type.name
        if t.name in CARRIED:
            tensors.append((t.name, np.asarray(t.data), t.tensor_type))
            report.tensors.append(TensorExport(t.name, qin, qin, "copied", 0.0))
            continue
        value = _model_weight(model, hf_name(t.name))
        if value is None or (isinstance(value, torch.Tensor) and value.is_meta):
            raise ValueError(f"the model has no {hf_name(t.name)} for the template's tensor {t.name}: is the template "
                             f"the GGUF of this model's architecture?")
        heads = rope_heads(t.name, permutes, n_head, n_head_kv)
        data, qout, rule, err = _encode(t, value, heads)
        tensors.append((t.name, data, GGMLQuantizationType[qout]))
        report.tensors.append(TensorExport(t.name, qin, qout, rule, err))
    tensors += _untied_head(model, reader, report, tensors)

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), arch)
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", MERGED_KEY):
                continue
            if key == "general.alignment":
                writer.data_alignment = int(f.contents())
            sub = GGUFValueType(f.types[-1]) if f.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), GGUFValueType(f.types[0]), sub_type=sub)
        if merged:
            writer.add_key_value(MERGED_KEY, merged, GGUFValueType.STRING)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return report


def _encode(t, value, heads: int | None) -> tuple[np.ndarray, str, str, float]:
    """(data, type written, rule, max abs error) for one template tensor `t` and the model's `value`."""
    from lorakit.quant.intn import IntNWeight

    qin = t.tensor_type.name
    perm = None if heads is None else rope_perm(tensor_shape(t)[0], heads)
    if isinstance(value, IntNWeight) and value.group_size == gguf_blocks.BLOCK and value.bits in (4, 5, 8):
        codes, scale, offset = (x.detach().cpu().numpy() for x in (value.q(), value.scale, value.offset))
        if perm is not None:
            codes, scale, offset = codes[perm], scale[perm], offset[perm]
        d = scale.astype(np.float16)
        symmetric = np.array_equal(offset, np.float32(-(1 << (value.bits - 1))) * d.astype(np.float32))
        exact_d = np.array_equal(d.astype(np.float32), scale)
        sym_type = SYMMETRIC_TYPE[value.bits]
        if exact_d and symmetric and (qin == sym_type or value.bits == 8):
            blocks = gguf_blocks.Blocks(np.ascontiguousarray(codes), d, None)
            return _checked(gguf_blocks.encode(blocks, sym_type), sym_type, qin, "codes kept", value, perm, t)
        if value.bits in OFFSET_TYPE:
            qout = OFFSET_TYPE[value.bits]
            blocks = gguf_blocks.Blocks(np.ascontiguousarray(codes), d, offset.astype(np.float16))
            return _checked(gguf_blocks.encode(blocks, qout), qout, qin, _offset_rule(t, qout, blocks), value, perm, t)
    dense = dense_weight(value, torch.float32).detach().cpu().numpy()
    if perm is not None:
        dense = dense[perm]
    if qin not in DENSE_TYPES:
        kind, decoded = decode_tensor(t)
        if np.array_equal(dense_values(kind, decoded, t.tensor_type), dense):
            return np.asarray(t.data), qin, "copied", 0.0
    return _quantize(dense, K_EXPORT.get(qin, qin))


def _offset_rule(t, qout: str, blocks: gguf_blocks.Blocks) -> str:
    """How a Q4_1 / Q5_1 write relates to the template tensor: same bytes, only m moved, or re-encoded."""
    if t.tensor_type.name != qout:
        return "re-encoded"
    old = decode_tensor(t)[1]
    if not (np.array_equal(old.codes, blocks.codes) and np.array_equal(old.d, blocks.d)):
        return "re-encoded"
    return "codes kept" if np.array_equal(old.m, blocks.m) else "offsets moved"


def _checked(data, qout, qin, rule, value, perm, t) -> tuple[np.ndarray, str, str, float]:
    """Measure the written tensor against the model's weights (float32, GGUF row order)."""
    want = value.dequantize(torch.float32).cpu().numpy()
    if perm is not None:
        want = want[perm]
    got = gguf_blocks.dequantize(gguf_blocks.decode(data, qout, want.shape), qout)
    return data, qout, rule, float(np.abs(got - want).max()) if want.size else 0.0


def _quantize(dense: np.ndarray, qout: str) -> tuple[np.ndarray, str, str, float]:
    from gguf import GGMLQuantizationType, quants

    if qout == "F32":
        return dense.astype(np.float32), qout, "dense", 0.0
    if qout == "F16":
        data = dense.astype(np.float16)
        return data, qout, "dense", float(np.abs(data.astype(np.float32) - dense).max())
    if qout == "BF16":
        data = quants.quantize(dense, GGMLQuantizationType.BF16)
        back = quants.dequantize(data, GGMLQuantizationType.BF16).reshape(dense.shape)
        return data, qout, "dense", float(np.abs(back - dense).max())
    qtype = GGMLQuantizationType[qout]
    try:
        data = quants.quantize(dense, qtype)
    except NotImplementedError:
        raise ValueError(f"cannot write {qout}: gguf.quants has no quantizer for it") from None
    back = quants.dequantize(data, qtype).reshape(dense.shape)
    return data, qout, "re-quantized", float(np.abs(back - dense).max())


def _untied_head(model, reader, report, tensors) -> list:
    """A head that a dense merge untied from the embedding gets its own output.weight (type of token_embd)."""
    names = {t.name for t in reader.tensors}
    if "output.weight" in names or "token_embd.weight" not in names:
        return []
    head = _model_weight(model, "lm_head.weight")
    embed = _model_weight(model, "model.embed_tokens.weight")
    if head is None or head is embed or (isinstance(head, torch.Tensor) and isinstance(embed, torch.Tensor)
                                         and head.data_ptr() == embed.data_ptr()):
        return []
    qin = next(t for t in reader.tensors if t.name == "token_embd.weight").tensor_type.name
    data, qout, rule, err = _quantize(dense_weight(head, torch.float32).detach().cpu().numpy(), K_EXPORT.get(qin, qin))
    report.tensors.append(TensorExport("output.weight", "(tied)", qout, rule, err))
    from gguf import GGMLQuantizationType

    return [("output.weight", data, GGMLQuantizationType[qout])]


def export_gguf_adapter(model: nn.Module, path: str | os.PathLike, *, template: str | os.PathLike | None = None,
                        name: str | None = None) -> Path:
    """Write adapter `name` (default: active) as a llama.cpp LoRA adapter GGUF; see the module docstring."""
    from gguf import GGUFWriter

    from lorakit.formats.gguf_names import gguf_name
    from lorakit.adapters.inject import adapter_to_write
    from lorakit.adapters.layers import lora_layers, saved_modules

    name, config = adapter_to_write(model, name, "export_gguf_adapter")
    if config.use_dora:
        raise ValueError(
            f"adapter {name!r} is DoRA: a llama.cpp adapter adds alpha/r · B A to W and has no form for DoRA's "
            "per-row rescaling m / ||W + ΔW||. Merge it and export the model instead: lorakit.merge_ (dense base) or "
            "lorakit.dequantize_and_merge_ (NF4 base), then export_gguf (CLI: lorakit export RUN --format gguf), or "
            "keep it as a PEFT adapter (save_adapter; --format peft)")
    _check_not_template(model, template, path, overwrite=False)
    if any(name in w.copies for _, w in saved_modules(model)):
        raise ValueError(f"adapter {name!r} trains whole modules (modules_to_save={config.modules_to_save}); a llama.cpp "
                         f"adapter holds only LoRA pairs: export the merged model with export_gguf instead")
    reader, arch, permutes, n_head, n_head_kv = _open_template(model, template)
    base_names = {t.name for t in reader.tensors}
    pairs, scalings, ranks = [], set(), set()
    for module_name, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        adapter = layer.lora[name]
        target = gguf_name(f"{module_name}.weight")
        if layer.kind != "linear" or layer.transposed or target not in base_names:
            raise ValueError(f"{module_name} ({layer.kind}) has no llama.cpp adapter form: llama.cpp applies LoRA to "
                             f"the linear weights of a {arch} model; drop it from target_modules")
        if adapter.is_pissa:
            raise ValueError("a PiSSA adapter changed the base weights: export the merged model with export_gguf")
        a = adapter.A.detach().float()
        if adapter.group_size is not None:  # QA-LoRA -> exact plain LoRA: A' = A spread over each group / g
            a = a.repeat_interleave(adapter.group_size, dim=1) / adapter.group_size
        b = adapter.B.detach().float().cpu().numpy()
        heads = rope_heads(target, permutes, n_head, n_head_kv)
        if heads:
            b = b[rope_perm(b.shape[0], heads)]
        pairs.append((target, np.ascontiguousarray(a.cpu().numpy()), np.ascontiguousarray(b)))
        scalings.add(adapter.scaling)
        ranks.add(adapter.r)
    if not pairs:
        raise ValueError(f"adapter {name!r} adapts no layer")
    if len(scalings) > 1 or len(ranks) > 1:
        raise ValueError(f"adapter {name!r} has several scalings {sorted(scalings)} / ranks {sorted(ranks)}; a llama.cpp "
                         f"adapter has one alpha and llama.cpp scales every pair by alpha / r")
    alpha = scalings.pop() * ranks.pop()  # llama.cpp: scale = alpha / r, r = lora_a's rows

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("general.name", f"lorakit adapter {name}")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for target, a, b in pairs:
            writer.add_tensor(f"{target}.lora_a", a)
            writer.add_tensor(f"{target}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(Path(path).expanduser(), write)
