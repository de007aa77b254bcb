"""What a served request must answer: transformers' own greedy `generate` on the reference model with one
adapter active (or none), an independent path from the server's mixed-adapter batches."""

from __future__ import annotations

import torch

import lorakit


def expected_chat(assets, adapter: str | None, question: str, max_tokens: int) -> str:
    _, _, model, tokenizer = assets
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return _greedy(model, tokenizer, adapter, tokenizer(text, add_special_tokens=False).input_ids, max_tokens)


def expected_completion(assets, adapter: str | None, prompt: str, max_tokens: int) -> str:
    _, _, model, tokenizer = assets
    return _greedy(model, tokenizer, adapter, tokenizer(prompt).input_ids, max_tokens)


def _greedy(model, tokenizer, adapter: str | None, ids: list[int], max_tokens: int) -> str:
    ids = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        if adapter is None:
            with lorakit.disable_adapters(model):
                out = model.generate(ids, **kw)
        else:
            lorakit.set_active(model, adapter)
            out = model.generate(ids, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
