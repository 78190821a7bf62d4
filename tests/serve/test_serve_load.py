"""Bounded load on loopback against a real `medcot serve` process (the tiny model, so CI stays fast):
32 concurrent streaming clients; each request ends with a complete answer or a 429, none hangs, the server
stays up, memory stays flat; a client that hangs up stops its generation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serve_utils import LiveServer, chat, server_env

pytestmark = pytest.mark.slow  # 32 concurrent clients on a live server

CLIENTS, PER_CLIENT, MAX_TOKENS = 32, 2, 12


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    server = LiveServer(
        [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
         "serve.max_batch_size=8", "serve.max_queue=8", "serve.request_timeout_s=60"],
        env=server_env(), log_path=tmp_path_factory.mktemp("load") / "serve.log",
    )
    yield server
    server.stop()


async def _one(client: httpx.AsyncClient, i: int) -> tuple[str, dict]:
    """One streamed request; returns ("ok", info) for a complete answer, ("429", info) for a refusal."""
    body = chat(f"Question {i}: what causes croup?", max_tokens=MAX_TOKENS, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code == 429:
            err = json.loads(await r.aread())["error"]
            assert err["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
            return "429", {}
        assert r.status_code == 200, await r.aread()
        chunks, done = [], False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line:
                chunks.append(json.loads(line.removeprefix("data: ")))
    assert done, "stream ended without [DONE]"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["length"], finish
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS  # a complete answer: every token arrived
    text = "".join((c["choices"][0]["delta"].get("reasoning") or "") + (c["choices"][0]["delta"].get("content") or "")
                   for c in chunks if c["choices"])
    return "ok", {"text": text}


async def _load(url: str) -> list[str]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(60.0)) as client:

        async def worker(w: int) -> list[str]:
            out = []
            for k in range(PER_CLIENT):
                # No request may hang: each has a hard deadline well above its worst case under load.
                status, _ = await asyncio.wait_for(_one(client, w * PER_CLIENT + k), timeout=90)
                out.append(status)
            return out

        results = await asyncio.gather(*[worker(w) for w in range(CLIENTS)])
    return [s for r in results for s in r]


def test_32_concurrent_streaming_clients(tiny_server):
    before = tiny_server.health()
    t0 = time.monotonic()
    statuses = asyncio.run(_load(tiny_server.url))
    elapsed = time.monotonic() - t0
    ok, refused = statuses.count("ok"), statuses.count("429")
    assert ok + refused == CLIENTS * PER_CLIENT
    assert ok >= 16, f"{ok} answers in {elapsed:.1f} s"  # at least batch + queue were served
    assert refused > 0, "32 clients against 8 slots + 8 queue places must see 429s"
    h = tiny_server.health()
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    assert h["stats"]["completed"] - before["stats"]["completed"] == ok
    assert h["stats"]["rejected"] - before["stats"]["rejected"] == refused
    assert h["stats"]["failed"] == 0
    print(f"\n{ok} answered, {refused} refused with 429, in {elapsed:.1f} s")


def test_memory_stays_flat_under_sustained_load(tiny_server):
    """After a first round (allocator pools warm), more rounds of the same load do not grow the process."""
    if tiny_server.health()["stats"]["completed"] == 0:  # run alone: warm up first (in file order the test above did)
        asyncio.run(_load(tiny_server.url))
    rss = [tiny_server.rss_mib()]
    for _ in range(2):
        t0 = time.monotonic()
        asyncio.run(_load(tiny_server.url))
        rss.append(tiny_server.rss_mib())
        print(f"round of {CLIENTS * PER_CLIENT} requests: {time.monotonic() - t0:.1f} s, RSS {rss[-1]:.0f} MiB")
    assert rss[-1] - rss[0] < 64, f"RSS grew from {rss[0]:.0f} to {rss[-1]:.0f} MiB under the same load"


def _wait_idle(server: LiveServer, before: dict) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = server.health()
        if h["running"] == 0 and h["stats"]["cancelled"] > before["stats"]["cancelled"]:
            return h
        time.sleep(0.1)
    raise AssertionError(f"generation did not stop after the client left: {server.health()}")


def test_client_disconnect_stops_generation(tiny_server):
    before = tiny_server.health()
    # 2,000 tokens with the server's thinking budget lifted: long enough to outlast the client on any machine
    # (the default budget would end the request after ~640 tokens, about as fast as a client gives up).
    body = chat("croup?", max_tokens=2000, max_thinking_tokens=1900, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):  # the role chunk and two deltas, then hang up
            while not next(lines):
                pass
    after = _wait_idle(tiny_server, before)
    assert after["stats"]["completed"] == before["stats"]["completed"]  # stopped, not finished

    # A non-streaming client that gives up (read timeout) is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    final = _wait_idle(tiny_server, after)
    assert final["stats"]["completed"] == before["stats"]["completed"]
    log = tiny_server.log()
    assert "client went away" in log
