"""Generate: the one place that turns prompts into tokens (eval, serve, ask, the training report).

    engine.py     the engine: continuous batching, per-request sampling, stop strings, cancellation, the
                  thinking budget; `submit` (the server's asyncio requests) or `run` (in the caller's thread)
    runner.py     the model's own modules over a static KV cache: batched prefill, decode steps as CUDA graphs
    kv.py         the KV cache: one fixed block per slot
    sampler.py    token choice on the device (greedy, temperature, top-p, seeded)
    detok.py      incremental detokenization
    batch.py      `generate` (a batch of prompts) and `stream` (one prompt, piece by piece) on the engine
    budget.py     eval's answers with a thinking budget, on the engine
    reasoning.py  the streaming reasoning/answer splitter (`<think>` ... `</think>`)
"""
