"""The embedded default dataset: instruction pairs from the installed Python standard library.

Each public function or class with a docstring becomes ("What does `textwrap.dedent` do?", the
docstring's first paragraph). It is real text, written by others, available offline, and held
out by whole modules: the validation modules share no function with the training modules.

    pairs = docstring_pairs(TRAIN_MODULES)           # list[(question, answer)]
    rows = encode_chat(tokenizer, pairs, max_tokens)  # list[(input_ids, labels)], prompt masked
    input_ids, labels, attention_mask = collate(rows[:8], pad_id)
"""

from __future__ import annotations

import importlib
import inspect

import torch

TRAIN_MODULES = ("textwrap", "json", "shutil", "os.path", "string", "random", "statistics", "itertools", "functools",
                 "collections", "pathlib", "fnmatch", "heapq", "bisect", "copy", "base64", "difflib", "csv",
                 "tempfile", "zipfile", "gzip", "calendar", "datetime", "fractions", "decimal", "operator")
VALID_MODULES = ("glob", "shlex", "html", "math", "secrets", "uuid", "hashlib", "struct")
IGNORE = -100


def docstring_pairs(modules) -> list[tuple[str, str]]:
    """(question, answer) for every public function or class of each module with a usable docstring."""
    pairs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            answer = " ".join(doc.split("\n\n")[0].split())
            if 20 <= len(answer) <= 400:
                pairs.append((f"What does `{module_name}.{name}` do?", answer))
    return pairs


def encode_chat(tokenizer, pairs, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Token ids in the model's chat template; labels are IGNORE on the prompt (loss on answers only)."""
    rows = []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        a_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids = (p_ids + a_ids)[:max_tokens]
        rows.append((ids, ([IGNORE] * len(p_ids) + a_ids)[:max_tokens]))
    return rows


def collate(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input_ids, labels (IGNORE on padding) and attention_mask."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, labels, mask


@torch.no_grad()
def mean_loss(model, rows, pad_id: int, batch: int = 16) -> float:
    """Token-weighted mean loss over `rows` (exp of it is the perplexity)."""
    from lorakit.tasks.losses import causal_lm_loss

    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids, labels, mask = collate(rows[i: i + batch], pad_id)
        n = int((labels[:, 1:] != IGNORE).sum())
        total += causal_lm_loss(model, ids, labels, mask).item() * n
        count += n
    return total / count
