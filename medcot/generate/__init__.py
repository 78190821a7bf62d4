"""Generate: the one place that turns prompts into tokens.

    reasoning.py  the streaming reasoning/answer splitter (`<think>` ... `</think>`)
    batch.py      batched and streamed generation with the KV cache
    budget.py     the thinking budget: reasoning capped, then `</think>` and the answer phase
    engine.py     continuous batching for many concurrent requests (the server)
"""
