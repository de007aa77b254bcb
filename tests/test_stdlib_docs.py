"""The embedded default dataset: real docstrings, held out by module, loss masked on prompts."""


from lorakit.data.stdlib_docs import IGNORE, TRAIN_MODULES, VALID_MODULES, collate, docstring_pairs, encode_chat


def test_pairs_are_real_and_held_out_by_module():
    train, valid = docstring_pairs(TRAIN_MODULES), docstring_pairs(VALID_MODULES)
    assert len(train) > 200 and len(valid) > 30
    assert ("What does `textwrap.dedent` do?", "Remove any common leading whitespace from every line in `text`.") in train
    modules = lambda pairs: {q.split("`")[1].rsplit(".", 1)[0] for q, _ in pairs}  # noqa: E731
    assert not modules(train) & modules(valid)


class CharTokenizer:
    """A stand-in tokenizer: one id per character, a chat template with fixed markers."""

    eos_token = "$"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<u>{messages[0]['content']}<a>"

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_prompt_tokens_are_masked_token_by_token():
    (ids, labels), = encode_chat(CharTokenizer(), [("Q?", "Yes.")], max_tokens=64)
    prompt = "<u>Q?<a>"
    assert ids == [ord(c) for c in prompt + "Yes.$"]
    assert labels == [IGNORE] * len(prompt) + [ord(c) for c in "Yes.$"]
    (ids, labels), = encode_chat(CharTokenizer(), [("Q?", "Yes.")], max_tokens=5)
    assert len(ids) == len(labels) == 5


def test_collate_pads_right_and_masks_padding():
    ids, labels, mask = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
