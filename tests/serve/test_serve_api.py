"""Route by route with FastAPI's TestClient: every status code and error path, the SSE format, the
reasoning/answer split. The model is the tiny Llama whose tokens follow a script (serve_utils.SCRIPTS)."""

from __future__ import annotations

import re
import threading
import time

import pytest
from serve_utils import SCRIPTS, chat, joined, read_sse

import medcot.serve.app as app_module

CROUP_REASONING, CROUP_ANSWER = (part.strip() for part in SCRIPTS["croup"].split("</think>"))


def assert_error(r, status: int, type_: str, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == type_ and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# -- GET routes -----------------------------------------------------------------------------------------


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "medcot" and body["auth_required"] is False
    assert body["running"] == 0 and body["waiting"] == 0 and "not medical advice" in body["disclaimer"]


def test_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["medcot"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["owned_by"] == "medcot"
    assert client.get("/v1/models/medcot").json()["id"] == "medcot"


def test_unknown_model_is_404(client):
    assert_error(client.get("/v1/models/gpt-4o"), 404, "invalid_request_error", "model", "model_not_found")
    r = client.post("/v1/chat/completions", json=chat("croup?", model="gpt-4o"))
    err = assert_error(r, 404, "invalid_request_error", "model", "model_not_found")
    assert "'medcot'" in err["message"]


def test_chat_page_and_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "not medical advice" in r.text and "/static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]  # no CDN: nothing loads from elsewhere
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 200 and not re.search(r"https?://", r.text), f"{path} loads from elsewhere"


def test_unknown_route_and_wrong_method_use_the_envelope(client):
    assert_error(client.get("/v1/nothing"), 404, "invalid_request_error")
    assert_error(client.get("/v1/chat/completions"), 405, "invalid_request_error")


def test_openapi_schema_lists_the_models(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert {"ChatCompletionRequest", "ChatCompletionResponse", "ErrorResponse"} <= set(schema["components"]["schemas"])


# -- POST /v1/chat/completions ---------------------------------------------------------------------------


def test_completion_splits_reasoning_from_answer(client):
    r = client.post("/v1/chat/completions", json=chat("What causes croup?", model="medcot"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "medcot"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    msg = choice["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == CROUP_ANSWER
    assert msg["reasoning"] == msg["reasoning_content"] == CROUP_REASONING
    usage = body["usage"]
    assert usage["completion_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_never_closed_reasoning_gets_an_answer(client):
    """The thinking budget (serve.thinking_budget, here capped by max_tokens) forces </think> and an answer phase:
    content is never null on the default server, as it was when all 10 tokens went into the reasoning."""
    r = client.post("/v1/chat/completions", json=chat("unfinished business", max_tokens=10))
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 10
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 5}  # half of a short max_tokens answers
    assert SCRIPTS["unfinished"].startswith(choice["message"]["reasoning"])
    assert choice["message"]["content"], "the forced answer phase"


def test_eos_inside_the_reasoning_gets_an_answer(client):
    """The model stops (EOS) without closing its reasoning: the EOS ends the reasoning, </think> is forced and
    the answer generated."""
    reasoning, answer = SCRIPTS["unclosed"].split("<eos>")
    choice = client.post("/v1/chat/completions", json=chat("unclosed", max_tokens=40)).json()["choices"][0]
    assert (choice["message"]["reasoning"], choice["message"]["content"]) == (reasoning, answer)
    assert choice["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json=chat("unclosed", max_tokens=40, stream=True)) as r:
        chunks, done = read_sse(r.iter_lines())
    assert done and (joined(chunks, "reasoning"), joined(chunks, "content")) == (reasoning, answer)


def test_without_a_budget_the_reasoning_may_stay_unclosed(make_client):
    c = make_client("serve.thinking_budget=null")
    choice = c.post("/v1/chat/completions", json=chat("unfinished business", max_tokens=10)).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert SCRIPTS["unfinished"].startswith(choice["message"]["reasoning"])


@pytest.mark.parametrize(
    ("extra", "reasoning_tokens"),
    [({"reasoning_effort": "none"}, 0), ({"max_thinking_tokens": 0}, 0), ({"max_thinking_tokens": 7}, 7),
     ({"reasoning_effort": "low", "ignore_eos": True}, 128)],
)
def test_per_request_thinking_control(make_client, extra, reasoning_tokens):
    """max_thinking_tokens and reasoning_effort (none 0, low 128, ...) set the budget; without max_tokens the
    request gets room for the whole budget and its answer."""
    c = make_client("serve.thinking_budget=null")
    r = c.post("/v1/chat/completions", json=chat("unfinished business", **extra))
    body = r.json()
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens
    msg = body["choices"][0]["message"]
    if not extra.get("ignore_eos"):  # past its script the tiny model writes only newlines: no visible answer
        assert msg["content"]
    if reasoning_tokens:
        assert msg["reasoning"][:30] == SCRIPTS["unfinished"][:30]
    else:
        assert msg["reasoning"] is None and SCRIPTS["unfinished"].startswith(msg["content"])


def test_thinking_control_is_validated(client):
    body = chat("q", max_thinking_tokens=5, reasoning_effort="low")
    assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error", "max_thinking_tokens")
    assert_error(client.post("/v1/chat/completions", json=chat("q", reasoning_effort="extreme")), 400,
                 "invalid_request_error", "reasoning_effort")
    assert_error(client.post("/v1/chat/completions", json=chat("q", max_thinking_tokens=-1)), 400,
                 "invalid_request_error", "max_thinking_tokens")


def test_answer_without_think_tags_is_all_content(make_client):
    """The chat template of the embedded tokenizer does not open <think>: a plain answer is content."""
    c = make_client("prompt.template=chat")
    msg = c.post("/v1/chat/completions", json=chat("plain question")).json()["choices"][0]["message"]
    assert msg["content"] == SCRIPTS["plain"] and msg["reasoning"] is None and "reasoning_content" in msg
    msg = c.post("/v1/chat/completions", json=chat("tagged question")).json()["choices"][0]["message"]
    assert (msg["reasoning"], msg["content"]) == ("Fever and flank pain.", "Pyelonephritis.")


def test_stream_format(client):
    with client.stream("POST", "/v1/chat/completions", json=chat("croup?", stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = read_sse(r.iter_lines())
    assert done, "the stream ends with data: [DONE]"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(chunks, "reasoning") == joined(chunks, "reasoning_content") == CROUP_REASONING
    assert joined(chunks, "content") == CROUP_ANSWER
    assert len(chunks) > 10, "streamed piece by piece"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"][0]["delta"] == {}
    for c in chunks[1:-1]:  # each delta carries one kind of text
        delta = c["choices"][0]["delta"]
        assert set(delta) in ({"content"}, {"reasoning", "reasoning_content"})


def test_stream_include_usage(client):
    body = chat("croup?", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks, done = read_sse(r.iter_lines())
    assert done
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 10
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    assert joined(chunks, "content") == CROUP_ANSWER


def test_stream_without_think_in_prompt(make_client):
    c = make_client("prompt.template=chat")
    with c.stream("POST", "/v1/chat/completions", json=chat("tagged", stream=True)) as r:
        chunks, done = read_sse(r.iter_lines())
    assert done
    assert (joined(chunks, "reasoning"), joined(chunks, "content")) == ("Fever and flank pain.", "Pyelonephritis.")


def test_stop_sequence_ends_the_answer(client):
    body = chat("croup?", stop=["parainfluenza"])
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "Croup, most often caused by"  # stop string excluded, as OpenAI
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks, _ = read_sse(r.iter_lines())
    assert joined(chunks, "content") == "Croup, most often caused by"


def test_multi_turn_conversation(client):
    messages = [
        {"role": "system", "content": "You teach medical students."},
        {"role": "user", "content": "What causes croup?"},
        {"role": "assistant", "content": CROUP_ANSWER},
        {"role": "user", "content": "And anaphylaxis, how is it treated?"},
    ]
    msg = client.post("/v1/chat/completions", json={"messages": messages}).json()["choices"][0]["message"]
    assert msg["content"] == SCRIPTS["anaphylaxis"].split("</think>")[1].strip()


# -- limits, validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "doctor", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 42}]}, None),
        (chat("q", temperature=3), "temperature"),
        (chat("q", temperature="hot"), "temperature"),
        (chat("q", top_p=0), "top_p"),
        (chat("q", max_tokens=0), "max_tokens"),
        (chat("q", max_tokens="many"), "max_tokens"),
        (chat("q", seed=2**70), "seed"),
        (chat("q", stream="yes please"), "stream"),
        (chat("q", stop=[1, 2]), None),
    ],
)
def test_invalid_bodies_are_400(client, body, param):
    err = assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param)
    assert err["message"].startswith("Invalid request:")


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (chat("q", max_tokens="2"), "max_tokens", "valid integer"),
        (chat("q", max_tokens=True), "max_tokens", "valid integer"),
        (chat("q", max_tokens=2.0), "max_tokens", "valid integer"),
        (chat("q", max_completion_tokens="8"), "max_completion_tokens", "valid integer"),
        (chat("q", stream="yes"), "stream", "valid boolean"),
        (chat("q", stream=1), "stream", "valid boolean"),
        (chat("q", temperature="0.5"), "temperature", "valid number"),
        (chat("q", temperature=True), "temperature", "valid number"),
        (chat("q", seed="7"), "seed", "valid integer"),
        (chat("q", ignore_eos="true"), "ignore_eos", "valid boolean"),
        (chat("q", stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage",
         "valid boolean"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "is missing"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", "is missing"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content", "is empty"),
        ({"messages": [{"role": "user", "content": "  \n "}]}, "messages.0.content", "is empty"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0.content", "is empty"),
        ({"messages": [{"role": "system"}, {"role": "user", "content": "q"}]}, "messages.0.content", "is missing"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                       {"role": "user", "content": ""}]}, "messages.2.content", "is empty"),
    ],
)
def test_strict_types_are_400_naming_the_field(client, body, param, says):
    """As the OpenAI API: a string, bool or float where an integer goes, a string for a bool, a user message
    without text are refused (they used to be converted, or answered as an empty question)."""
    err = assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    assert err["param"] == param or err["param"].startswith(param + "."), err
    assert says in err["message"] and param.split(".")[0] in err["message"].replace("[", ".")


def test_an_assistant_turn_may_have_null_content(client):
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                         {"role": "user", "content": "croup?"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty"])
def test_nan_and_infinity_must_be_finite(client, field, value):
    import json

    raw = json.dumps(chat("q", **{field: value}))  # NaN / Infinity: Python's JSON reads them, the spec has none
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_request_error", field)
    assert f"{field}: must be a finite number" in err["message"] and "less than" not in err["message"]


@pytest.mark.parametrize(
    ("headers", "got"),
    [({"content-type": "text/plain"}, "'text/plain'"),
     ({"content-type": "application/x-www-form-urlencoded"}, "'application/x-www-form-urlencoded'"),
     ({}, "no Content-Type header")],
)
def test_a_body_not_sent_as_json_says_to_send_application_json(client, headers, got):
    import json

    r = client.post("/v1/chat/completions", content=json.dumps(chat("croup?")), headers=headers)
    err = assert_error(r, 400, "invalid_request_error", "Content-Type", "invalid_content_type")
    assert "Content-Type: application/json" in err["message"] and got in err["message"]
    assert "dictionary" not in err["message"]
    ok = {"content-type": "application/json; charset=utf-8"}
    assert client.post("/v1/chat/completions", content=json.dumps(chat("croup?")), headers=ok).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
     ({"presence_penalty": 0.5}, "presence_penalty"), ({"response_format": {"type": "json_object"}}, "response_format"),
     ({"stop": ["a", "b", "c", "d", "e"]}, "stop")],
)
def test_unsupported_features_are_400_naming_the_field(client, extra, param):
    r = client.post("/v1/chat/completions", json=chat("q", **extra))
    err = assert_error(r, 400, "invalid_request_error", param)
    assert param in err["message"]


def test_last_message_must_be_the_user(client):
    body = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error", "messages.1.role")


def test_image_parts_are_400(client):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert_error(r, 400, "invalid_request_error", "messages.0.content.0.type")


def test_bad_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_request_error")
    assert "not valid JSON" in err["message"]


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/chat/completions", json=chat("croup?", metadata={"a": "b"}, prompt_cache_key="k"))
    assert r.status_code == 200


def test_max_tokens_above_the_limit_is_400(make_client):
    c = make_client("serve.max_tokens_limit=32")
    err = assert_error(c.post("/v1/chat/completions", json=chat("q", max_tokens=33)), 400, "invalid_request_error",
                       "max_tokens")
    assert "serve.max_tokens_limit" in err["message"] and "32" in err["message"]
    assert_error(c.post("/v1/chat/completions", json=chat("q", max_completion_tokens=99)), 400,
                 "invalid_request_error", "max_completion_tokens")
    # Without max_tokens the server default (generate.max_new_tokens=64) is capped at the limit.
    assert c.post("/v1/chat/completions", json=chat("unfinished")).json()["usage"]["completion_tokens"] == 32


def test_prompt_too_long_is_400(make_client):
    c = make_client("serve.max_prompt_tokens=150")
    err = assert_error(c.post("/v1/chat/completions", json=chat("word " * 200)), 400, "invalid_request_error",
                       "messages", "context_length_exceeded")
    assert "150 tokens" in err["message"] and "serve.max_prompt_tokens" in err["message"]


def test_body_too_large_is_413(make_client):
    c = make_client("serve.max_body_bytes=2000")
    big = chat("x" * 3000)
    assert_error(c.post("/v1/chat/completions", json=big), 413, "invalid_request_error", code="request_too_large")

    def chunked():  # no Content-Length: the limit is counted while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, "invalid_request_error", code="request_too_large")
    assert c.post("/v1/chat/completions", json=chat("croup?")).status_code == 200


# -- auth, CORS -----------------------------------------------------------------------------------------

KEY = "sk-medcot-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed(make_client):
    return make_client(api_key=KEY)


@pytest.mark.parametrize("header", [None, "", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", KEY])
def test_missing_or_wrong_key_is_401(keyed, header):
    """A missing key and a wrong one need different fixes, so the messages differ."""
    headers = {"Authorization": header} if header is not None else {}
    for r in (keyed.post("/v1/chat/completions", json=chat("croup?"), headers=headers),
              keyed.get("/v1/models", headers=headers)):
        err = assert_error(r, 401, "invalid_request_error", code="invalid_api_key")
        assert KEY not in err["message"] and r.headers["www-authenticate"] == "Bearer"
        if header:
            assert "not accepted" in err["message"] and "requires an API key" not in err["message"]
        else:
            assert "requires an API key" in err["message"] and "not accepted" not in err["message"]


def test_right_key_is_accepted_and_page_stays_open(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/v1/models", headers=auth).status_code == 200
    assert keyed.post("/v1/chat/completions", json=chat("croup?"), headers=auth).status_code == 200
    assert keyed.get("/health").json()["auth_required"] is True
    assert keyed.get("/").status_code == 200


def test_auth_comes_before_parsing(keyed):
    r = keyed.post("/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_cors_is_off_unless_configured(client, make_client):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/v1/chat/completions", json=chat("croup?"), headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    c = make_client("serve.cors_origins=[https://ward.example]", api_key=KEY)
    r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://ward.example",
                                                   "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ward.example"
    r = c.options("/v1/chat/completions", headers=preflight)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


# -- capacity, timeouts, failures ------------------------------------------------------------------------


def _in_background(c, body):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", c.post("/v1/chat/completions", json=body)))
    thread.start()
    return thread, out


def _wait_for(c, **load):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = c.get("/health").json()
        if all(h[k] == v for k, v in load.items()):
            return
        time.sleep(0.02)
    raise AssertionError(f"server never reached {load}: {h}")


@pytest.mark.slow
def test_past_capacity_is_429_with_retry_after(make_client):
    c = make_client("serve.max_batch_size=1", "serve.max_queue=1", step_delay_s=0.05)
    first, out1 = _in_background(c, chat("unfinished", max_tokens=30))
    _wait_for(c, running=1)
    second, out2 = _in_background(c, chat("croup?"))
    _wait_for(c, waiting=1)
    r = c.post("/v1/chat/completions", json=chat("croup?"))
    err = assert_error(r, 429, "rate_limit_error", code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and "serve.max_queue" in err["message"]
    first.join(30)
    second.join(30)
    assert out1["r"].status_code == 200 and out2["r"].status_code == 200  # the queued one was served
    assert c.get("/health").json()["stats"]["rejected"] == 1


def test_waiting_past_the_timeout_is_503_at_the_deadline(make_client):
    # Each step takes 1.5 s: the first request holds the only slot past the second one's deadline. The 503 comes
    # at the deadline, not when the engine next looks at its queue (a step later).
    c = make_client("serve.max_batch_size=1", "serve.request_timeout_s=0.5", step_delay_s=1.5)
    first, out = _in_background(c, chat("unfinished", max_tokens=3))
    _wait_for(c, running=1)
    t0 = time.monotonic()
    r = c.post("/v1/chat/completions", json=chat("croup?"))
    elapsed = time.monotonic() - t0
    err = assert_error(r, 503, "server_error", code="timeout")
    assert int(r.headers["retry-after"]) >= 1 and "serve.request_timeout_s=0.5" in err["message"]
    assert 0.4 < elapsed < 1.2, elapsed
    first.join(30)


def test_generation_past_the_timeout_is_503_never_a_short_200(make_client):
    """A request still generating at its deadline: 503 (JSON), or an error event and [DONE] (a started stream),
    never a 200 that looks finished."""
    c = make_client("serve.request_timeout_s=0.6", step_delay_s=0.05)
    t0 = time.monotonic()
    r = c.post("/v1/chat/completions", json=chat("unfinished", max_tokens=60))
    assert_error(r, 503, "server_error", code="timeout")
    assert time.monotonic() - t0 < 0.6 + 0.5
    with c.stream("POST", "/v1/chat/completions", json=chat("unfinished", max_tokens=60, stream=True)) as r:
        assert r.status_code == 200
        chunks, done = read_sse(r.iter_lines())
    assert done and chunks[-1]["error"]["code"] == "timeout"
    assert not any(c["choices"][0]["finish_reason"] for c in chunks[:-1])
    deadline = time.monotonic() + 5  # the engine drops them at its next step and counts them
    while c.get("/health").json()["stats"]["timed_out"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.get("/health").json()["stats"]["timed_out"] == 2


def test_generation_error_is_500_and_the_server_recovers(make_client, monkeypatch):
    c = make_client()
    engine = c.app.state.life.served.engine
    calls = {"n": 0}
    real = engine._forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", flaky)
    err = assert_error(c.post("/v1/chat/completions", json=chat("croup?")), 500, "server_error")
    assert "CUDA" not in err["message"]  # internals stay in the server log
    assert c.post("/v1/chat/completions", json=chat("croup?")).status_code == 200
    assert c.get("/health").json()["stats"]["failed"] == 1


def test_unexpected_exception_is_500_envelope(client, monkeypatch):
    def boom(*a, **k):
        raise KeyError("bug")

    monkeypatch.setattr(app_module, "build_prompt", boom)
    assert_error(client.post("/v1/chat/completions", json=chat("croup?")), 500, "server_error", code="internal_error")
