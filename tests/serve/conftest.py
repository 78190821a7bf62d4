"""Serve fixtures: started TestClients on the tiny model (real weights, real KV cache, real batching),
with the scripted engine of serve_utils so that every answer is known in advance."""

from __future__ import annotations

import contextlib

import pytest
from fastapi.testclient import TestClient
from serve_utils import ScriptedEngine, tiny_config, wait_ready

import medcot.serve.app as app_module
from medcot.serve import create_app


@pytest.fixture(scope="session")
def make_client(tiny_model_dir):
    """`make_client(*overrides, api_key=None, scripted=True, step_delay_s=0)` -> a started TestClient."""
    stack = contextlib.ExitStack()

    def make(*overrides: str, api_key: str | None = None, scripted: bool = True, step_delay_s: float = 0.0):
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        if api_key is None:
            mp.delenv("MEDCOT_API_KEY", raising=False)
        else:
            mp.setenv("MEDCOT_API_KEY", api_key)
        if scripted:
            mp.setattr(app_module, "Engine", type("Scripted", (ScriptedEngine,), {"step_delay_s": step_delay_s}))
        app = create_app(tiny_config(tiny_model_dir, *overrides))
        client = stack.enter_context(TestClient(app, raise_server_exceptions=False))
        wait_ready(client)
        return client

    yield make
    stack.close()


@pytest.fixture(scope="module")
def client(make_client):
    """The default app: scripted tiny model, no API key, default limits (max_tokens 64)."""
    return make_client()
