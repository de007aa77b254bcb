"""The model FLOPs of a LoRA training step on a Llama-shaped decoder, counted from the shapes.

A multiply-add is 2 FLOPs. For a batch of rows with (non-padding) lengths T_1..T_b, N = Σ T_i tokens and
n_loss loss-bearing tokens, with hidden size d, intermediate size I, L layers, H query heads and K key/value
heads of size h_d, vocabulary V and adapters of rank r on the linear layers in `targets`:

    one linear layer (in -> out), frozen:   forward 2·N·in·out  +  input-gradient backward 2·N·in·out
                                            (no weight gradient; layer 0's q/k/v read the embeddings,
                                            which need no gradient, so they have no input gradient)
    its adapter (A: r x in, B: out x r):    forward 2·N·r·(in+out), backward 4·N·r·(in+out)
                                            (∂B, ∂h, ∂A, ∂x: four GEMMs of the forward's size)
    a QA-LoRA adapter (group_size g):       the same with in/g for in (A: r x in/g reads the group means)
    attention per layer and row:            forward 4·T²·H·h_d (QKᵀ and PV), backward twice that;
                                            causal: half of it is needed (the masked half is not work)
    a shared prompt prefix (S tokens every row begins with, `lorakit.tasks.shared_prefix`): computed once,
                                            N = S + Σ (T_i - S); the rows' queries attend to all T_i keys;
                                            the last layer's prefix outputs are unused (no backward there
                                            except for its keys and values)
    output layer (frozen, only at loss tokens, as lorakit's chunked cross-entropy):
                                            forward 2·n_loss·d·V  +  backward 2·n_loss·d·V

The linear layers of a layer: q (d -> H·h_d), k and v (d -> K·h_d), o (H·h_d -> d), gate and up (d -> I),
down (I -> d). Norms, activations, softmax and the optimizer are not counted (they are bandwidth, not
FLOPs): MFU = these FLOPs / step time / the matmul peak.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that decide a Llama decoder's FLOPs (a Hugging Face `LlamaConfig`'s fields)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None

    @classmethod
    def of(cls, config) -> LlamaShape:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, config.vocab_size, getattr(config, "head_dim", None))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its Hugging Face name."""
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def parameters(self) -> int:
        """Parameters of the decoder layers and the (tied) embedding; norms included."""
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden_size
        return self.num_hidden_layers * per_layer + self.vocab_size * self.hidden_size + self.hidden_size


def step_flops(shape: LlamaShape, lengths: list[int], loss_tokens: int, r: int,
               targets: tuple[str, ...] | None = None, causal: bool = True,
               group_size: int | None = None, shared: int = 0) -> dict[str, float]:
    """The FLOPs of one forward + backward over rows of `lengths` tokens (see the module docstring), by part:
    ``base`` (frozen linear layers), ``adapter``, ``attention``, ``output`` and ``total``. `targets`: the
    adapted layer names (None: all seven linear layers); `group_size`: QA-LoRA's (None: LoRA); `shared`: the
    leading tokens all rows have in common and the decoder computes once (`lorakit.tasks.shared_prefix`):
    N = S + Σ (T_i - S) tokens, and the rows' T_i - S queries attend to all T_i keys.

    Backward computes a gradient only for tensors that depend on an adapter: the decoder's input (the
    embeddings) does not, so the first layer's projections have no input gradient, and where a first-layer
    projection has no adapter, attention computes no gradient for it either (dQ, dK, dV each 2·T²·H·h_d)."""
    if shared and (len(lengths) < 2 or shared >= min(lengths)):
        raise ValueError(f"shared={shared} must be 0, or shorter than every row with 2+ rows; got lengths {lengths}")
    n = sum(lengths) - shared * (len(lengths) - 1) if shared else sum(lengths)
    linears = shape.linears()
    targets = tuple(linears) if targets is None else targets
    unknown = set(targets) - set(linears)
    if unknown:
        raise ValueError(f"targets {sorted(unknown)} are not linear layers of a Llama decoder; use names from "
                         f"{sorted(linears)}")
    S = shared

    def attention_product(prefix_rows: int) -> float:
        """One QKᵀ-sized product over all heads: the rows' T - S queries against their keys, plus the prefix's
        S queries against its own when `prefix_rows` (causal: the needed half)."""
        if causal:
            square = (sum(t * t - S * S for t in lengths) + prefix_rows * S * S) * 0.5
        else:
            square = sum((t - S) * t for t in lengths) + prefix_rows * S * S
        return 2 * square * shape.num_attention_heads * shape.head_size

    product = attention_product(1)
    parts = {"base": 0, "adapter": 0, "attention": 0}

    def project(name: str, needs_grad: bool, back: int = n) -> bool:
        """Count one linear layer (and its adapter) over n tokens, whose output has a gradient at `back` of
        them and whose input needs one or not; return whether its output does."""
        a, b = linears[name]
        adapted = name in targets
        parts["base"] += 2 * n * a * b + (2 * back * a * b if needs_grad else 0)
        if adapted:  # forward A, B; backward ∂B, ∂h, ∂A always, ∂x through A when x needs it
            a_in = a // group_size if group_size else a  # QA-LoRA's A reads the (N, in/g) group means
            parts["adapter"] += 2 * n * r * (a_in + b) + 2 * back * r * (2 * b + a_in) + (2 * back * r * a_in if needs_grad else 0)
        return needs_grad or adapted

    stream = False  # whether the residual stream depends on an adapter yet
    for layer in range(shape.num_hidden_layers):
        # a shared prefix's outputs of the last layer reach nothing (only its keys and values are read): no
        # backward for its queries, attention output, o and MLP there
        last = S and layer == shape.num_hidden_layers - 1
        back = n - S if last else n
        q = project("q_proj", stream, back)
        k, v = (project(name, stream) for name in ("k_proj", "v_proj"))
        attn = q or k or v
        # forward QKᵀ and PV; backward dP = dO Vᵀ (for dQ, dK), dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q
        parts["attention"] += 2 * product + (attention_product(0) if last else product) * ((q or k) + v + q + k)
        stream = project("o_proj", attn, back) or stream
        gate, up = project("gate_proj", stream, back), project("up_proj", stream, back)
        stream = project("down_proj", gate or up, back) or stream
    output = 2 * loss_tokens * shape.hidden_size * shape.vocab_size * (2 if stream else 1)
    parts = {k: float(v) for k, v in parts.items()}
    return {**parts, "output": float(output), "total": sum(parts.values()) + output}


def gemm_shapes(shape: LlamaShape, tokens: int, r: int) -> list[tuple[int, int, int, int]]:
    """The step's GEMMs as (m, k, n, count) for x (m, k) @ w (k, n), `tokens` rows per micro-batch: each
    linear layer's forward and input-gradient product and its adapter's rank-r products, per step. The
    matmul peak of the same run is measured on these shapes."""
    out = []
    layers = shape.num_hidden_layers
    for a, b in shape.linears().values():
        out += [(tokens, a, b, layers), (tokens, b, a, layers)]  # forward x Wᵀ, backward g W
        out += [(tokens, a, r, 2 * layers), (tokens, r, b, 2 * layers)]  # adapter forward + its backward twins
    return out
