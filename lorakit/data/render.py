"""Records -> token ids and labels: what the model reads, and which tokens carry the loss.

A row becomes tokens x_0 .. x_{T-1} and a loss mask m_t in {0, 1}; training minimises

    L = - sum_{t >= 1} m_t log p(x_t | x_<t)  /  sum_{t >= 1} m_t

An `Example` stores input_ids = x and labels y_t = x_t where m_t = 1, IGNORE (-100) where
m_t = 0. y_0 is never a target (nothing predicts the first token), so a row "has loss" when some
y_t with t >= 1 is not IGNORE.

    text         tokens(text) + eos                                          m = 1 everywhere
    instruction  with a chat template: [user: instruction (+ "\\n\\n" + input), assistant: output]
                 without one: "### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n"
                              "### Response:\\n" + output + eos   (no Input block if input is "")
                 m = 1 on the response: the assistant turn as the template closes it, or output + eos
    chat         the model's chat template                           m = 1 on each assistant turn

`train_on_prompt=True` sets m = 1 everywhere for instruction and chat rows too.

Assistant spans come from the template itself. For assistant message k, with
P = ids(render(messages[:k], add_generation_prompt=True)) and F = ids(render(messages[:k+1])),
the span is F[len(P):], valid only if P is a prefix of F and F a prefix of the whole
conversation's ids. A template that breaks this (one that drops earlier reasoning, say) raises a
ValueError instead of guessing. With SmolLM2's template the span is "{content}<|im_end|>\\n".

Rows longer than `max_tokens` keep their first max_tokens tokens; rows left without loss are
dropped. Both are counted in the returned `EncodeReport`, for the caller to show:

    examples, report = encode(tokenizer, dataset, max_tokens=1024)
    # report = EncodeReport(examples=998, truncated=12, dropped=2)
"""

from __future__ import annotations

from typing import NamedTuple

from lorakit.data.records import Dataset

IGNORE = -100


class Example(NamedTuple):
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,), IGNORE where no loss


class EncodeReport(NamedTuple):
    examples: int  # rows kept
    truncated: int  # rows cut to max_tokens (kept or dropped)
    dropped: int  # rows with no loss-bearing token after the cut: not in the output


def encode(tokenizer, dataset: Dataset, max_tokens: int,
           train_on_prompt: bool = False) -> tuple[list[Example], EncodeReport]:
    """Tokenize every row of `dataset` and mask its labels by shape (see the module docstring)."""
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens!r} must be an int >= 2 (one token to read, one to predict)")
    render = _renderer(tokenizer, dataset)
    examples, truncated, dropped = [], 0, 0
    for i, row in enumerate(dataset.rows):
        ids, labels = render(tokenizer, row, dataset.where(i))
        if train_on_prompt:
            labels = list(ids)
        assert len(ids) == len(labels)
        if len(ids) > max_tokens:
            truncated += 1
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        if all(y == IGNORE for y in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    return examples, EncodeReport(len(examples), truncated, dropped)


def _renderer(tokenizer, dataset: Dataset):
    """The function (tokenizer, row, where) -> (ids, labels) for this dataset's shape."""
    templated = getattr(tokenizer, "chat_template", None) is not None
    if dataset.shape == "text":
        return _text
    if dataset.shape == "instruction":
        return _instruction_templated if templated else _instruction_alpaca
    if dataset.shape == "chat":
        if not templated:
            raise ValueError(
                f"{dataset.path}: chat rows need the model's chat template, and this tokenizer has "
                f"none; use a model with a chat template (an -Instruct or -Chat model), or convert the "
                f"data to instruction rows (instruction, input, output) or text rows"
            )
        return _chat
    raise ValueError(f"unknown dataset shape {dataset.shape!r}; expected text, instruction or chat")


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("this tokenizer has no eos token, which text and Alpaca-style rows end with; "
                         "set tokenizer.eos_token")
    return tokenizer.eos_token_id


def _text(tokenizer, row: dict, where: str) -> tuple[list[int], list[int]]:
    ids = _ids(tokenizer, row["text"], special=True)  # special: the bos token, if the model uses one
    if not ids or ids[-1] != _eos(tokenizer):
        ids.append(_eos(tokenizer))
    return ids, list(ids)


def _user_message(row: dict) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")


def alpaca_prompt(row: dict) -> str:
    """The Alpaca-style prompt of an instruction row, for tokenizers without a chat template."""
    body = f"### Instruction:\n{row['instruction']}\n\n"
    if row["input"]:
        body += f"### Input:\n{row['input']}\n\n"
    return body + "### Response:\n"


def _instruction_alpaca(tokenizer, row: dict, where: str) -> tuple[list[int], list[int]]:
    prompt = _ids(tokenizer, alpaca_prompt(row), special=True)
    response = _ids(tokenizer, row["output"]) + [_eos(tokenizer)]
    return prompt + response, [IGNORE] * len(prompt) + response


def _instruction_templated(tokenizer, row: dict, where: str) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": _user_message(row)}, {"role": "assistant", "content": row["output"]}]
    return _chat(tokenizer, {"messages": messages}, where)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja's raise_exception, e.g. "roles must alternate user/assistant"
        raise ValueError(f"{where}: the chat template rejected this conversation: {e}") from e
    return _ids(tokenizer, text)


def _chat(tokenizer, row: dict, where: str) -> tuple[list[int], list[int]]:
    messages = row["messages"]
    ids = _render(tokenizer, messages, False, where)
    labels = [IGNORE] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], True, where)
        upto = _render(tokenizer, messages[: k + 1], False, where)
        if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
            raise ValueError(
                f"{where}: cannot find assistant message {k} in the chat template's tokens: the "
                f"rendered conversation up to it is not a prefix of the longer one, so the template "
                f"rewrites earlier turns; convert the data to instruction rows, or use a template "
                f"whose renders of a conversation extend each other"
            )
        labels[len(prompt): len(upto)] = upto[len(prompt):]
    return ids, labels
