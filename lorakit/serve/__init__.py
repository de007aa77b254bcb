"""`lorakit serve`: an OpenAI-compatible HTTP server over one base model and any number of LoRA adapters,
each adapter a model name, requests for different adapters decoded together in one batch.

    engine.py    the model, its adapters, and the thread that batches every request step by step
    batch.py     the running rows' KV cache: rows join (prefill) and leave between decode steps
    sampling.py  greedy / temperature / top_p, stop strings
    schemas.py   OpenAI's request, response and error shapes
    app.py       the FastAPI routes and `serve()` (uvicorn)
"""
