"""Rewards: small pure functions of one completion, and their weighted sum.

- `correctness`: 1 when eval's verdict on the completion is "correct". The verdict is `medcot eval`'s own:
  the `medcot` protocol's `judge` (medcot/eval/protocols/medcot.py: the benchmark task's answer extractor,
  then its scorer), called on the same text, so the reward a completion earns in training and the score it
  would get in eval cannot disagree.
- `format_reward`: half for closing the reasoning itself (`</think>` written by the model, once), half for
  stating one answer after it (the verdict found exactly one label in the text after `</think>`; two
  different stated answers are a conflict and have none).
- `length_penalty`: DAPO's soft overlong punishment: 0 up to `limit - cache` tokens, then falling linearly
  to -1 at the completion limit.

The weights come from `grpo.reward_*`; `score` returns each function's value and the weighted total.
"""

from __future__ import annotations

from dataclasses import dataclass

from medcot.config import GrpoArgs
from medcot.eval.protocols import PROTOCOLS
from medcot.eval.tasks import Item, Task
from medcot.generate.reasoning import THINK_CLOSE

# The protocol `medcot eval` uses by default: the training prompt, the thinking budget, strict extraction.
EVAL_PROTOCOL = PROTOCOLS["medcot"]


@dataclass(frozen=True)
class Scored:
    values: dict[str, float]  # each weighted reward function's value, unweighted
    total: float  # the weighted sum the advantages are computed from
    label: str | None  # the answer eval's verdict read (None: unparseable)
    method: str  # how it was read ("after_think:explicit", "whole_output:explicit", "none", ...)
    correct: bool


def correctness(verdict: dict) -> float:
    """1.0 when eval's verdict is correct, else 0.0 (unparseable counts as wrong, as in eval)."""
    return 1.0 if verdict["correct"] else 0.0


def format_reward(text: str, closed_by_model: bool, verdict: dict) -> float:
    """0.5 for reasoning the model closed itself with one `</think>`, plus 0.5 for one answer stated after it.

    `closed_by_model` is False when the thinking budget forced the tag: the model did not close it. An answer
    counts when the verdict read it from the text after `</think>` (method `after_think:...`); a conflict (two
    different answers stated) has no label and gets nothing.
    """
    closed = closed_by_model and text.count(THINK_CLOSE) == 1
    answered = verdict["extracted"] is not None and verdict["method"].startswith("after_think:")
    return 0.5 * closed + 0.5 * answered


def length_penalty(num_tokens: int, limit: int, cache: int) -> float:
    """DAPO's soft overlong penalty: 0 up to `limit - cache` tokens, then linearly down to -1 at `limit`."""
    over = num_tokens - (limit - cache)
    return -min(max(over, 0) / cache, 1.0)


def score(text: str, num_tokens: int, closed_by_model: bool, item: Item, task: Task, g: GrpoArgs,
          limit: int) -> Scored:
    """Every reward of one completion and their weighted total (weights `grpo.reward_*`)."""
    verdict = EVAL_PROTOCOL.judge(task, item, text)
    # Correctness and format are always measured (accuracy and the held-out format score are made of them);
    # the length penalty only where it is weighted.
    values = {"correct": correctness(verdict), "format": format_reward(text, closed_by_model, verdict)}
    weights = {"correct": g.reward_correct, "format": g.reward_format}
    if g.reward_length:
        values["length"], weights["length"] = length_penalty(num_tokens, limit, g.length_cache), g.reward_length
    total = sum(weights[k] * v for k, v in values.items())
    return Scored(values=values, total=total, label=verdict["extracted"], method=verdict["method"],
                  correct=bool(verdict["correct"]))
