"""GRPO (medcot/rl): the rewards, advantage normalisation, the loss, the reference with the adapter disabled,
the contamination refusal, a tiny end-to-end run, exact resume mid-stage, sft+grpo in one run folder, and the
CPU demo config.

The end-to-end runs use the tiny random Llama (tests/conftest.py). Its completions are random tokens that
never earn a real reward, so where a run needs a learning signal the reward is swapped for one that varies
with the text (`_varied_score`); the real reward functions are tested on their own, and the demo config runs
them on the real model.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from medcot.cli import main
from medcot.config import load_config
from medcot.errors import ConfigError, ContaminationError
from medcot.eval.tasks import EMBEDDED_EVAL_DIR, TASKS, Item
from medcot.generate.budget import FORCE_CLOSE, Answer
from medcot.rl import rewards
from medcot.rl.algorithm import (
    group_advantages,
    step_normaliser,
    token_logprobs,
    token_loss,
)
from medcot.rl.items import check_contamination, load_items
from medcot.rl.rollout import Rollout, collate, completion_logprobs

REPO = Path(__file__).resolve().parents[1]
MEDQA = TASKS["medqa"]
ITEM = Item(id="q1", benchmark="medqa", question="Which drug blocks cell wall synthesis?",
            options={"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone", "D": "Trimethoprim"}, answer="C")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


# -- rewards --------------------------------------------------------------------------------------


def test_correctness_is_evals_own_verdict(monkeypatch, tiny_model_dir):
    """Eval's answer path (generation stubbed with fixed outputs) and the reward agree output by output."""
    from transformers import AutoTokenizer

    from medcot.data.prompts import PromptFormatter
    from medcot.eval import run as eval_run
    from medcot.eval.protocols import base

    outputs = [
        "It inhibits transpeptidation.\n</think>\nThe answer is C.",
        "Quinolones.\n</think>\nThe answer is B.",
        "never closed, but so the answer is C",
        "Both?\n</think>\nThe answer is A. The answer is C.",  # two stated answers: a conflict, unparseable
        "Cephalosporin.\n</think>\nC. Ceftriaxone",
        "",
    ]

    def fixed_outputs(model, tok, prompts, *args, on_answer=None, **kwargs):  # generate_answers' contract
        answers = [Answer(o, 5, "</think>" in o, False) for o in outputs]
        for i, a in enumerate(answers):
            on_answer(i, a)
        return answers

    monkeypatch.setattr(base, "generate_answers", fixed_outputs)
    cfg = load_config()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = eval_run.answer_items(None, tok, PromptFormatter(tok, cfg.prompt), MEDQA, [ITEM] * len(outputs), cfg, "t")
    got = [rewards.score(o, 5, "</think>" in o, ITEM, MEDQA, cfg.grpo, 512) for o in outputs]
    assert [s.values["correct"] for s in got] == [float(r["correct"]) for r in records]
    assert [s.label for s in got] == [r["extracted"] for r in records]
    assert [s.correct for s in got] == [True, False, True, False, True, False]


@pytest.mark.parametrize("text, closed_by_model, expected", [
    ("Transpeptidase.\n</think>\nThe answer is C.", True, 1.0),
    ("Transpeptidase." + FORCE_CLOSE + "The answer is C.", False, 0.5),  # the budget closed it: answer only
    ("Transpeptidase.\n</think>\nI am not sure.", True, 0.5),  # closed, no answer
    ("Unsure.\n</think>\nThe answer is A. The answer is B.", True, 0.5),  # two different answers: none counts
    ("so the answer is C", False, 0.0),  # stated, but the reasoning never closed
    ("a\n</think>\nb\n</think>\nThe answer is C.", True, 0.5),  # closed twice is not a closed reasoning
])
def test_format_reward(text, closed_by_model, expected):
    verdict = rewards.EVAL_PROTOCOL.judge(MEDQA, ITEM, text)
    assert rewards.format_reward(text, closed_by_model, verdict) == expected


def test_length_penalty_is_dapos_soft_overlong_window():
    assert [rewards.length_penalty(n, limit=512, cache=64) for n in (100, 448, 480, 512, 600)] == [0, 0, -0.5, -1, -1]


def test_score_weights_each_reward_and_adds_the_length_penalty_only_when_weighted():
    g = load_config(None, ["grpo.reward_correct=2", "grpo.reward_format=0.5"]).grpo
    text = "Transpeptidase.\n</think>\nThe answer is C."
    s = rewards.score(text, 480, True, ITEM, MEDQA, g, limit=512)
    assert s.values == {"correct": 1.0, "format": 1.0} and s.total == 2.5 and s.correct and s.label == "C"
    g.reward_length = 1.0
    s = rewards.score(text, 480, True, ITEM, MEDQA, g, limit=512)
    assert s.values["length"] == -0.5 and s.total == 2.0


# -- advantages and the loss ---------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    a = group_advantages(rewards_, 4, scale=True).view(3, 4)
    # Group 0: mean 0.5, sample std sqrt(1/3): +-0.5 / (0.57735 + 1e-4)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (3 ** -0.5 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))  # equal rewards: no signal, not a division by zero
    torch.testing.assert_close(a.sum(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2].std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    # Dr. GRPO: centred only; the scale of the rewards is kept
    centred = group_advantages(rewards_, 4, scale=False).view(3, 4)
    torch.testing.assert_close(centred[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_first_update_has_ratio_one_and_an_advantage_weighted_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    tl = token_loss(logp, logp.detach(), None, torch.tensor([2.0]), mask, 0.2, 0.2, beta=0.0)
    torch.testing.assert_close(tl.loss, torch.tensor([[-2.0, -2.0, 0.0]]))
    assert not tl.clipped.any() and tl.kl is None
    tl.loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0, 0.0]]))


def test_clipping_and_clip_higher():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.25]])).requires_grad_()  # ratios 1.5 and 1.25
    tl = token_loss(logp, old, None, torch.tensor([1.0]), mask, 0.2, 0.2, beta=0.0)
    assert tl.clipped.tolist() == [[True, True]]  # both above 1.2 with a positive advantage
    tl.loss.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # clipped tokens get no gradient
    logp.grad = None
    tl = token_loss(logp, old, None, torch.tensor([1.0]), mask, 0.2, 0.28, beta=0.0)  # DAPO's clip-higher
    assert tl.clipped.tolist() == [[True, False]]
    tl.loss.sum().backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    # A negative advantage is clipped below 1 - eps only; above 1 + eps the unclipped (worse) term is kept.
    low = torch.log(torch.tensor([[0.5, 1.5]]))
    assert token_loss(low, old, None, torch.tensor([-1.0]), mask, 0.2, 0.2, 0.0).clipped.tolist() == [[True, False]]


def test_kl_is_the_k3_estimator_zero_at_the_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    same = token_loss(logp, logp, logp.clone(), torch.tensor([0.0]), mask, 0.2, 0.2, beta=0.1)
    assert torch.equal(same.kl, torch.zeros(1, 2)) and torch.equal(same.loss, torch.zeros(1, 2))
    ref = torch.tensor([[-1.5, -1.0]])
    tl = token_loss(logp, logp, ref, torch.tensor([0.0]), mask, 0.2, 0.2, beta=0.1)
    d = ref - logp
    torch.testing.assert_close(tl.kl, torch.exp(d) - d - 1)
    assert (tl.kl > 0).all()
    torch.testing.assert_close(tl.loss, 0.1 * tl.kl)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_step_loss_is_the_same_however_completions_are_split_into_micro_batches(loss_type):
    torch.manual_seed(0)
    lengths = [3, 7, 1, 5, 4, 6]
    per_token = torch.randn(6, 7)
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    n, n_tokens, max_tokens = 6, sum(lengths), 8

    def total(rows):
        w = step_normaliser(loss_type, mask[rows], n, n_tokens, max_tokens)
        return ((per_token[rows] * mask[rows]).sum(dim=1) * w).sum()

    whole = total(slice(0, 6))
    torch.testing.assert_close(total(slice(0, 2)) + total(slice(2, 5)) + total(slice(5, 6)), whole)
    sums = (per_token * mask).sum(dim=1)
    expected = {"grpo": (sums / torch.tensor(lengths)).mean(), "dapo": sums.sum() / n_tokens,
                "dr_grpo": sums.sum() / (n * max_tokens)}[loss_type]
    torch.testing.assert_close(whole, expected)


def test_token_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tokens = torch.tensor([[0]])
    torch.testing.assert_close(token_logprobs(logits, tokens, 0.5), torch.log_softmax(logits / 0.5, -1)[..., 0])


# -- completions, batches, the reference ----------------------------------------------------------


def _rollout(prompt: list[int], completion: list[int], advantage: float = 0.0) -> Rollout:
    return Rollout(item=ITEM, prompt_ids=prompt, completion_ids=completion, policy_mask=[1] * len(completion),
                   text="", num_tokens=len(completion), scored=None, advantage=advantage)


def test_reference_with_the_adapter_disabled_equals_a_separate_reference_model(tiny_model_dir):
    """The KL reference costs no second model: the policy with its adapter switched off gives the base
    model's log-probabilities, on the padded batches the update uses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).eval()
    rows = [_rollout(torch.randint(5, 1000, (n,)).tolist(), torch.randint(5, 1000, (m,)).tolist())
            for n, m in ((12, 5), (4, 9), (8, 1))]  # prompts and completions of different lengths
    batch = collate(rows, pad_id=0, device="cpu")
    mask = batch["mask"].bool()
    with torch.no_grad():
        with policy.disable_adapter():
            ref = completion_logprobs(policy, batch, 1.0, NO_AUTOCAST)
        separate = completion_logprobs(base, batch, 1.0, NO_AUTOCAST)
        adapted = completion_logprobs(policy, batch, 1.0, NO_AUTOCAST)
    torch.testing.assert_close(ref[mask], separate[mask])
    assert (adapted[mask] - ref[mask]).abs().max() > 1e-3  # the adapter changes the model: the check can fail
    # Padding changes nothing: each completion alone, unpadded, has the same log-probabilities.
    with torch.no_grad():
        for i, r in enumerate(rows):
            alone = completion_logprobs(base, collate([r], 0, "cpu"), 1.0, NO_AUTOCAST)[0]
            n = len(r.completion_ids)
            torch.testing.assert_close(alone[:n], separate[i, :n], atol=1e-5, rtol=1e-5)


# -- data and the contamination check ---------------------------------------------------------------


def _write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_exclude_overlap_drops_exactly_the_copied_eval_items(tmp_path, shared_data):
    copies = [{**it, "id": f"copy_{it['id']}"} for it in _jsonl(EMBEDDED_EVAL_DIR / "medqa_usmle_4opt.sample.jsonl")]
    dev = _jsonl(shared_data / "dev_pools" / "normalized" / "medqa_usmle_4opt_dev.jsonl")[:40]
    source = _write_items(tmp_path / "mixed.jsonl", dev[:20] + copies + dev[20:])
    cfg = load_config(None, [f"grpo.source={source}", "grpo.val_size=0", "eval.benchmarks=medqa"])
    items = load_items(cfg.grpo, seed=0)
    assert items.task is MEDQA and len(items.train) == 65
    with pytest.raises(ContaminationError, match=r"25 of 65 training items overlap .*medqa 25/25"):
        check_contamination(items.train, cfg)
    cfg.grpo.exclude_overlap = True
    checked = check_contamination(items.train, cfg)
    assert {it.id for it in checked.dropped} == {c["id"] for c in copies}
    assert {it.id for it in checked.kept} == {d["id"] for d in dev}
    assert checked.summary == {"medqa": {"items": 25, "overlapping": 25}}


def test_items_need_a_task_for_a_hub_dataset():
    cfg = load_config(None, ["grpo.source=some-org/medical-mcq"])
    with pytest.raises(ConfigError, match="set grpo.task"):
        load_items(cfg.grpo, seed=0)


def test_grpo_config_is_validated():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stage=grpo", "grpo.num_generations=1", "grpo.epsilon_high=0.1",
                           "grpo.temperature=0", "grpo.reward_correct=0", "grpo.reward_format=0"])
    for key in ("grpo.source", "grpo.num_generations", "grpo.epsilon_high", "grpo.temperature", "at least one weight"):
        assert key in str(e.value)


# -- end to end (tiny model) --------------------------------------------------------------------------


def _varied_score(text, num_tokens, closed_by_model, item, task, g, limit):
    """A reward that differs between sampled completions of one prompt: a learning signal for random text."""
    v = (sum(map(ord, text)) % 7) / 6
    return rewards.Scored(values={"correct": float(v > 0.5), "format": v}, total=v, label=None, method="none",
                          correct=v > 0.5)


# A GRPO stage in seconds on the tiny model: 2 prompts x 4 completions of 8 + 4 tokens per step.
TINY_GRPO = ["grpo.num_samples=8", "grpo.val_size=2", "grpo.prompts_per_step=2", "grpo.num_generations=4",
             "grpo.max_steps=3", "grpo.thinking_budget=8", "grpo.answer_tokens=4", "grpo.learning_rate=1.0e-2",
             "eval.benchmarks=medqa", "train.warmup_steps=0", "train.report_to=none", "train.sample_questions=1",
             "train.per_device_batch_size=4", "generate.batch_size=8"]


@pytest.fixture()
def medqa_dev(shared_data) -> Path:
    return shared_data / "dev_pools" / "normalized" / "medqa_usmle_4opt_dev.jsonl"


@pytest.fixture()
def grpo_argv(tiny_model_dir, medqa_dev):
    def make(output_dir: Path, name: str, *overrides: str) -> list[str]:
        return ["train", f"train.output_dir={output_dir}", f"train.run_name={name}",
                f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
                "train.stage=grpo", f"grpo.source={medqa_dev}", *TINY_GRPO, *overrides]

    return make


def test_training_on_eval_items_is_refused_with_counts(tmp_path, grpo_argv, capsys):
    source = EMBEDDED_EVAL_DIR / "medqa_usmle_4opt.sample.jsonl"
    assert main(grpo_argv(tmp_path, "contaminated", f"grpo.source={source}", "grpo.num_samples=null")) == 2
    err = capsys.readouterr().err
    assert "23 of 23 training items overlap the eval benchmarks" in err and "medqa 23/25" in err
    assert "grpo.exclude_overlap=true" in err and "Traceback" not in err
    assert not (tmp_path / "contaminated" / "checkpoints").exists()  # refused before any training


@pytest.mark.slow
def test_grpo_end_to_end(tmp_path, grpo_argv, monkeypatch):
    from safetensors.torch import load_file

    from medcot.model.load import load_for_inference

    monkeypatch.setattr("medcot.rl.rollout.score", _varied_score)
    assert main(grpo_argv(tmp_path, "e2e", "grpo.iterations=2", "grpo.loss_type=dapo", "grpo.epsilon_high=0.28",
                          "eval.train_eval_limit=2", "eval.thinking_budget=8", "eval.answer_tokens=4")) == 0
    run = tmp_path / "e2e"
    for name in ("adapter/adapter_model.safetensors", "config.yaml", "manifest.json", "metrics.jsonl", "report.md",
                 "grpo.png", "result.json"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward", "reward/correct", "reward/format", "accuracy", "kl", "response_length", "clip_fraction",
                "loss", "grad_norm", "lr", "groups", "rollout_tokens_per_s"):
        assert all(key in m for m in metrics), key
    assert metrics[0]["kl"] == 0.0  # the adapter starts as a no-op: the policy is the reference
    assert metrics[-1]["kl"] > 0 and any(m["clip_fraction"] > 0 for m in metrics)  # it moved; 2 updates clip
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    report = (run / "report.md").read_text()
    assert "Held-out items (2, never trained on; greedy)" in report and "![GRPO metrics](grpo.png)" in report
    assert "Answers before and after" in report and "Question 1 (gold: " in report
    assert "## Benchmarks before and after" in report  # eval.train_eval_limit: scored before and after
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["items"]["train"] == 8 and manifest["items"]["contamination_check"]["benchmarks"]["medqa"]
    model, _, _ = load_for_inference(load_config(), run)  # the run folder serves ask/eval/serve/export
    assert type(model).__name__.startswith("Peft")


def test_dynamic_sampling_refills_the_step_with_groups_that_have_a_signal(tmp_path, grpo_argv, medqa_dev,
                                                                          monkeypatch):
    # Half of the items score the same whatever is written (no signal); dynamic sampling replaces their groups.
    flat = {it["id"] for i, it in enumerate(_jsonl(medqa_dev)) if i % 2}

    def score(text, num_tokens, closed, item, task, g, limit):
        s = _varied_score(text, num_tokens, closed, item, task, g, limit)
        return rewards.Scored({"correct": 0.0, "format": 0.0}, 0.0, None, "none", False) if item.id in flat else s

    monkeypatch.setattr("medcot.rl.rollout.score", score)
    assert main(grpo_argv(tmp_path, "ds", "grpo.dynamic_sampling=true", "grpo.max_resample=4", "grpo.max_steps=2")) == 0
    metrics = [json.loads(line) for line in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["groups"] == 2 for m in metrics)  # every step filled with groups that carry a signal
    assert any(m["signal_groups"] < 1 for m in metrics)  # although the first round had flat groups


@pytest.mark.slow
def test_resume_mid_stage_is_exact(tmp_path, grpo_argv, monkeypatch):
    """SIGTERM during step 2: the step finishes, a checkpoint is saved, and the resumed run samples the same
    completions and ends with the same adapter as a run never interrupted."""
    from safetensors.torch import load_file

    from medcot.train.tracking import Tracker

    monkeypatch.setattr("medcot.rl.rollout.score", _varied_score)
    common = ["grpo.max_steps=4", "train.save_steps=3", "grpo.iterations=2"]
    assert main(grpo_argv(tmp_path, "straight", *common)) == 0

    real_log = Tracker.log

    def log_then_sigterm(self, metrics, step):
        real_log(self, metrics, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled like a real one: finish the step, save, stop

    monkeypatch.setattr(Tracker, "log", log_then_sigterm)
    assert main(grpo_argv(tmp_path, "interrupted", *common)) == 130
    run = tmp_path / "interrupted"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    assert not (run / "adapter").exists()
    monkeypatch.setattr(Tracker, "log", real_log)
    assert main(["train", "--resume", str(run)]) == 0

    want = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    m_straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    m_resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m_resumed] == [1, 2, 3, 4]
    for key in ("reward", "loss", "kl", "clip_fraction", "grad_norm", "lr"):
        assert [m[key] for m in m_resumed] == [m[key] for m in m_straight], key
    before = json.loads((tmp_path / "straight" / "result.json").read_text())["heldout_before"]
    assert json.loads((run / "result.json").read_text())["heldout_before"] == before


@pytest.mark.slow
def test_sft_then_grpo_in_one_run_folder(tmp_path, tiny_train_argv, medqa_dev, capsys):
    from medcot.model.load import stage_adapters

    argv = tiny_train_argv(tmp_path, "chain", "train.stage=sft+grpo", f"grpo.source={medqa_dev}", *TINY_GRPO,
                           "grpo.max_steps=2")
    assert main(argv) == 0
    run = tmp_path / "chain"
    assert (run / "sft" / "adapter").is_dir() and (run / "sft" / "result.json").is_file()
    assert (run / "adapter").is_dir() and (run / "result.json").is_file()
    assert stage_adapters(run) == [run / "sft" / "adapter"]  # ask/eval/serve/export merge SFT, then load GRPO
    assert json.loads((run / "manifest.json").read_text())["started_from"] == str(run / "sft" / "adapter")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # KL is 0 at the first step: the reference is the SFT model (base + merged SFT adapter), which is what
    # the policy is before its first update; the plain base would differ from it.
    assert metrics[0]["kl"] == 0.0
    assert "[SFT stage](sft/report.md)" in (run / "report.md").read_text()
    capsys.readouterr()
    mtime = (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["train", "--resume", str(run)]) == 0  # both stages finished: both are skipped
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_demo_config_runs_on_the_embedded_model(tmp_path, monkeypatch, shared_data):
    """configs/demo-grpo-cpu.yaml as shipped, shortened to one small step (its full run: docs/grpo.md)."""
    monkeypatch.chdir(REPO)  # the config names ../shared/data relative to the repository
    argv = ["train", "--config", "configs/demo-grpo-cpu.yaml", f"train.output_dir={tmp_path}", "train.run_name=demo",
            "train.report_to=none", "grpo.max_steps=1", "grpo.prompts_per_step=1", "grpo.num_generations=2",
            "grpo.val_size=1", "grpo.num_samples=4", "grpo.thinking_budget=8", "grpo.answer_tokens=4"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.jsonl").read_text())
    assert {"reward/correct", "reward/format", "kl"} <= set(metrics)
