"""`medcot serve` on the command line: help text, flags and overrides into `serve.*`, config validation."""

from __future__ import annotations

import pytest

import medcot.serve as serve_pkg
from medcot.cli import main
from medcot.config import config_help, load_config
from medcot.errors import ConfigError, InsecureBindError
from medcot.serve.security import MIN_API_KEY_CHARS, check_bind


def test_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for needle in ("--adapter", "--host", "--port", "--config", "section.key=value", "MEDCOT_API_KEY"):
        assert needle in out


def test_flags_and_overrides_reach_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(serve_pkg, "serve", lambda cfg, adapter=None: seen.update(cfg=cfg, adapter=adapter) or 0)
    assert main(["serve", "--host", "::1", "--port", "9123", "--adapter", "runs/x", "serve.max_batch_size=3",
                 "serve.cors_origins=[http://localhost:3000]"]) == 0
    s = seen["cfg"].serve
    assert (s.host, s.port, s.max_batch_size, s.cors_origins) == ("::1", 9123, 3, ["http://localhost:3000"])
    assert seen["adapter"] == "runs/x"


BAD = ["serve.max_batch_size=0", "serve.port=70000", "serve.max_queue=-1", "serve.request_timeout_s=0",
       "serve.thinking_budget=-1", "serve.answer_tokens=0", "serve.drain_timeout_s=-1"]


def test_serve_keys_are_documented_and_validated():
    text = config_help()
    for key in ("max_batch_size", "max_queue", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes",
                "request_timeout_s", "cors_origins", "thinking_budget", "answer_tokens", "drain_timeout_s"):
        assert f"  {key}:" in text.split("serve:", 1)[1]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BAD, "serve.nope=1"])
    assert "serve.nope: unknown key" in str(e.value)  # unknown keys are reported first, on their own
    with pytest.raises(ConfigError) as e:
        load_config(None, BAD)
    for key in ("serve.max_batch_size", "serve.port", "serve.max_queue", "serve.request_timeout_s",
                "serve.thinking_budget", "serve.answer_tokens", "serve.drain_timeout_s"):
        assert key in str(e.value)


# -- weak keys beyond loopback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "says"),
    [("   ", "is blank"), ("abc", "3 characters long; the minimum is 16"), ("sk-medcot-0123456 789", "whitespace"),
     (" sk-medcot-0123456789 ", "whitespace"), ("x" * 15, "15 characters")],
)
def test_weak_keys_are_refused_beyond_loopback(key, says):
    with pytest.raises(InsecureBindError, match=says) as e:
        check_bind("0.0.0.0", key)
    assert key.strip() not in str(e.value) or not key.strip()  # the key itself is never shown
    check_bind("127.0.0.1", key)  # loopback: only a warning (serve() logs it)
    check_bind("0.0.0.0", "k" * MIN_API_KEY_CHARS)


def test_the_cli_refuses_a_weak_key_before_starting(monkeypatch, capsys):
    """It used to start on 0.0.0.0 with only a warning; now it exits 2 before anything loads or listens."""
    import uvicorn

    def never(*a, **k):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", never)
    monkeypatch.setattr(uvicorn, "run", never)
    for key in ("   ", "abc"):
        monkeypatch.setenv("MEDCOT_API_KEY", key)
        assert main(["serve", "--host", "0.0.0.0"]) == 2
        err = capsys.readouterr().err
        assert "MEDCOT_API_KEY" in err and "token_urlsafe" in err
        assert len(err.strip().splitlines()) <= 2, err  # the refusal, not a config dump before it
