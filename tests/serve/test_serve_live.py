"""A real `medcot serve` process on the embedded model, driven by the official `openai` client: JSON and
streamed answers with the reasoning field, errors through the client, and secrets kept out of the log.
(Client disconnects and load run against the tiny model in test_serve_load.py: same server, faster model.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import openai
import pytest
from serve_utils import LiveServer, chat, server_env

from medcot.cli import main

pytestmark = pytest.mark.slow  # a live server process on the embedded model

KEY = "sk-medcot-live-SECRET-4821"
HF = "hf_liveSECRETtoken9876543"
QUESTION = "A child has a barking cough and stridor after a cold. What is the likely diagnosis?"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(
        ["model.device=cpu", "generate.max_new_tokens=8", "serve.max_tokens_limit=64", "serve.max_batch_size=4"],
        env=server_env(MEDCOT_API_KEY=KEY, HF_TOKEN=HF),
        log_path=tmp_path_factory.mktemp("live") / "serve.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _reasoning(obj) -> tuple[str | None, str | None]:
    # medcot's extra fields reach the openai client as pydantic extras (as with vLLM and DeepSeek).
    return getattr(obj, "reasoning", None), getattr(obj, "reasoning_content", None)


def test_models(oai):
    assert [m.id for m in oai.models.list()] == ["medcot"]


def test_non_streaming_and_streaming_agree(oai):
    kw = dict(model="medcot", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0)
    r = oai.chat.completions.create(**kw)
    msg = r.choices[0].message
    reasoning, alias = _reasoning(msg)
    assert msg.role == "assistant" and alias == reasoning
    # The default server (embedded model, seed template) answers in content: the thinking budget forces
    # </think> and the answer phase within max_tokens (before, every answer was content=None).
    assert msg.content and msg.content.strip(), r
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 20

    stream = oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    s_reasoning, s_alias, s_content, finish, usage = "", "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        a, b = _reasoning(delta)
        s_reasoning += a or ""
        s_alias += b or ""
        s_content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    # Greedy decoding: the stream is the same answer, split the same way.
    assert (s_reasoning or None, s_content or None) == (reasoning, msg.content)
    assert s_alias == s_reasoning
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.slow
def test_lm_evaluation_harness_gets_answers(live, tmp_path):
    """lm-evaluation-harness `local-chat-completions` (as docs/serve.md shows) on a local JSONL task, no hub:
    every item gets a non-empty answer, and the harness never warns about null content."""
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question": QUESTION, "answer": "croup"},
        {"question": "What is the first-line treatment for anaphylaxis?", "answer": "adrenaline"}]))
    (tmp_path / "medcot_mini.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = tmp_path / "out"
    env = {**server_env(OPENAI_API_KEY=KEY), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions", "--model_args",
         f"model=medcot,base_url={live.url}/v1/chat/completions,tokenizer_backend=None,tokenized_requests=False,"
         "num_concurrent=1,max_retries=1", "--include_path", str(tmp_path), "--tasks", "medcot_mini",
         "--apply_chat_template", "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "null content" not in run.stdout + run.stderr
    samples = [json.loads(line) for path in out.rglob("samples_medcot_mini_*.jsonl") for line in path.open()]
    assert len(samples) == 2
    for sample in samples:
        assert sample["resps"][0][0].strip(), sample  # the harness read an answer from `content`


# A local task: JSONL through the `json` dataset builder, so the harness needs no hub access. No stop strings
# (`until: []`): they would also match inside the reasoning. Greedy, 8 tokens: 4 of reasoning, 4 of answer.
LM_EVAL_TASK = """\
task: medcot_mini
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
"""


def test_wrong_key_and_limits_through_the_client(live, oai):
    bad = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="serve.max_tokens_limit"):
        oai.chat.completions.create(model="medcot", messages=[{"role": "user", "content": "q"}], max_tokens=65)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])


def test_secrets_never_in_the_log(live, oai):
    oai.chat.completions.create(model="medcot", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    log = live.log()
    assert "API key required" in log and "Uvicorn running" in log
    assert KEY not in log and HF not in log
    assert "barking cough" not in log.lower(), "conversations are not logged"


def test_refuses_a_public_address_without_key(monkeypatch, capsys):
    monkeypatch.delenv("MEDCOT_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert main(["serve", "--host", host]) == 2
        err = capsys.readouterr().err
        assert "MEDCOT_API_KEY" in err and host in err


def test_key_not_logged_by_the_app(no_secrets_env, make_client, caplog):
    """With the planted secrets in the environment, nothing the app logs (startup, 401s, answers) holds them."""
    caplog.set_level(logging.DEBUG)
    c = make_client(api_key=no_secrets_env["MEDCOT_API_KEY"])
    bad = c.post("/v1/chat/completions", json=chat("croup?"), headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    ok = c.post("/v1/chat/completions", json=chat("croup?"),
                headers={"Authorization": f"Bearer {no_secrets_env['MEDCOT_API_KEY']}"})
    assert ok.status_code == 200
    text = caplog.text + str(c.get("/health").json())
    assert "API key required" in caplog.text
    for secret in no_secrets_env.values():
        assert secret not in text
