"""The command line: help texts, the module entry point, clean errors (no traceback, non-zero exit,
nothing half-written), override placement, and `medcot ask`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import medcot.generate.batch
from medcot.cli import build_parser, main
from medcot.disclaimer import DISCLAIMER

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


# -- help -----------------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands(capsys):
    out = " ".join(_help(["--help"], capsys).split())  # argparse wraps lines
    for command in ["train", "ask", "config", "data"]:
        assert command in out
    assert "not medical advice" in out
    assert "section.key=value" in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "--help"], ["--config", "--resume", "--report-to", "--skip-bad-rows", "section.key=value"]),
        (["ask", "--help"], ["question", "--adapter", "--config"]),
        (["config", "--help"], ["show", "keys"]),
        (["config", "show", "--help"], ["config", "section.key=value"]),
        (["data", "--help"], ["check"]),
        (["data", "check", "--help"], ["file", "--skip-bad-rows", "--no-tokens"]),
    ],
)
def test_subcommand_help(argv, needles, capsys):
    out = _help(argv, capsys)
    for needle in needles:
        assert needle in out, f"{needle!r} missing from `medcot {' '.join(argv)}`"


def test_every_subcommand_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert {"train", "ask", "config", "data"} <= set(helps)
    assert all(helps.values())


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "medcot", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: medcot" in out.stdout


def test_usage_errors_exit_2(capsys):
    for argv in [[], ["fly"], ["train", "--bogus"], ["data"]]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "usage: medcot" in capsys.readouterr().err


# -- overrides may follow options -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--report-to", "none", "train.max_steps=3", "lora.r=4"],
        ["train", "train.max_steps=3", "--report-to", "none", "lora.r=4"],
        ["ask", "why?", "--adapter", "runs/x", "train.max_steps=3", "lora.r=4"],
        ["ask", "why?", "train.max_steps=3", "--adapter", "runs/x", "lora.r=4"],
        ["data", "check", "f.jsonl", "--no-tokens", "train.max_steps=3", "lora.r=4"],
    ],
)
def test_overrides_are_read_wherever_they_stand(argv, monkeypatch):
    seen = {}
    monkeypatch.setattr("medcot.cli.COMMANDS", {argv[0]: lambda args: seen.setdefault("overrides", args.overrides) and 0})
    main(argv)
    assert seen["overrides"] == ["train.max_steps=3", "lora.r=4"]


def test_stray_words_are_still_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "f.jsonl", "--no-tokens", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


# -- errors: message, exit code, no traceback, nothing half-written -------------------------------


def _run_error(argv, capsys) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert f"medcot {argv[0]}: error: " in out.err
    return out.err


def test_train_config_error_names_the_key(tmp_path, tiny_train_argv, capsys):
    err = _run_error(tiny_train_argv(tmp_path, "r", "train.max_stepz=3"), capsys)
    assert "train.max_stepz: unknown key" in err
    assert not (tmp_path / "r").exists()


def test_train_bad_data_leaves_no_run_folder(tmp_path, tiny_train_argv, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Question": "q", "Complex_CoT": "r", "Response": "a"}\n{"Question": "q", "Complex_CoT": "", "Response": "a"}\n')
    argv = tiny_train_argv(tmp_path / "runs", "r", f"data.source={bad}")
    err = _run_error(argv, capsys)
    assert f"{bad}: row 2: field 'Complex_CoT' is empty" in err
    assert not (tmp_path / "runs" / "r").exists()
    # Fixing the data and running the same command again just works: nothing stale is in the way.
    good = ASSETS / "tiny_cot.jsonl"
    assert main(tiny_train_argv(tmp_path / "runs", "r", f"data.source={good}", "train.max_steps=1")) == 0


def test_train_when_no_row_fits_is_a_clean_error(tmp_path, tiny_train_argv, capsys):
    err = _run_error(tiny_train_argv(tmp_path, "r", "train.max_seq_length=20"), capsys)
    assert "No training rows fit train.max_seq_length=20" in err and "data.overlong=truncate" in err
    assert not (tmp_path / "r").exists()


def test_train_bad_prompt_template_is_a_clean_error(tmp_path, tiny_train_argv, capsys):
    template = tmp_path / "t.txt"
    template.write_text("no placeholder")
    err = _run_error(tiny_train_argv(tmp_path, "r", f"prompt.template={template}"), capsys)
    assert "{question}" in err
    assert not (tmp_path / "r").exists()


def test_train_4bit_on_cpu_is_a_clean_error(tmp_path, tiny_train_argv, capsys):
    err = _run_error(tiny_train_argv(tmp_path, "r", "model.quantization=4bit"), capsys)
    assert "model.quantization=4bit needs a CUDA GPU" in err and "model.allow_fallback=true" in err
    assert not (tmp_path / "r").exists()


def test_train_skip_bad_rows_flag(tmp_path, tiny_train_argv, capsys):
    rows = (ASSETS / "tiny_cot.jsonl").read_text() + "{broken json\n"
    data = tmp_path / "d.jsonl"
    data.write_text(rows)
    assert main([*tiny_train_argv(tmp_path, "r", f"data.source={data}", "train.max_steps=1"), "--skip-bad-rows"]) == 0
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["data"]["bad_rows_skipped"] == 1


# -- ask ------------------------------------------------------------------------------------------


def test_ask_with_an_adapter_streams_reasoning_and_answer(tiny_run_dir, capsys):
    assert main(["ask", "What is the first-line treatment for anaphylaxis?", "--adapter", str(tiny_run_dir),
                 "generate.max_new_tokens=6"]) == 0
    out = capsys.readouterr()
    assert DISCLAIMER in out.err
    lines = out.out.splitlines()
    assert lines[0] == "--- reasoning ---"
    assert "--- answer ---" in lines
    # A 2-step random model does not finish its reasoning in 6 tokens: ask says so rather than show nothing.
    assert "(none: the reasoning did not finish within generate.max_new_tokens=6)" in out.out
    assert "[stopped at generate.max_new_tokens=6: the output may be cut short]" in out.err


def test_ask_without_adapter_uses_the_configured_model(tiny_model_dir, capsys):
    assert main(["ask", "Why?", f"model.name_or_path={tiny_model_dir}", "generate.max_new_tokens=3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("--- reasoning ---\n") and "--- answer ---" in out.out
    assert DISCLAIMER in out.err


def test_ask_shows_reasoning_and_answer_apart(tiny_run_dir, capsys, monkeypatch):
    """The streamed text is split at </think>: reasoning above, answer below, the tag itself in neither."""
    pieces = ["Fever with ", "dysuria.\n", "Flank pain: kidney.</think>\n\n", "Acute ", "pyelonephritis."]

    def stream(*args, **kwargs):  # like batch.stream: the pieces, then the whole Generation as its return value
        yield from pieces
        return medcot.generate.batch.Generation("".join(pieces), num_tokens=12, finished=True)

    monkeypatch.setattr(medcot.generate.batch, "stream", stream)
    assert main(["ask", "Diagnosis?", "--adapter", str(tiny_run_dir)]) == 0
    out = capsys.readouterr().out
    reasoning, answer = out.split("--- answer ---\n")
    assert reasoning == "--- reasoning ---\nFever with dysuria.\nFlank pain: kidney.\n"
    assert answer == "Acute pyelonephritis.\n"


def test_ask_with_a_folder_that_is_not_a_run(tmp_path, capsys):
    err = _run_error(["ask", "Why?", "--adapter", str(tmp_path)], capsys)
    assert "holds no adapter" in err and "medcot train" in err
