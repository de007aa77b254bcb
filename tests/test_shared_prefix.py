"""The shared prompt prefix (lorakit.tasks.shared_prefix) and the merged weights evaluation holds
(LoraLayer.merged_weight inside dequantize_once): the same losses and gradients as the plain forward."""

import pytest
import torch

import lorakit
from lorakit.quant.linear import dense_bytes, dequantize_once
from lorakit.tasks import shared_prefix
from lorakit.tasks.causal_lm import evaluate
from lorakit.tasks.losses import causal_lm_loss
from tiny_models import randomise_trainable_, tiny_llama

transformers = pytest.importorskip("transformers")

FP32 = {"rtol": 1e-5, "atol": 1e-6}
P = 12  # tokens every row begins with (a system prompt)


def batch(B=4, T=30, seed=0):
    """B rows sharing their first P tokens; labels ignored over the first 15 (the prompt); rows 1 and 2 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, T), generator=g)
    ids[:, :P] = ids[0, :P]
    labels = ids.clone()
    labels[:, :15] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    for row, end in ((1, 25), (2, 20)):
        mask[row, end:], labels[row, end:], ids[row, end:] = 0, -100, 0
    return ids, labels, mask


def model_with(method: str):
    model = tiny_llama()
    if method == "qlora":
        lorakit.quantize_(model, lorakit.NF4Config())
    elif method.startswith("qalora"):  # "qalora fp16": offsets deployed in fp16 (a GGUF Q4_1 base) are moved
        lorakit.quantize_(model, lorakit.IntNConfig(bits=4, group_size=32,
                                                    scale_dtype="float16" if "fp16" in method else "float32"))
    group = 32 if method.startswith("qalora") else None
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", group_size=group))
    randomise_trainable_(model, seed=3, std=0.1)
    return model


def loss_and_grads(model, share, ids, labels, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = causal_lm_loss(model, ids, labels, mask, share_prefix=share)
    return loss, torch.autograd.grad(loss, params)


def test_shared_length_conditions():
    ids, labels, mask = batch()
    assert shared_prefix.shared_length(ids, labels, mask) == P - 1  # the last common token stays in the rows
    assert shared_prefix.shared_length(ids[:1], labels[:1], mask[:1]) == 0  # one row: nothing to share
    assert shared_prefix.shared_length(ids, labels, None) == 0
    assert shared_prefix.shared_length(ids, labels, mask[:, None, None].expand(-1, 1, 30, 30)) == 0  # packed rows
    on_prompt = labels.clone()
    on_prompt[:, 3] = ids[:, 3]  # a loss inside the prefix (train_on_prompt): not shared
    assert shared_prefix.shared_length(ids, on_prompt, mask) == 0
    short = ids.clone()
    short[1, shared_prefix.MIN_SHARED] += 1  # rows part before MIN_SHARED + 1 tokens
    assert shared_prefix.shared_length(short, labels, mask) == 0
    same = ids[:1].repeat(3, 1)  # identical rows: all but the last two positions are shared
    assert shared_prefix.shared_length(same, torch.full_like(same, -100), torch.ones_like(same)) == 28


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora", "qalora fp16"])
def test_training_loss_and_gradients_equal_the_plain_forward(method):
    model = model_with(method).train()
    lorakit.fuse_for_training_(model)
    ids, labels, mask = batch()
    calls = []
    real = shared_prefix.decode_with_shared_prefix
    shared_prefix.decode_with_shared_prefix = lambda *a: calls.append(a[-1]) or real(*a)
    try:
        shared, shared_grads = loss_and_grads(model, True, ids, labels, mask)
    finally:
        shared_prefix.decode_with_shared_prefix = real
    plain, plain_grads = loss_and_grads(model, False, ids, labels, mask)
    assert calls == [P - 1]
    torch.testing.assert_close(shared, plain, **FP32)
    for got, want in zip(shared_grads, plain_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    hf = model(ids, attention_mask=mask, labels=labels).loss  # and both equal transformers' own loss
    torch.testing.assert_close(shared, hf, **FP32)


def test_a_shared_training_step_dequantizes_each_weight_once(monkeypatch):
    """The decoder runs twice (prefix, rows), each with a backward: hold_dense keeps one dense copy per weight
    from the first forward for all four, instead of dequantizing four times."""
    from lorakit.quant.intn import IntNWeight

    model = model_with("qalora fp16").train()
    lorakit.fuse_for_training_(model)  # the down projection goes through the SwiGLU kernel
    calls = []
    original = IntNWeight.dequantize
    monkeypatch.setattr(IntNWeight, "dequantize", lambda self, *a, **k: calls.append(id(self)) or original(self, *a, **k))
    weights = [m for m in model.modules() if isinstance(m, IntNWeight)]
    ids, labels, mask = batch()
    causal_lm_loss(model, ids, labels, mask).backward()
    assert sorted(calls) == sorted(id(w) for w in weights)
    calls.clear()
    causal_lm_loss(model, ids, labels, mask, share_prefix=False).backward()  # on the fly: forward and backward,
    assert len(calls) == 2 * len(weights) - 3  # but layer 0's q, k, v need no input gradient (the embeddings)


def test_gradient_checkpointing_and_sliding_windows_are_not_shared():
    model = model_with("lora").train()
    decoder = model.model
    assert shared_prefix.prefix_cache(decoder, model) is not None
    lorakit.enable_gradient_checkpointing(model)  # a recomputed block would run without the prefix's cache
    assert shared_prefix.prefix_cache(decoder, model) is None
    with torch.no_grad():  # no recompute without grad
        assert shared_prefix.prefix_cache(decoder, model) is not None
    lorakit.disable_gradient_checkpointing(model)
    on, off = (("activation_checkpointing_enable", "activation_checkpointing_disable")
               if hasattr(model, "activation_checkpointing_enable")
               else ("gradient_checkpointing_enable", "gradient_checkpointing_disable"))
    getattr(model, on)()  # transformers' own
    assert shared_prefix.prefix_cache(decoder, model) is None
    getattr(model, off)()
    assert shared_prefix.prefix_cache(decoder, model) is not None
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    mistral = transformers.MistralForCausalLM(config)
    assert shared_prefix.prefix_cache(mistral.model, mistral) is None
    ids, labels, mask = batch()  # and its loss is the plain forward's
    torch.testing.assert_close(causal_lm_loss(mistral, ids, labels, mask),
                               causal_lm_loss(mistral, ids, labels, mask, share_prefix=False))


@pytest.mark.parametrize("method", ["lora", "qalora", "qalora fp16"])
def test_evaluation_merges_each_layer_once_and_computes_the_prefix_once(method):
    model = model_with(method)
    lorakit.fuse_for_training_(model)
    rows = []
    for seed in range(3):  # three batches of 4 rows, all beginning with the same P tokens
        ids, labels, mask = batch(seed=seed)
        ids[:, :P] = batch()[0][0, :P]
        rows.append((ids, labels, mask))
    with torch.no_grad():
        plain = [causal_lm_loss(model, *r, share_prefix=False) for r in rows]
    calls = []
    decoder = model.model
    hook = decoder.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    merged = []
    with torch.no_grad(), dequantize_once():
        for r in rows:
            merged.append(causal_lm_loss(model, *r))
        layer = next(m for m in model.modules() if isinstance(m, lorakit.LoraLayer))
        held = layer(torch.ones(1, layer.in_out[0]))
        assert held.shape[-1] == layer.in_out[1]
    hook.remove()
    assert calls == [(1, P - 1), (4, 30 - P + 1), (4, 30 - P + 1), (4, 30 - P + 1)]  # the prefix once
    for got, want in zip(merged, plain):
        torch.testing.assert_close(got, want, **FP32)


def test_merged_weight_is_what_the_layer_computes_and_counts_in_dense_bytes():
    import importlib

    linear_module = importlib.import_module("lorakit.quant.linear")  # the module, not lorakit.quant's linear()
    for method in ("lora", "qlora", "qalora", "qalora fp16"):
        model = model_with(method)
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
        layer = model.model.layers[0].self_attn.q_proj
        want = layer(x)
        with torch.no_grad(), dequantize_once():
            got = layer(x)
            assert layer(x) is not got  # a fresh output, the held weight reused
            assert len(linear_module._once.cache) == 1  # the merged copy only, not the base's dense one too
        if method == "qalora fp16":  # the very grid training and the merged file use: bit for bit
            w = layer.merged_weight(layer.adapter(), torch.float32)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=0, atol=0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=method)
    lora, plain = model_with("lora"), tiny_llama()
    linear_bytes = sum(m.weight.numel() * 4 for m in plain.modules()
                       if isinstance(m, torch.nn.Linear) and m is not plain.lm_head)
    assert dense_bytes(plain, torch.float32) == 0
    assert dense_bytes(lora, torch.float32) == linear_bytes  # one merged copy per adapted layer
    with lorakit.disable_adapters(lora):
        assert dense_bytes(lora, torch.float32) == 0


def test_evaluate_equals_the_unshared_unmerged_loss():
    from lorakit.data.render import Example

    model = model_with("qalora fp16")
    ids, labels, mask = batch(B=8)
    examples = [Example(ids[b][mask[b] == 1].tolist(), labels[b][mask[b] == 1].tolist()) for b in range(8)]
    with torch.no_grad():  # the token-weighted mean over all rows: the plain loss of one batch of them all
        want = causal_lm_loss(model, ids, labels, mask, share_prefix=False).item()
    got = evaluate(model, examples, pad_id=0, batch_tokens=3 * 30)  # batches of at most 3 rows, shared prefix, merged weights
    assert abs(got - want) < 1e-5 * want


def _cheapest_cut(lengths, batch_tokens, batch_cost):
    """Every way of cutting the length-sorted rows into consecutive batches, by brute force: the least cost."""
    import itertools

    rows = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(rows) - 1):
        batches, current = [], [rows[0]]
        for cut, length in zip(cuts, rows[1:]):
            if cut:
                batches.append(current)
                current = []
            current.append(length)
        batches.append(current)
        if all(len(b) == 1 or len(b) * max(b) <= batch_tokens for b in batches):
            best = min(best, sum(len(b) * max(b) + batch_cost for b in batches))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_evaluation_batches_are_the_cheapest_cut(seed):
    from lorakit.tasks.causal_lm import evaluation_batches

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (9,), generator=g).tolist() + [200]  # 200: longer than the cap, alone
    batch_tokens, batch_cost = 120, [0, 16, 64][seed % 3]
    batches = evaluation_batches(lengths, batch_tokens, batch_cost)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
    longest = [max(lengths[i] for i in b) for b in batches]
    assert all(len(b) == 1 or len(b) * m <= batch_tokens for b, m in zip(batches, longest))
    assert all(lengths[i] <= lengths[j] for a, b in zip(batches, batches[1:]) for i in a for j in b)  # in length order
    assert sum(len(b) * m + batch_cost for b, m in zip(batches, longest)) == _cheapest_cut(lengths, batch_tokens,
                                                                                         batch_cost)


def test_evaluation_batches_pad_less_than_cutting_at_the_cap():
    from lorakit.tasks.causal_lm import evaluation_batches

    lengths = [10] * 5 + [40]  # all six fit the cap (6 x 40 = 240), but one batch pads the short rows to 40
    assert sorted(map(sorted, evaluation_batches(lengths, 240, 0))) == [[0, 1, 2, 3, 4], [5]]
    assert evaluation_batches(lengths, 240, 1000) == [[0, 1, 2, 3, 4, 5]]  # a costly batch: one, padded


@pytest.mark.parametrize("method", ["lora", "qalora fp16"])
@pytest.mark.parametrize("T", [30, 16])  # rows' part longer than the prefix, and shorter (row 0 is the wider)
def test_training_runs_the_prefix_as_row_zero_of_one_decoder_call(method, T, monkeypatch):
    """While training a Llama the prefix is row 0 of the rows' own call: one decoder call, and the loss and
    gradients of the cached form (two calls), which test_training_loss_and_gradients_equal_the_plain_forward
    ties to the plain forward; the model's attention implementation is back afterwards."""
    model = model_with(method).train()
    lorakit.fuse_for_training_(model)
    ids, labels, mask = batch(T=T)
    if T == 16:  # a loss on the last 4 positions; row 1 padded after 14 tokens
        labels[:, P:] = ids[:, P:]
        mask[1, 14:], labels[1, 14:], ids[1, 14:] = 0, -100, 0
    assert shared_prefix.prefix_as_row(model.model)
    implementation = model.config._attn_implementation
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        row, row_grads = loss_and_grads(model, True, ids, labels, mask)
    finally:
        hook.remove()
    S = shared_prefix.shared_length(ids, labels, mask)
    assert S == P - 1 and calls == [torch.Size((ids.shape[0] + 1, max(S, T - S)))]
    assert model.config._attn_implementation == implementation
    monkeypatch.setattr(shared_prefix, "prefix_as_row", lambda decoder: False)  # the cached form
    cached, cached_grads = loss_and_grads(model, True, ids, labels, mask)
    torch.testing.assert_close(row, cached, **FP32)
    for got, want in zip(row_grads, cached_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_prefix_as_row_only_for_plain_llama_attention():
    model = model_with("lora").train()
    assert shared_prefix.prefix_as_row(model.model)
    model.config.attention_dropout = 0.1  # dropout at work while training: the cached form
    assert not shared_prefix.prefix_as_row(model.model)
    model.eval()
    assert shared_prefix.prefix_as_row(model.model)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    assert not shared_prefix.prefix_as_row(transformers.MistralForCausalLM(config).model)  # not in ROW_MODEL_TYPES
    with pytest.raises(ValueError, match="softcap"):
        shared_prefix._prefix_row_attention(model.model.layers[0].self_attn, torch.zeros(2, 4, 3, 16),
                                            torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), None, softcap=30.0)


def test_long_rows_keep_the_cached_form(monkeypatch):
    """Row 0 would be padded from S to the rows' width: past CALL_COST positions two calls cost less."""
    assert shared_prefix.row_padding(8, 57, 26) == 5 and shared_prefix.row_padding(8, 40, 26) == 8 * 12
    assert shared_prefix.row_padding(4, 525, 25) == 475 > shared_prefix.CALL_COST
    model = model_with("lora").train()
    ids, labels, mask = batch(T=60)  # S = 11: row 0 padded by 38 <= 64; with CALL_COST 30 it is not
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        loss = causal_lm_loss(model, ids, labels, mask)
        assert calls == [torch.Size((5, 49))]
        calls.clear()
        monkeypatch.setattr(shared_prefix, "CALL_COST", 30)
        cached = causal_lm_loss(model, ids, labels, mask)
    finally:
        hook.remove()
    assert calls == [torch.Size((1, P - 1)), torch.Size((4, 60 - P + 1))]  # the prefix, then the rows
    torch.testing.assert_close(loss, cached, **FP32)


def test_only_right_padded_rows_run_as_one_call():
    ids, labels, mask = batch()
    assert shared_prefix.right_padded(mask)
    holes = mask.clone()
    holes[3, 20] = 0  # a masked position before real ones: causal attention alone would not keep it out
    assert not shared_prefix.right_padded(holes)
    model = model_with("lora").train()
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        shared = causal_lm_loss(model, ids, labels, holes)
    finally:
        hook.remove()
    assert calls == [1, 4]  # the cached form: the prefix, then the rows with their mask
    torch.testing.assert_close(shared, causal_lm_loss(model, ids, labels, holes, share_prefix=False), **FP32)


def test_prefix_as_row_in_bfloat16(monkeypatch):
    """A bf16 model (the boolean mask beside bf16 queries): the cached form's loss and the plain forward's."""
    model = model_with("lora").to(torch.bfloat16).train()
    ids, labels, mask = batch()
    row = causal_lm_loss(model, ids, labels, mask)
    row.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(row, causal_lm_loss(model, ids, labels, mask, share_prefix=False), rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(shared_prefix, "prefix_as_row", lambda decoder: False)  # the cached form
    torch.testing.assert_close(row, causal_lm_loss(model, ids, labels, mask), rtol=1e-2, atol=1e-2)
