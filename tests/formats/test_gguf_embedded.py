"""The GGUF contracts on the real embedded model (SmolLM2-135M-Instruct Q4_1, 98 MB) and, where
llama-cpp-python is installed, in llama.cpp itself. Slow: `pytest -m slow`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import lorakit  # noqa: E402
from lorakit.models.default import default_gguf_path  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def src():
    try:
        return default_gguf_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def valid_rows(src):
    from lorakit.data.stdlib_docs import VALID_MODULES, docstring_pairs, encode_chat

    _, tok = lorakit.load_gguf(src)
    return encode_chat(tok, docstring_pairs(VALID_MODULES)[:48], 96)


def test_embedded_file_round_trips_byte_for_byte(src, tmp_path):
    model, _ = lorakit.load_gguf(src, tokenizer=False)
    report = lorakit.export_gguf(model, tmp_path / "same.gguf")
    assert report.exact and report.counts() == {"codes kept": 210, "copied": 1, "dense": 61}
    assert (tmp_path / "same.gguf").read_bytes() == src.read_bytes()


def test_embedded_file_loads_as_transformers_converts_it(src):
    model, tok = lorakit.load_gguf(src)
    reference, ref_tok = lorakit.models.load_causal_lm(None)  # transformers' own GGUF conversion, cached
    text = "What does `glob.escape` do? Escape all special characters."
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(text, return_tensors="pt").input_ids)
    assert tok.chat_template == ref_tok.chat_template
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def _fine_tuned(src, valid_rows, steps=12):
    """QA-LoRA on the file's own codes, a few real steps on the default data."""
    from lorakit.data.stdlib_docs import TRAIN_MODULES, collate, docstring_pairs, encode_chat

    model, tok = lorakit.load_gguf(src)
    train = encode_chat(tok, docstring_pairs(TRAIN_MODULES)[: steps * 4], 96)
    lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear", group_size=32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(steps):
        ids, labels, mask = collate(train[step * 4: step * 4 + 4], tok.eos_token_id)
        lorakit.causal_lm_loss(model, ids, labels, mask).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_qalora_merge_exports_exactly(src, valid_rows, tmp_path):
    model = _fine_tuned(src, valid_rows, steps=4)
    ids = torch.tensor(valid_rows[0][0])[None]
    with torch.no_grad():
        before = model(ids).logits
    lorakit.merge_(model)
    report = lorakit.export_gguf(model, tmp_path / "ft.gguf", merged="test")
    assert report.exact and report.counts().get("offsets moved", 0) > 0
    reloaded, _ = lorakit.load_gguf(tmp_path / "ft.gguf", tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=1e-3)


def test_llama_cpp_runs_the_fine_tuned_file_and_the_adapter(src, valid_rows, tmp_path):
    pytest.importorskip("llama_cpp")
    from lorakit.formats.llamacpp import llama_logits, top1_agreement

    model = _fine_tuned(src, valid_rows)
    seqs = [ids for ids, _ in valid_rows]

    def ours():
        with torch.no_grad():
            return [model(torch.tensor(s)[None]).logits[0].numpy() for s in seqs]

    for module in model.modules():  # the adapter alone is applied in float by llama.cpp: compare with that
        if isinstance(module, lorakit.IntNWeight):
            module.offset_dtype = None
    unmerged = ours()
    lorakit.export_gguf_adapter(model, tmp_path / "adapter.gguf")
    for module in model.modules():
        if isinstance(module, lorakit.IntNWeight):
            module.offset_dtype = torch.float16
    lorakit.merge_(model)
    merged = ours()
    lorakit.export_gguf(model, tmp_path / "ft.gguf")
    ft = llama_logits(tmp_path / "ft.gguf", seqs)
    with_adapter = llama_logits(src, seqs, lora=tmp_path / "adapter.gguf")
    # llama.cpp's own arithmetic (activations quantized to 8 bits per 32 against Q4_1 blocks) flips near-ties: on
    # the untouched base file its plain top-1 agreement with a float32 forward is only ~97-98.5%, and every
    # disagreement measured was at a position whose top-2 logits are within 0.5 of each other (median 0.07).
    # So: where lorakit's top-1 leads by more than 0.5, llama.cpp must agree (>= 99%) on the fine-tuned file and
    # on base + adapter, and the mean logit difference must be no larger than llama.cpp's own on the base file.
    base_model, _ = lorakit.load_gguf(src, tokenizer=False)
    with torch.no_grad():
        base_ours = [base_model(torch.tensor(s)[None]).logits[0].numpy() for s in seqs]
    base = llama_logits(src, seqs)

    def clear_agreement(theirs, ours, margin=0.5):
        o, t = np.concatenate(ours), np.concatenate(theirs)
        top2 = np.partition(o, -2, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > margin
        return float((o.argmax(-1) == t.argmax(-1))[clear].mean())

    def noise(a, b):
        return np.mean([np.abs(x - y).mean() for x, y in zip(a, b)])

    assert top1_agreement(base, base_ours) >= 0.95
    assert clear_agreement(ft, merged) >= 0.99 and top1_agreement(ft, merged) >= 0.93
    assert clear_agreement(with_adapter, unmerged) >= 0.99 and top1_agreement(with_adapter, unmerged) >= 0.92
    assert noise(ft, merged) <= 1.5 * noise(base, base_ours)
    assert noise(with_adapter, unmerged) <= 1.5 * noise(base, base_ours)
