"""A GGUF file (llama.cpp) as a trainable lorakit model, without re-quantizing anything.

`load_gguf(path)` builds the Hugging Face model the file describes (config and tokenizer from its
metadata, through transformers) and fills it tensor by tensor:

    GGUF type                         becomes                                          exact?
    Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 (linear)  QuantizedLinear(IntNWeight): the file's codes,   bit for bit
                                       scale = d, offset = m (or −2^(bits−1)·d)
    Q4_K Q5_K (linear)                 IntNWeight, bits 4 / 5, group 32                 bit for bit
    Q6_K (linear)                      IntNWeight, bits 8 (codes 0..63), group 16       see gguf_kquants
    any of these, not a linear         a dense tensor: the dequantized values            bit for bit
    (the token embedding)
    F32 F16 BF16                       a dense tensor in `dtype`                        exact in float32

"Bit for bit": the INT-N weight dequantizes (scale · q + offset, float32) to exactly the values
llama.cpp's and `gguf.quants`' dequantization give. attn_q / attn_k rows are put back in Hugging
Face's RoPE order (`gguf_names`). The model remembers its file (`gguf_source(model)`), so
`export_gguf` can write it back with the file's metadata, types and tensor order.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.formats import gguf_blocks
from lorakit.formats.gguf_names import CARRIED, check_architecture, hf_name, rope_heads, rope_perm

DENSE_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
_SOURCE_ATTR = "_lorakit_gguf_source"


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF file a model came from: its path, architecture and each tensor's type name."""

    path: Path
    arch: str
    types: dict[str, str]


def gguf_source(model: nn.Module) -> GGUFSource | None:
    return getattr(model, _SOURCE_ATTR, None)


def set_gguf_source(model: nn.Module, source: GGUFSource) -> None:
    object.__setattr__(model, _SOURCE_ATTR, source)


def read_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over `path`, with a clear error for a missing, truncated or non-GGUF file."""
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError, OSError...
        raise ValueError(f"{path} cannot be read as GGUF ({type(e).__name__}: {e}); the file is truncated, "
                         f"corrupted or not a GGUF file: download or export it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes}, "
                             f"the file has {size}; download or export it again")
    return reader


def field_value(reader, key: str, default=None):
    """A metadata value as Python (str, int, float, bool or list), or `default` if the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tensor_shape(t) -> tuple[int, ...]:
    """torch-order shape of a reader tensor (GGUF's ne reversed)."""
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def decode_tensor(t) -> tuple[str, object]:
    """("blocks", Blocks) | ("k", KBlocks) | ("dense", float32 ndarray) for one reader tensor, torch order."""
    qname = t.tensor_type.name
    shape = tensor_shape(t)
    if qname in DENSE_TYPES:
        data = np.asarray(t.data)
        if qname == "BF16":  # stored as uint16 bit patterns: widen to float32 exactly
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return "dense", data.astype(np.float32).reshape(shape)
    if len(shape) != 2:
        raise ValueError(f"tensor {t.name} is {qname} with shape {shape}: lorakit reads block-quantized tensors "
                         f"as 2-D (rows, cols) weights only")
    if qname in K_TYPES:
        from lorakit.formats import gguf_kquants

        return "k", gguf_kquants.decode_k(t.data, t.tensor_type, shape)
    try:
        return "blocks", gguf_blocks.decode(t.data, t.tensor_type, shape)
    except ValueError as e:
        raise ValueError(f"tensor {t.name}: {e}") from None


def intn_parts(kind: str, decoded, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(codes uint8 (out, in), scale float32 (out, in/g), offset float32 (out, in/g), bits)."""
    if kind == "blocks":
        bits = gguf_blocks.block_type(qtype).bits
        return decoded.codes, decoded.d.astype(np.float32), gguf_blocks.implied_offset(decoded, qtype), bits
    return decoded.codes, decoded.scale, decoded.offset, decoded.bits


def dense_values(kind: str, decoded, qtype) -> np.ndarray:
    if kind == "dense":
        return decoded
    if kind == "blocks":
        return gguf_blocks.dequantize(decoded, qtype)
    from lorakit.formats import gguf_kquants

    return gguf_kquants.dequantize_k(decoded)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, quantized: bool = True,
              tokenizer: bool = True):
    """(model, tokenizer) from a llama.cpp GGUF file, the linear weights kept as the file's INT-N codes.

    `dtype`: the dtype of dense tensors and the compute dtype quantized weights dequantize to (the
    codes, scales and offsets are unaffected). `quantized=False` loads every weight dense (the
    dequantized values), for plain LoRA. `tokenizer=False` skips building the tokenizer (returns
    None for it). The model is in eval mode.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    from lorakit.quant.intn import IntNWeight
    from lorakit.quant.linear import QuantizedLinear
    from lorakit.quant.stream import _copy_into
    from lorakit.adapters.walk import replace_module

    path = Path(path).expanduser()
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture")
    model_type, permutes = check_architecture(arch, str(path))
    if tokenizer and field_value(reader, "tokenizer.ggml.model") is None:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.model field), which training and generation "
                         f"need: use a GGUF written with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes it), "
                         f"or load_gguf(..., tokenizer=False) and pass your own")
    n_head = int(field_value(reader, f"{arch}.attention.head_count"))
    n_head_kv = int(field_value(reader, f"{arch}.attention.head_count_kv", n_head))
    model = _empty_model(hf_config(reader, str(path)), dtype)
    tok = _tokenizer(path, model.config) if tokenizer else None

    unknown = [t.name for t in reader.tensors if hf_name(t.name) is None and t.name not in CARRIED]
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} have no place in a "
                         f"{arch} model; the file is not a plain {arch} model (or lorakit's name table lacks them)")
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        if t.name in CARRIED:
            continue
        name = hf_name(t.name)
        kind, decoded = decode_tensor(t)
        heads = rope_heads(t.name, permutes, n_head, n_head_kv)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if kind != "dense" and quantized and isinstance(module, nn.Linear) and attr == "weight":
            codes, scale, offset, bits = intn_parts(kind, decoded, t.tensor_type)
            if heads:
                inv = np.argsort(rope_perm(codes.shape[0], heads))
                codes, scale, offset = codes[inv], scale[inv], offset[inv]
            # 4 / 5-bit offsets are written back as fp16 m (Q4_1 / Q5_1): QA-LoRA trains against that precision
            weight = IntNWeight.from_codes(torch.from_numpy(np.ascontiguousarray(codes)),
                                           torch.from_numpy(np.ascontiguousarray(scale)),
                                           torch.from_numpy(np.ascontiguousarray(offset)), bits, dtype,
                                           offset_dtype=torch.float16 if bits in (4, 5) else None)
            replace_module(model, module_name, QuantizedLinear(weight, module.bias))  # a meta bias arrives later
            continue
        values = dense_values(kind, decoded, t.tensor_type)
        if heads:
            values = values[np.argsort(rope_perm(values.shape[0], heads))]
        if not _copy_into(model, name, torch.from_numpy(np.ascontiguousarray(values)), dtype):
            raise ValueError(f"{path}: tensor {t.name} ({name}) does not fit the model built from its metadata")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path} has no tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}: the file is "
                         f"incomplete for a {arch} model with its metadata")
    set_gguf_source(model, GGUFSource(path, arch, types))
    return model.eval(), tok


def hf_config(reader, where: str):
    """The transformers config a GGUF's metadata describes (Llama family), from the `{arch}.*` keys:

        block_count -> num_hidden_layers          embedding_length -> hidden_size
        feed_forward_length -> intermediate_size  attention.head_count(_kv) -> num_(key_value_)heads
        attention.key_length -> head_dim          context_length -> max_position_embeddings
        rope.freq_base -> rope_theta              attention.layer_norm_rms_epsilon -> rms_norm_eps
        vocab_size (or the token list's length)   no output.weight tensor -> tie_word_embeddings
    """
    from lorakit.models.default import _import_transformers

    transformers = _import_transformers()
    arch = field_value(reader, "general.architecture")
    model_type, _ = check_architecture(arch, where)

    def key(name, default=None, required=True):
        value = field_value(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise ValueError(f"{where} has no {arch}.{name} metadata: the file is incomplete for a {arch} model")
        return value

    scaling = field_value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported by lorakit's GGUF loader; "
                         f"convert the model to Hugging Face format and load that")
    hidden, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if tokens else None)
    names = {t.name for t in reader.tensors}
    ids = {k: field_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=int(key("attention.key_length", hidden // n_head)),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
    )
    return config


def _empty_model(config, dtype: torch.dtype):
    """The model `config` describes, its parameters on the meta device (buffers real)."""
    from lorakit.models.default import _import_transformers

    transformers = _import_transformers()
    with _parameters_on_meta():
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer (and chat template) of a GGUF file, without its model."""
    from types import SimpleNamespace

    path = Path(path).expanduser()
    reader = read_gguf(path)
    arch = field_value(reader, "general.architecture")
    return _tokenizer(path, SimpleNamespace(max_position_embeddings=field_value(reader, f"{arch}.context_length")
                                            or 2048))


def _tokenizer(path: Path, config):
    """The file's tokenizer and chat template, converted by transformers (a few seconds for a 50k vocabulary)."""
    from lorakit.models.default import _hub_offline, _import_transformers

    transformers = _import_transformers()
    with _hub_offline():
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tok.model_max_length = config.max_position_embeddings
    return tok


@contextlib.contextmanager
def _parameters_on_meta():
    """Create modules' parameters on the meta device (no memory, no init), buffers for real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
