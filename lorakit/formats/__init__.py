"""File formats, each a pure function over state dicts or bytes: dense Hugging Face export (`hf`),
llama.cpp GGUF quantized blocks (`gguf_blocks`)."""
