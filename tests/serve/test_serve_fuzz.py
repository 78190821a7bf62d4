"""Malformed requests: bad JSON, wrong types, huge and deeply nested bodies, unknown roles, and a seeded
random mutation of valid bodies. Every answer is a success or a 4xx in the OpenAI envelope, never a 500,
and the server keeps serving."""

from __future__ import annotations

import json
import random

import pytest
from serve_utils import chat

URL = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def fuzz_client(make_client):
    return make_client("generate.max_new_tokens=4", "serve.max_body_bytes=65536")


def assert_envelope(r, statuses=(400,)):
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"] and set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"{", b"}", b"null", b"[]", b'"messages"', b"42", b"true", b'{"messages": [}', b"{'messages': []}",
        b'{"messages": [{"role": "user", "content": "hi"}],}', b"\xff\xfe\x00garbage", b'{"messages": NaN}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
        b"[" * 20000 + b"]" * 20000,  # nesting deep enough to break a recursive parser
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode() * 2,  # two documents
    ],
    ids=lambda raw: repr(raw[:24]),
)
def test_bad_json(fuzz_client, raw):
    assert_envelope(fuzz_client.post(URL, content=raw, headers=JSON))


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}], "model": 7},
        {"messages": [{"role": "user", "content": {"text": "hi"}}]},
        {"messages": [{"role": "user", "content": [1, 2]}]},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},  # a text part without text
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": ["user"], "content": "hi"}]},
        {"messages": [{"role": "function", "content": "hi", "name": "f"}]},
        {"messages": [{"role": "USER", "content": "hi"}]},
        {"messages": [None]},
        {"messages": [[]]},
        {"messages": {"role": "user", "content": "hi"}},
        {"messages": [{"role": "user", "content": "hi"}], "stream_options": "yes"},
        {"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.01},
        {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"messages": [{"role": "user", "content": "hi"}], "seed": "abc"},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ""},
    ],
)
def test_wrong_types_and_unknown_roles(fuzz_client, body):
    assert_envelope(fuzz_client.post(URL, json=body))


@pytest.mark.parametrize("size", [65537, 2_000_000])
def test_huge_bodies(fuzz_client, size):
    r = fuzz_client.post(URL, content=b'{"messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}',
                         headers=JSON)
    assert_envelope(r, (413,))
    r = fuzz_client.post(URL, content=b"x", headers={**JSON, "content-length": "999999999999"})
    assert r.status_code == 413


def test_many_messages_under_the_body_limit_hit_the_prompt_limit(fuzz_client):
    body = {"messages": [{"role": "user", "content": "tell me more " * 20}] * 200}
    r = fuzz_client.post(URL, json=body)
    assert_envelope(r)
    assert r.json()["error"]["code"] == "context_length_exceeded"


JUNK = [None, -1, 0, 1, 2**64, 1e308, -1e308, True, "", "x" * 500, "user", [], [None], {}, {"a": [1]}, 0.5, "\x00"]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
          "stream", "stream_options", "logprobs", "tools", "user", "presence_penalty", "frequency_penalty"]


def _mutate(rng: random.Random) -> dict:
    body = chat("croup?", max_tokens=3)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS + ["messages.role", "messages.content", "messages.extra"])
        value = rng.choice(JUNK)
        if field.startswith("messages."):
            if isinstance(body["messages"], list) and body["messages"] and isinstance(body["messages"][0], dict):
                body["messages"][0][field.split(".")[1]] = value
        else:
            body[field] = value
    return body


def test_random_mutations_never_500(fuzz_client):
    rng = random.Random(1234)
    seen = set()
    for _ in range(150):
        body = _mutate(rng)
        r = fuzz_client.post(URL, json=body)
        seen.add(r.status_code)
        if r.status_code == 200:
            if body.get("stream") is True:
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
        else:
            assert_envelope(r, (400, 404))
    assert 400 in seen and 200 in seen, seen
    health = fuzz_client.get("/health").json()
    assert health["status"] == "ok" and health["running"] == 0 and health["stats"]["failed"] == 0
