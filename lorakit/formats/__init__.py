"""File formats, each a pure function over state dicts: Hugging Face dense export (hf)."""
