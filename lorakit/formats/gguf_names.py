"""What a GGUF tensor is in a Hugging Face model: names, architectures and llama.cpp's RoPE row order.

Key-mapping table (Llama family; `{i}` a block index, `{p}` ``weight`` or ``bias``):

    GGUF tensor                  Hugging Face parameter                                  rows permuted
    token_embd.weight            model.embed_tokens.weight
    output_norm.weight           model.norm.weight
    output.weight                lm_head.weight  (absent when tied to token_embd)
    blk.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
    blk.{i}.ffn_norm.weight      model.layers.{i}.post_attention_layernorm.weight
    blk.{i}.attn_q.{p}           model.layers.{i}.self_attn.q_proj.{p}                   llama: n_head
    blk.{i}.attn_k.{p}           model.layers.{i}.self_attn.k_proj.{p}                   llama: n_head_kv
    blk.{i}.attn_v.{p}           model.layers.{i}.self_attn.v_proj.{p}
    blk.{i}.attn_output.weight   model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.ffn_gate.weight      model.layers.{i}.mlp.gate_proj.weight
    blk.{i}.ffn_up.weight        model.layers.{i}.mlp.up_proj.weight
    blk.{i}.ffn_down.weight      model.layers.{i}.mlp.down_proj.weight

RoPE rows: Hugging Face's Llama rotates the two halves of each head (rotate_half); llama.cpp's
"llama" graph rotates interleaved pairs, so its converter permutes the rows of attn_q / attn_k
(out, in) within each head:

    gguf[r] = hf[perm[r]],   perm = arange(rows).reshape(n_head, 2, rows/n_head/2).swapaxes(1, 2).ravel()

A block-quantized tensor's blocks run along a row, so the same row permutation applies to its codes,
scales and offsets. Qwen2 uses NeoX-style RoPE in llama.cpp: no permutation.
"""

from __future__ import annotations

import re

import numpy as np

# GGUF general.architecture -> (transformers model_type, whether attn_q / attn_k rows are RoPE-permuted)
# (Llama 2/3, SmolLM and Mistral 7B files all say "llama"; each architecture here is tested.)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
# Tensors llama.cpp may carry that are not model parameters (computed from the config in transformers):
# written back verbatim on export.
CARRIED = {"rope_freqs.weight"}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}


def check_architecture(arch: str, where: str) -> tuple[str, bool]:
    """(transformers model_type, permutes RoPE rows) for a GGUF architecture; a clear error otherwise."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: general.architecture={arch!r} is not supported; lorakit loads the Llama "
                         f"family: {sorted(ARCHITECTURES)}. Convert the model to Hugging Face format and load that.")
    return ARCHITECTURES[arch]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter a GGUF tensor holds, or None for a name outside the table."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def gguf_name(hf: str) -> str | None:
    """The inverse of `hf_name`."""
    if hf in _HF_GLOBAL:
        return _HF_GLOBAL[hf]
    m = _LAYER.fullmatch(hf)
    if m and m.group(2) in _HF_BLOCK:
        return f"blk.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    return None


def rope_heads(gguf: str, permutes: bool, n_head: int, n_head_kv: int) -> int | None:
    """The head count whose RoPE row permutation `gguf` carries (attn_q: n_head, attn_k: n_head_kv), else None."""
    if not permutes:
        return None
    kind = gguf.rsplit(".", 2)[-2] if gguf.count(".") >= 2 else ""
    return {"attn_q": n_head, "attn_k": n_head_kv}.get(kind)


def rope_perm(rows: int, n_head: int) -> np.ndarray:
    """perm with gguf[r] = hf[perm[r]] (llama.cpp's converter); hf = gguf[argsort(perm)]."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of pairs: the GGUF's head_count "
                         f"metadata does not fit its attention tensors")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
