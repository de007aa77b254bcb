"""File formats, each a pure function over state dicts or bytes: dense Hugging Face export (`hf`),
llama.cpp GGUF: 32-weight blocks (`gguf_blocks`), K-quants (`gguf_kquants`), tensor names and RoPE
row order (`gguf_names`), whole files in (`gguf_load`) and out, models and adapters (`gguf_export`); an
Ollama Modelfile with the chat template translated to Go templates (`ollama`); ONNX export of a merged
model, its check against PyTorch, latency and INT8 static quantization for edge deployment (`onnx`)."""
