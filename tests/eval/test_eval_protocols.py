"""The three protocols (medcot, huatuo, loglik) and self-consistency: their parts, then whole runs.

Whole runs use the tiny random Llama (seconds); the embedded model runs all three in a slow test.
"""

import json

import pytest
import torch

from medcot.config import load_config
from medcot.errors import ConfigError
from medcot.eval.consistency import bootstrap_mean_interval, sample_metrics, vote
from medcot.eval.protocols import PROTOCOLS
from medcot.eval.protocols.huatuo_scorer import (
    better_side,
    match_choice,
    postprocess_output,
)
from medcot.eval.protocols.loglik import encode_pair, option_logliks
from medcot.eval.run import run_eval
from medcot.eval.tasks import TASKS
from medcot.eval.tasks.common import Item

OPTS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}


# -- HuatuoGPT-o1's scorer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("I think the answer is B. On reflection the answer is C.", (("B", "C"), 1)),  # strict phrase: first and last
    ("The answer isD", (("D", "D"), 1)),
    ("**B** fits, though (C) is tempting", (("B", "C"), 1)),  # the loose letter pattern
    ("A patient like this needs heparin", (("B", "B"), 2)),  # "A " is an article; then the option text
    ("warfarin first, then heparin, then warfarin", (("B", "C"), 2)),  # "first" = option whose first mention is last
    ("hepar", (("B", "B"), 3)),  # nearest option by difflib
    ("???", (("D", "D"), 3)),  # nothing in common with any option: ties go to the last
    ("## Thinking\n\nanswer is A\n\n## Final Response\n\nThe answer is C", (("C", "C"), 1)),
])
def test_huatuo_match_choice(text, expected):
    assert match_choice(text, OPTS) == expected


def test_huatuo_scorer_helpers():
    assert postprocess_output(" The answer is B</s>") == "The answer is B"
    assert better_side(5, 4) == "first" and better_side(4, 4) == "last" and better_side(3, 4) == "last"


def test_huatuo_finalize_takes_the_better_side_per_benchmark():
    task = TASKS["medqa"]
    records = [{"answer": "A", "first": "A", "last": "B", "match_type": "letter"},
               {"answer": "C", "first": "C", "last": "C", "match_type": "letter"},
               {"answer": "D", "first": "B", "last": "D", "match_type": "option_text"},
               {"answer": "A", "first": "A", "last": "C", "match_type": "letter"}]
    extra = PROTOCOLS["huatuo"].finalize(task, records)
    assert extra == {"first_match_accuracy": 0.75, "last_match_accuracy": 0.5, "match_side": "first",
                     "published_accuracy": 0.75}
    assert [r["correct"] for r in records] == [True, True, False, True]
    assert records[2]["extracted"] == "B" and records[2]["method"] == "huatuo:first:option_text"


def test_huatuo_asks_pubmedqa_as_letters_and_records_words(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    item = Item(id="p", benchmark="pubmedqa", question="Does it work?", options=None, answer="no", context="Abstract.")
    text, ids = PROTOCOLS["huatuo"].prompt(tok, None, TASKS["pubmedqa"], item)
    assert "Please answer the following multiple-choice question:\nAbstract.\n\nUsing the above document" in text
    assert text.rstrip().endswith("assistant") and "A. yes\nB. no\nC. maybe" in text  # SmolLM2's chat template
    assert tok.decode(ids) == text
    verdict = PROTOCOLS["huatuo"].judge(TASKS["pubmedqa"], item, "The answer is B")
    assert verdict["extracted"] == "no" and verdict["correct"] and verdict["first"] == "no"


# -- loglik ------------------------------------------------------------------------------------------------


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx, cont = encode_pair(tok, "Answer: ", "B")
    assert ctx == tok("Answer:")["input_ids"] and tok.decode(cont) == " B"


def test_option_logliks_match_one_unpadded_forward_each(tiny_model_dir):
    """Batched, left-padded, cut to the continuation: the same numbers as scoring each sequence alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    requests = [("Question: short?\nA. x\nB. y\nAnswer:", [" A", " B"]),
                ("Question: a much longer question about the renal physiology of fasting?\nA. x\nB. y\nAnswer:",
                 [" A", " B (the longer one)"])]
    got = option_logliks(model, tok, requests, batch_size=3)
    for (context, conts), scores in zip(requests, got):
        for cont, score in zip(conts, scores):
            ctx, cont_ids = encode_pair(tok, context, cont)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont_ids])).logits[0, len(ctx) - 1 : -1]
            alone = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(cont_ids)[:, None]).sum().item()
            assert score == pytest.approx(alone, abs=1e-4)


# -- self-consistency --------------------------------------------------------------------------------------


def test_vote_and_sample_metrics():
    assert vote(["B", None, "C", "C", "B"]) == "B"  # a tie goes to the answer given first
    assert vote([None, None]) is None
    records = [{"samples": [{"correct": c} for c in row]} for row in
               ([True, False, False], [False, False, False], [True, True, True], [False, True, False])]
    m = sample_metrics(records)
    assert m["k"] == 3 and m["pass_at_k"] == 0.75 and m["mean_at_k"] == pytest.approx(5 / 12)
    assert m["pass_ci_low"] < 0.75 < m["pass_ci_high"] and m["mean_ci_low"] < 5 / 12 < m["mean_ci_high"]
    assert sample_metrics([{"correct": True}]) is None
    assert bootstrap_mean_interval([0.0, 1.0, 0.5]) == bootstrap_mean_interval([0.0, 1.0, 0.5])  # deterministic


def test_samples_need_sampling():
    with pytest.raises(ConfigError, match="generate.temperature > 0"):
        PROTOCOLS["medcot"].check(load_config(None, ["eval.samples=3"]))
    PROTOCOLS["huatuo"].check(load_config(None, ["eval.samples=3"]))  # its sampling is its own: temperature 0.5
    with pytest.raises(ConfigError, match="loglik scores every option once"):
        load_config(None, ["eval.protocol=loglik", "eval.samples=2"])


# -- whole runs --------------------------------------------------------------------------------------------


def _run(overrides, tmp_path, *extra):
    logs = []
    cfg = load_config(None, overrides + ["eval.benchmarks=medqa,pubmedqa", "eval.limit=2", *extra])
    result = run_eval(cfg, on_log=logs.append)
    records = [json.loads(line) for line in (tmp_path / "eval" / "items.jsonl").read_text().splitlines()]
    return result.summary, records, (tmp_path / "eval" / "report.md").read_text(), logs


def _tables_name_the_protocol(md: str, protocol: str) -> None:
    """Every results table is followed by its protocol and source."""
    blocks = md.split("\n\n")
    tables = [i for i, b in enumerate(blocks) if b.startswith("| benchmark")]
    assert tables
    for i in tables:
        if "| training" in blocks[i] or "overlapping" in blocks[i]:
            continue  # the contamination check: the same whatever the protocol
        assert blocks[i + 1].startswith(f"Protocol: {protocol}; follows "), blocks[i + 1]


def test_huatuo_runs_and_resumes_without_rescoring(tiny_overrides, tmp_path):
    summary, records, md, _ = _run(tiny_overrides, tmp_path, "eval.protocol=huatuo", "eval.huatuo_max_new_tokens=6")
    assert summary["settings"]["protocol"] == "huatuo" and summary["settings"]["temperature"] == 0.5
    assert "HuatuoGPT-o1 @ 2c8d7fc" in summary["settings"]["protocol_source"]
    assert len(records) == 4 and all(r["num_tokens"] <= 6 for r in records)
    assert all(r["method"].startswith("huatuo:") and r["extracted"] is not None for r in records)  # never unparseable
    assert {r["extracted"] for r in records if r["benchmark"] == "pubmedqa"} <= {"yes", "no", "maybe"}
    for name, b in summary["models"]["base"]["benchmarks"].items():
        assert b["accuracy"] == b["published_accuracy"] == max(b["first_match_accuracy"], b["last_match_accuracy"])
        side = b["match_side"]
        assert all(r["method"].startswith(f"huatuo:{side}:") for r in records if r["benchmark"] == name)
    assert "Please answer the following multiple-choice question" in records[0]["prompt"]
    _tables_name_the_protocol(md, "huatuo")
    assert "## HuatuoGPT-o1's scorer" in md
    _, again, _, logs = _run(tiny_overrides, tmp_path, "eval.protocol=huatuo", "eval.huatuo_max_new_tokens=6")
    assert again == records  # nothing regenerated, nothing re-scored
    assert any("resumed 2 of 2 items" in line for line in logs) and not any("re-scored" in line for line in logs)


def test_loglik_runs_without_generating(tiny_overrides, tmp_path):
    summary, records, md, _ = _run(tiny_overrides, tmp_path, "eval.protocol=loglik")
    assert all(r["output"] == "" and r["num_tokens"] == 0 and r["method"] == "loglik" for r in records)
    for r in records:
        assert r["extracted"] == max(r["loglik"], key=r["loglik"].get) and r["correct"] == (r["extracted"] == r["answer"])
    assert set(next(r for r in records if r["benchmark"] == "pubmedqa")["loglik"]) == {"yes", "no", "maybe"}
    assert next(r for r in records if r["benchmark"] == "medqa")["prompt"].startswith("Question: ")
    assert "lm-evaluation-harness" in summary["settings"]["protocol_source"]
    _tables_name_the_protocol(md, "loglik")
    assert "forced </think>" not in md  # nothing was generated


def test_samples_vote_and_report_pass_at_k(tiny_overrides, tmp_path):
    summary, records, md, _ = _run(tiny_overrides, tmp_path, "eval.samples=3", "generate.temperature=1.0")
    for r in records:
        assert len(r["samples"]) == 3 and r["method"] == "vote of 3"
        assert r["extracted"] == vote([s["extracted"] for s in r["samples"]])
    assert any(len({s["output"] for s in r["samples"]}) > 1 for r in records)  # the samples differ
    b = summary["models"]["base"]["benchmarks"]["medqa"]
    right = [sum(s["correct"] for s in r["samples"]) for r in records if r["benchmark"] == "medqa"]
    assert b["samples"]["pass_at_k"] == sum(c > 0 for c in right) / 2
    assert b["samples"]["mean_at_k"] == pytest.approx(sum(right) / 6)
    assert "## Self-consistency" in md and "majority vote of 3" in md
    _tables_name_the_protocol(md, "medcot")


@pytest.mark.slow
def test_every_protocol_runs_on_the_embedded_model(embedded_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: medcot, huatuo and loglik end to end on 2 items of two benchmarks."""
    base = ["model.name_or_path=embedded", "model.device=cpu", "model.dtype=fp32", "eval.limit=2",
            "eval.benchmarks=mmlu_pro_medical,pubmedqa", "eval.batch_size=4", "eval.thinking_budget=8",
            "eval.answer_tokens=8", "eval.huatuo_max_new_tokens=12", "data.val_size=2", "train.sample_questions=1",
            "train.max_seq_length=128"]
    for protocol in ("medcot", "huatuo", "loglik"):
        out = tmp_path / protocol
        summary = run_eval(load_config(None, base + [f"eval.protocol={protocol}", f"eval.output_dir={out}"])).summary
        assert summary["settings"]["protocol"] == protocol
        assert all(b["n"] == 2 for b in summary["models"]["base"]["benchmarks"].values())
        _tables_name_the_protocol((out / "report.md").read_text(), protocol)
