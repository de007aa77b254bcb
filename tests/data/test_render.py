"""Rendering rows to tokens: the loss mask checked token by token on SmolLM2's real tokenizer.

Each test cuts an example into runs of consecutive masked / loss-bearing tokens and decodes each
run: loss runs must be exactly the responses (as the template closes them), masked runs exactly
the prompts.
"""

import copy

import pytest

from lorakit.data.records import Dataset
from lorakit.data.render import IGNORE, EncodeReport, Example, alpaca_prompt, encode

END = "<|im_end|>"  # SmolLM2's eos, which its template also puts after every turn


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from lorakit.models.default import default_model_dir

    return transformers.AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def plain(tokenizer):
    """The same tokenizer without a chat template."""
    t = copy.deepcopy(tokenizer)
    t.chat_template = None
    return t


def dataset(shape, *rows):
    return Dataset("mem.jsonl", shape, list(rows), list(range(1, len(rows) + 1)))


def runs(tokenizer, ex: Example) -> list[tuple[bool, str]]:
    """[(has_loss, decoded text)] for each run of consecutive tokens with the same mask."""
    out = []
    for x, y in zip(ex.input_ids, ex.labels):
        assert y in (x, IGNORE), "a loss-bearing label must be the token itself"
        if out and out[-1][0] == (y != IGNORE):
            out[-1][1].append(x)
        else:
            out.append((y != IGNORE, [x]))
    return [(loss, tokenizer.decode(ids)) for loss, ids in out]


def render(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def test_text_rows_carry_loss_on_every_token_and_end_with_eos(tokenizer):
    (ex,), report = encode(tokenizer, dataset("text", {"text": "The cat sat on the mat."}), max_tokens=64)
    assert runs(tokenizer, ex) == [(True, "The cat sat on the mat." + END)]
    assert report == EncodeReport(examples=1, truncated=0, dropped=0)


def test_instruction_rows_use_the_chat_template_and_mask_the_prompt(tokenizer):
    row = {"instruction": "Add the numbers.", "input": "1 2", "output": "The sum is 3."}
    (ex,), _ = encode(tokenizer, dataset("instruction", row), max_tokens=128)
    prompt = render(tokenizer, [{"role": "user", "content": "Add the numbers.\n\n1 2"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nAdd the numbers.\n\n1 2" + END + "\n<|im_start|>assistant\n")
    assert runs(tokenizer, ex) == [(False, prompt), (True, "The sum is 3." + END + "\n")]


def test_chat_rows_carry_loss_on_each_assistant_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
    ]
    (ex,), _ = encode(tokenizer, dataset("chat", {"messages": messages}), max_tokens=128)
    assert runs(tokenizer, ex) == [
        (False, "<|im_start|>system\nBe brief." + END + "\n<|im_start|>user\nHi" + END + "\n<|im_start|>assistant\n"),
        (True, "Hello." + END + "\n"),
        (False, "<|im_start|>user\nHow are you?" + END + "\n<|im_start|>assistant\n"),
        (True, "Fine, thanks." + END + "\n"),
    ]
    assert tokenizer.decode(ex.input_ids) == render(tokenizer, messages)


def test_train_on_prompt_puts_loss_everywhere(tokenizer):
    row = {"instruction": "Add.", "input": "", "output": "3"}
    (ex,), _ = encode(tokenizer, dataset("instruction", row), max_tokens=128, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_without_a_chat_template_instructions_use_the_alpaca_prompt(plain):
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"},
            {"instruction": "Greet.", "input": "", "output": "Hi!"}]
    (ex, ex2), _ = encode(plain, dataset("instruction", *rows), max_tokens=128)
    assert runs(plain, ex) == [(False, "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"),
                               (True, "3" + END)]
    assert runs(plain, ex2) == [(False, "### Instruction:\nGreet.\n\n### Response:\n"), (True, "Hi!" + END)]
    assert alpaca_prompt(rows[1]) == "### Instruction:\nGreet.\n\n### Response:\n"


def test_chat_rows_without_a_chat_template_name_the_fix(plain):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(ValueError, match="use a model with a chat template .* or convert the data to instruction"):
        encode(plain, dataset("chat", chat), max_tokens=64)


def test_truncation_keeps_the_start_and_drops_rows_left_without_loss(tokenizer):
    long_answer = {"instruction": "Count.", "input": "", "output": " ".join(["one"] * 50)}
    long_prompt = {"instruction": " ".join(["why"] * 80), "input": "", "output": "Because."}
    short = {"instruction": "Add.", "input": "", "output": "3"}
    examples, report = encode(tokenizer, dataset("instruction", long_answer, long_prompt, short), max_tokens=48)
    assert report == EncodeReport(examples=2, truncated=2, dropped=1)
    assert len(examples[0].input_ids) == 48
    (masked, prompt), (loss, answer) = runs(tokenizer, examples[0])
    assert not masked and loss and answer.startswith("one one") and END not in answer
    with pytest.raises(ValueError, match="max_tokens=1 must be an int >= 2"):
        encode(tokenizer, dataset("text", {"text": "a"}), max_tokens=1)


def test_a_template_that_rewrites_earlier_turns_is_refused(plain):
    t = copy.deepcopy(plain)
    # the generation prompt is not where the assistant's turn starts: "Hi|ASSISTANT:" vs "Hi|Yo|"
    t.chat_template = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(ValueError, match=r"mem\.jsonl:1: cannot find assistant message 1 .* not a prefix"):
        encode(t, dataset("chat", chat), max_tokens=64)
    t.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"mem\.jsonl:1: the chat template rejected this conversation: roles must"):
        encode(t, dataset("chat", chat), max_tokens=64)
