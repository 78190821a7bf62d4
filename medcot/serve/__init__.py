"""Serving: an OpenAI-compatible HTTP API (reasoning apart from the answer) and a chat page.

    medcot serve [--adapter RUN_DIR] [--host 127.0.0.1] [--port 8000] [serve.max_batch_size=16 ...]

protocol.py  OpenAI request/response models and the error envelope
chat.py      a conversation -> the training prompt (seed or chat template)
(continuous batching and the reasoning split live in medcot/generate/)
security.py  API key, loopback rule, body-size limit, security headers
app.py       the FastAPI app (routes, lifespan, SSE) and `serve()`
static/      the chat page (no build step, no CDN)
"""

from medcot.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
