"""Small GGUF files for the tests, written with the `gguf` package's own writer and quantizers.

`write_llama_gguf` lays a Hugging Face Llama out as llama.cpp's converter does: tensor names from
lorakit's table, attn_q / attn_k rows RoPE-permuted, linear weights quantized by `gguf.quants`
(independent of lorakit's codec), norms F32, metadata under ``llama.*``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

gguf = __import__("pytest").importorskip("gguf")

from lorakit.formats.gguf_names import gguf_name, rope_heads, rope_perm  # noqa: E402


def write_llama_gguf(path: Path, model, qtype: str = "Q4_1", *, types: dict[str, str] | None = None,
                     embed_type: str = "Q8_0", raw: dict[str, tuple[np.ndarray, str]] | None = None,
                     arch: str = "llama", metadata: dict[str, bool | int | str | list] | None = None) -> Path:
    """Write `model` (a tiny LlamaForCausalLM, or Qwen2ForCausalLM with arch="qwen2") as GGUF. `types`
    overrides the type per GGUF tensor name; `raw` gives a tensor's bytes and type directly (e.g. K-quant
    bytes gguf.quants cannot produce); `metadata` adds keys (e.g. tokenizer.chat_template), typed by value."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    writer.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    writer.add_uint32(f"{arch}.rope.dimension_count", cfg.hidden_size // cfg.num_attention_heads)
    writer.add_string("general.name", "tiny test llama")
    add = {bool: writer.add_bool, int: writer.add_uint32, str: writer.add_string, list: writer.add_array}
    for key, value in (metadata or {}).items():
        add[type(value)](key, value)
    tied = cfg.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = gguf_name(name)
        assert gname is not None, name
        if raw and gname in raw:
            data, t = raw[gname]
            writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[t])
            continue
        w = tensor.detach().float().numpy()
        heads = rope_heads(gname, arch == "llama", cfg.num_attention_heads, cfg.num_key_value_heads)
        if heads:
            w = w[rope_perm(w.shape[0], heads)]
        t = (types or {}).get(gname) or ("F32" if w.ndim == 1 else embed_type if gname in ("token_embd.weight",
                                                                                         "output.weight") else qtype)
        if t == "F32":
            writer.add_tensor(gname, np.ascontiguousarray(w, np.float32))
        elif t == "F16":
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[t]
            writer.add_tensor(gname, gguf.quants.quantize(w, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    """{name: (type name, data bytes)} of every tensor in a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in reader.tensors}
