"""The eval run on the tiny model: thinking budget, resume after an interruption, settings guard,
report files, and the small eval `medcot train` runs before and after."""

import json

import pytest

import medcot.eval.run as run_mod
from medcot.config import load_config
from medcot.errors import ConfigError
from medcot.eval.run import evaluate_for_train, run_eval
from medcot.generate.budget import FORCE_CLOSE, generate_answers
from medcot.train.report import train_eval_table


def _items(out):
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def test_thinking_budget_forces_the_answer(tiny_model_dir):
    from medcot.data.prompts import PromptFormatter
    from medcot.model.load import load_for_inference
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "generate.max_new_tokens=7"])
    model, tok, cfg = load_for_inference(cfg)
    prompts = [PromptFormatter(tok, cfg.prompt).encode_prompt(q) for q in ("Why fever?", "A longer question on sepsis?")]
    answers = generate_answers(model, tok, prompts, cfg.generate, batch_size=2, thinking_budget=6, answer_tokens=5)
    for a in answers:  # a random model never writes </think> or EOS: every output is forced, then answered
        assert a.forced and not a.closed and FORCE_CLOSE in a.text
        assert a.num_tokens == 11
    single = generate_answers(model, tok, prompts, cfg.generate, batch_size=1, thinking_budget=None, answer_tokens=5)
    assert all(not a.forced and a.num_tokens == 7 for a in single)


@pytest.mark.slow
def test_interrupted_eval_resumes_without_recomputing(tiny_overrides, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides + ["eval.benchmarks=medqa,pubmedqa"])
    out = tmp_path / "eval"
    real = run_mod.answer_items
    calls = []

    def interrupted_after_one_pubmedqa_item(*args, on_record=None, **kwargs):
        calls.append([it.id for it in args[4]])

        def keep(record):
            on_record(record)
            if record["benchmark"] == "pubmedqa":
                raise KeyboardInterrupt  # Ctrl-C while pubmedqa's other items are still generating
        return real(*args, on_record=keep, **kwargs)

    monkeypatch.setattr(run_mod, "answer_items", interrupted_after_one_pubmedqa_item)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg)
    assert [len(c) for c in calls] == [3, 3]  # each benchmark's items go to the engine together
    first = _items(out)
    # medqa's 3 items and the pubmedqa item judged before the interrupt were each saved as they were judged
    assert [r["benchmark"] for r in first] == ["medqa"] * 3 + ["pubmedqa"]

    # A crash mid-write leaves half a line: it is dropped and that item is answered again.
    with (out / "items.jsonl").open("a") as f:
        f.write('{"model": "base", "benchmark": "pubmedqa", "id": "pubmed')
    calls.clear()
    monkeypatch.setattr(run_mod, "answer_items", lambda *a, **k: (calls.append([it.id for it in a[4]]), real(*a, **k))[1])
    result = run_eval(cfg)
    assert sum(len(c) for c in calls) == 2  # only the 2 unanswered pubmedqa items were generated
    records = _items(out)
    assert len(records) == 6 and len({(r["benchmark"], r["id"]) for r in records}) == 6
    assert records[:4] == first  # earlier lines untouched
    s = result.summary["models"]["base"]["benchmarks"]
    assert s["medqa"]["n"] == 3 and s["pubmedqa"]["n"] == 3

    # Report files
    for name in ("report.md", "report.html", "accuracy.png", "summary.json", "settings.json", "cot_loss.json"):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "| benchmark | chance |" in md and "25.0%" in md and "33.3%" in md and "Held-out chain-of-thought" in md
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["models"]["base"]["benchmarks"]["medqa"]["accuracy"] <= 1
    assert summary["cot_loss"]["base"]["perplexity"] > 1

    # Stored outputs are re-read with the current extractor on every run (no generation).
    stored = _items(out)
    stored[0].update(extracted="Z", method="old-rule", correct=False)
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stored))
    calls.clear()
    run_eval(cfg)
    assert calls == [] and _items(out)[0]["method"] != "old-rule" and _items(out)[0]["extracted"] != "Z"

    # A rerun with other generation settings must not mix results; --fresh starts over.
    other = load_config(None, tiny_overrides + ["eval.benchmarks=medqa,pubmedqa", "eval.answer_tokens=4"])
    with pytest.raises(ConfigError, match=r"answer_tokens: 8 -> 4.*--fresh"):
        run_eval(other)
    calls.clear()
    run_eval(other, fresh=True)
    assert sum(len(c) for c in calls) == 6


def test_evaluate_for_train_restores_the_model(tiny_model_dir):
    from medcot.model.load import load_for_inference
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "eval.train_eval_limit=2",
                             "eval.benchmarks=medmcqa,pubmedqa", "eval.thinking_budget=4", "eval.answer_tokens=4"])
    model, tok, cfg = load_for_inference(cfg)
    model.train()
    model.config.use_cache = False
    before = evaluate_for_train(model, tok, cfg)
    assert model.training and model.config.use_cache is False
    assert set(before) == {"medmcqa", "pubmedqa"}
    assert all(r["n"] == 2 and 0 <= r["accuracy"] <= 1 for r in before.values())
    table = train_eval_table(before, before)
    assert table.splitlines()[0].startswith("| benchmark | n | chance | before | after |") and "+0.0 pts" in table
    assert evaluate_for_train(model, tok, load_config(None, ["eval.train_eval_limit=0"])) == {}
