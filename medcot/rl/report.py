"""The GRPO run folder's own account: `manifest.json`, `grpo.png` (rewards, accuracy, KL, length, clipping per
step) and `report.md` (settings, held-out answers before and after, the reward trend, sample answers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medcot.disclaimer import DISCLAIMER
from medcot.generate.reasoning import split_reasoning
from medcot.io import write_atomic
from medcot.rl.rewards import EVAL_PROTOCOL
from medcot.train.report import (
    file_sha256,
    provenance,
    save_figure,
    train_eval_table,
)
from medcot.train.tracking import read_metrics

log = logging.getLogger(__name__)

TREND_KEYS = ("reward", "reward/correct", "reward/format", "reward/length", "accuracy", "response_length")


def reward_trend(run_dir: Path) -> tuple[dict, dict]:
    """Mean of each training metric in TREND_KEYS over the first and the last quarter of the logged steps.

    Single steps are noisy (a few prompts each); a quarter of the run smooths that without hiding a trend.
    """
    rows = read_metrics(run_dir)
    if not rows:
        return {}, {}
    n = max(len(rows) // 4, 1)

    def mean(part: list[dict]) -> dict:
        return {k: sum(r[k] for r in part) / len(part) for k in TREND_KEYS if all(k in r for r in part)}

    return mean(rows[:n]), mean(rows[-n:])


PANELS = [
    ("reward", ["reward", "reward/correct", "reward/format", "reward/length"], "mean per completion"),
    ("accuracy on the training prompts", ["accuracy", "answered"], "fraction of completions"),
    ("KL to the reference", ["kl"], "per token"),
    ("response length", ["response_length"], "tokens"),
    ("clip fraction", ["clip_fraction"], "fraction of tokens"),
    ("groups with a learning signal", ["signal_groups"], "fraction of prompts"),
]


def plot_grpo(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir)
    if not rows:
        return None
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no grpo.png (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=110)
    for ax, (title, keys, unit) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=2, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{run_dir.name}: GRPO")
    fig.tight_layout()
    return save_figure(fig, run_dir / "grpo.png")


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in text.strip().splitlines()) or "> (empty)"


def _heldout_row(name: str, before: dict, after: dict, pct: bool) -> str:
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}")
    return f"| {name} | {f(before[name])} | {f(after[name])} |"


def write_grpo_report(run_dir: Path, cfg, result, *, items, checked, questions, model_info, n_trainable: int,
                      tracker_backend: str, sft_stage: Path | None) -> None:
    g = cfg.grpo
    manifest = {
        "stage": "grpo",
        **provenance(model_info),
        "started_from": str(sft_stage / "adapter") if sft_stage else None,
        "items": {"source": items.source, "sha256": file_sha256(items.source), "task": items.task.name,
                  "train": len(checked.kept), "held_out": len(items.val), "dropped_as_overlapping": len(checked.dropped),
                  "contamination_check": {"eval_source": cfg.eval.source, "ngram": cfg.eval.overlap_ngram,
                                          "threshold": cfg.eval.overlap_threshold, "benchmarks": checked.summary}},
        "trainable_parameters": n_trainable,
        "steps": result.steps,
        "wall_time_s": round(result.wall_s, 1),
        "completion_tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_gib": round(result.peak_mem_gib, 3),
        "heldout_before": result.heldout_before,
        "heldout_after": result.heldout_after,
        "training_reward_start": result.reward_start,
        "training_reward_end": result.reward_end,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "tracking": tracker_backend,
    }
    write_atomic(run_dir / "manifest.json", json.dumps(manifest, indent=2))
    png = plot_grpo(run_dir)
    budget = (f"reasoning up to {g.thinking_budget} tokens, then the answer (up to {g.answer_tokens})"
              if g.thinking_budget is not None else f"up to {cfg.generate.max_new_tokens} tokens")
    lines = [
        f"# medcot GRPO run `{run_dir.name}`",
        "",
        f"*{DISCLAIMER}*",
        "",
        f"- Base model: `{cfg.model.name_or_path}` ({model_info['dtype']}, quantization {model_info['quantization']}) "
        f"on {manifest['device']}" + (f", with the SFT adapter merged in ([SFT stage]({sft_stage.name}/report.md))"
                                      if sft_stage else ""),
        f"- LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}: {n_trainable:,} trainable parameters",
        f"- Items: `{items.source}` ({items.task.name} format): {len(checked.kept)} to train on, {len(items.val)} held "
        f"out; contamination check against {', '.join(checked.summary)} from `{cfg.eval.source}`: "
        + (f"{len(checked.dropped)} overlapping training items dropped" if checked.dropped else "no overlap"),
        f"- {result.steps} steps × {g.prompts_per_step} prompts × {g.num_generations} completions ({budget}, "
        f"temperature {g.temperature}); loss `{g.loss_type}`, rewards scaled by the group std: {g.scale_rewards}, "
        f"beta {g.beta}, clip [{1 - g.epsilon:g}, {1 + (g.epsilon_high or g.epsilon):g}], {g.iterations} update(s) "
        f"per step, dynamic sampling {'on' if g.dynamic_sampling else 'off'}, lr {g.learning_rate:g}",
        f"- Reward weights: correct {g.reward_correct:g}, format {g.reward_format:g}, length {g.reward_length:g}",
        f"- Wall time {result.wall_s:.0f} s, {result.tokens_per_s:,.1f} completion tokens/s, peak memory "
        f"{result.peak_mem_gib:.2f} GiB",
        "",
    ]
    if result.heldout_before.get("n"):
        b, a = result.heldout_before, result.heldout_after
        lines += [f"## Held-out items ({b['n']}, never trained on; greedy)", "", "| | before | after |", "|---|---|---|",
                  _heldout_row("accuracy", b, a, True), _heldout_row("answered", b, a, True),
                  _heldout_row("format", b, a, False), "",
                  "`answered`: eval's extractor found an answer; `format`: the format reward (0.5 reasoning closed by "
                  "the model, 0.5 one answer stated after it).", ""]
    if result.reward_start:
        s, e = result.reward_start, result.reward_end
        lines += ["## Training rewards (mean of the first and last quarter of the steps)", "",
                  "| | start | end |", "|---|---|---|"]
        lines += [f"| {k} | {s[k]:.3f} | {e[k]:.3f} |" for k in s if k in e]
        lines.append("")
    if result.eval_before:
        lines += ["## Benchmarks before and after (eval.train_eval_limit items each)", "",
                  train_eval_table(result.eval_before, result.eval_after), ""]
    if png:
        lines += ["## Per step", "", f"![GRPO metrics]({png.name})", ""]
    lines += ["## Answers before and after (held-out items, greedy)", "",
              "With grpo.thinking_budget, a `</think>` the model did not write itself was forced by the budget.", ""]
    task = items.task
    for i, (it, before, after) in enumerate(zip(questions, result.answers_before, result.answers_after), 1):
        lines += [f"### Question {i} (gold: {it.answer})", "", _quote(task.render(it)), ""]
        for when, text in (("before", before), ("after", after)):
            v = EVAL_PROTOCOL.judge(task, it, text)
            s = split_reasoning(text)
            verdict = "correct" if v["correct"] else ("unparseable" if v["extracted"] is None else "wrong")
            lines += [f"**{when}**: extracted `{v['extracted']}` ({v['method']}): {verdict}", "", "Reasoning:", "",
                      _quote(s.reasoning), "", "Answer:", "",
                      _quote(s.answer) if s.closed else "*(the model never closed its reasoning)*", ""]
    lines += ["## Files", "", "- `adapter/`: LoRA adapter (PEFT format) + tokenizer", "- `config.yaml`: the resolved config",
              "- `manifest.json`: versions, items, contamination check, timings",
              "- `metrics.jsonl`: one line per step (rewards, accuracy, KL, length, clip fraction)",
              "- `checkpoints/`: resumable checkpoints", ""]
    write_atomic(run_dir / "report.md", "\n".join(lines))
