"""`medcot serve` on the command line: help text, flags and overrides into `serve.*`, config validation."""

from __future__ import annotations

import pytest

import medcot.serve as serve_pkg
from medcot.cli import main
from medcot.config import config_help, load_config
from medcot.errors import ConfigError


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


BAD = ["serve.max_batch_size=0", "serve.port=70000", "serve.max_queue=-1", "serve.request_timeout_s=0"]


def test_serve_keys_are_documented_and_validated():
    text = config_help()
    for key in ("max_batch_size", "max_queue", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes",
                "request_timeout_s", "cors_origins"):
        assert f"  {key}:" in text.split("serve:", 1)[1]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BAD, "serve.nope=1"])
    assert "serve.nope: unknown key" in str(e.value)  # unknown keys are reported first, on their own
    with pytest.raises(ConfigError) as e:
        load_config(None, BAD)
    for key in ("serve.max_batch_size", "serve.port", "serve.max_queue", "serve.request_timeout_s"):
        assert key in str(e.value)
