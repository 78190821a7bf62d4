"""The server's life: it listens while the model loads (readiness vs liveness), exits with the error of a
failed load, drains on SIGTERM (and logs a short startup summary), and logs a decode rate that leaves out
the time to first token."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from serve_utils import (
    LiveServer,
    chat,
    free_port,
    serve_in_thread,
    server_env,
    tiny_config,
)

from medcot.errors import ModelSetupError
from medcot.generate.engine import Event, Ticket
from medcot.serve import create_app
from medcot.serve.app import request_log_line

# -- readiness -----------------------------------------------------------------------------------------


def test_listens_while_the_model_loads(tiny_model_dir, monkeypatch):
    """Orchestrators need an answer during a long load: /health is 503 "loading" (readiness), /health/live 200
    (liveness), requests get 503 + Retry-After; once loaded, /health is 200 and requests are served."""
    from medcot.model.load import load_for_inference

    monkeypatch.delenv("MEDCOT_API_KEY", raising=False)
    gate = threading.Event()

    def slow_load(cfg, adapter):
        assert gate.wait(60), "the test never opened the gate"
        return load_for_inference(cfg, adapter)

    app = create_app(tiny_config(tiny_model_dir), load_model=slow_load)
    try:
        # Before: uvicorn only listened once the lifespan (the whole load) was done; this would time out.
        with serve_in_thread(app, ready=False, listen_timeout=20) as url:
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            assert int(health.headers["retry-after"]) >= 1
            assert httpx.get(f"{url}/health/live").json() == {"status": "alive"}
            r = httpx.post(f"{url}/v1/chat/completions", json=chat("croup?"))
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "medcot"
            gate.set()
            deadline = time.monotonic() + 60
            while (health := httpx.get(f"{url}/health")).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert health.json()["status"] == "ok"
            r = httpx.post(f"{url}/v1/chat/completions", json=chat("croup?", max_tokens=3), timeout=60)
            assert r.status_code == 200
    finally:
        gate.set()


def _failing_load(cfg, adapter):
    raise ModelSetupError("model.dtype=bf16 needs a GPU; use model.dtype=fp32 on the CPU")


def test_a_failed_load_says_failed(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MEDCOT_API_KEY", raising=False)
    app = create_app(tiny_config(tiny_model_dir), load_model=_failing_load)
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "failed"
        r = c.post("/v1/chat/completions", json=chat("croup?"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed"
        assert "bf16" not in r.json()["error"]["message"]  # details go to the log, not to clients


def test_serve_exits_with_the_load_error(tiny_model_dir, monkeypatch):
    """A load that fails after the server started listening still ends `medcot serve` with its error."""
    import medcot.model.load as load_module
    from medcot.serve import app as app_module

    monkeypatch.delenv("MEDCOT_API_KEY", raising=False)
    monkeypatch.setattr(load_module, "load_for_inference", _failing_load)
    out = {}

    def run():
        try:
            out["rc"] = app_module.serve(tiny_config(tiny_model_dir, f"serve.port={free_port()}"))
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "serve() kept running after the model failed to load"
    assert isinstance(out.get("error"), ModelSetupError)


# -- graceful drain ----------------------------------------------------------------------------------------


def _stream(url: str, body: dict, out: dict) -> None:
    lines = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    out.setdefault("first_at", time.monotonic())
    except httpx.HTTPError as e:  # "incomplete chunked read": the stream was cut
        out["cut"] = repr(e)
    out["lines"] = lines


@pytest.mark.slow
def test_sigterm_drains(tiny_model_dir, tmp_path):
    """SIGTERM mid-stream: new requests get 503 + Retry-After and /health says "draining"; a request that
    finishes within serve.drain_timeout_s ends normally; one that does not ends with an error event and
    [DONE] (before, streams were cut: "incomplete chunked read"); then the process exits 0."""
    server = LiveServer([f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
                         "serve.drain_timeout_s=3", "serve.thinking_budget=null",
                         "serve.max_tokens_limit=20000"],  # room for a request that outlasts the grace period
                        env=server_env(), log_path=tmp_path / "serve.log")
    try:
        long, short = {}, {}
        threads = [threading.Thread(target=_stream, args=(server.url, chat("q", max_tokens=20000, ignore_eos=True),
                                                            long)),
                   threading.Thread(target=_stream, args=(server.url, chat("q", max_tokens=30, ignore_eos=True),
                                                            short))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not ("first_at" in long and "first_at" in short) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        time.sleep(0.3)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat("q"), timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t_term < 3 + 10
        for out in (long, short):
            assert "cut" not in out and out["lines"][-1] == "data: [DONE]", out
        finished = [json.loads(x[6:]) for x in short["lines"][:-1]]
        assert finished[-1]["choices"][0]["finish_reason"] == "length"  # finished within the grace period
        last = json.loads(long["lines"][-2][6:])
        assert last["error"]["code"] == "shutting_down"  # cut at the end of the grace period, with notice
        log = server.log()
        assert "draining: " in log and "drain timeout: ending 1 open requests" in log
        _assert_short_startup_summary(log)
    finally:
        server.stop()


def _assert_short_startup_summary(log: str) -> None:
    """About ten lines (address, uvicorn's, readiness, limits) up to "limits |", never the resolved config
    (that is `--verbose`); checked on the drain test's server to spare a second process start."""
    lines = [line for line in log.splitlines() if "HTTP/1.1" not in line and "Loading weights" not in line]
    startup = lines[:next(i for i, line in enumerate(lines) if line.startswith("limits |")) + 1]
    assert len(startup) <= 10, startup
    assert any(line.startswith("ready | model medcot") for line in startup)
    assert "lora:" not in log and "learning_rate" not in log


# -- logs ---------------------------------------------------------------------------------------------------


def _ticket(submitted: float, first: float | None) -> Ticket:
    t = Ticket.__new__(Ticket)  # the fields the log line reads; no event loop needed
    t.id, t.submitted, t.first_token_at = "abc123", submitted, first
    return t


def test_decode_rate_leaves_out_the_time_to_first_token():
    """11 tokens: the first at 2 s (prefill), the other 10 over the next second: 10 tok/s, not 11 (or, for a
    one-token answer, the 1586 tok/s of 1 token over the ~0 s after the first)."""
    done = Event("done", finish_reason="stop", prompt_tokens=50, completion_tokens=11, reasoning_tokens=4)
    line = request_log_line(_ticket(100.0, 102.0), done, now=103.0)
    assert "decode 10.0 tok/s" in line and "ttft 2.00 s" in line and "total 3.00 s" in line
    one = Event("done", finish_reason="length", prompt_tokens=50, completion_tokens=1)
    assert "decode - tok/s" in request_log_line(_ticket(100.0, 102.0), one, now=102.0006)
