"""What a protocol is, and the part the two generative ones share: prompt → generate k answers → judge → vote.

A record is one model's result on one item (a line of items.jsonl): the gold answer, the verdict
(`extracted`, `method`, `correct`), the prompt and the output. With `eval.samples=k > 1` it also
holds the k `samples` (each with its own output and verdict) and the verdict is their majority vote.
"""

from __future__ import annotations

from collections.abc import Callable

from medcot.config import Config, GenerateArgs
from medcot.errors import ConfigError
from medcot.eval.consistency import vote
from medcot.eval.tasks import Item, Task
from medcot.generate.budget import Answer, generate_answers


class Protocol:
    name: str
    title: str  # one line for the report: what the protocol does
    source: str  # what it follows, file and commit, for the report and docs
    generative = True

    def check(self, cfg: Config) -> None:
        """Raise ConfigError for settings this protocol cannot run with."""

    def settings(self, cfg: Config) -> dict:
        """What besides the model and the items determines a record (a resumed eval must match it)."""
        raise NotImplementedError

    def answer(self, model, tokenizer, formatter, task: Task, items: list[Item], cfg: Config, tag: str,
               on_record: Callable[[dict], None] | None = None) -> list[dict]:
        """One record per item, in item order; `on_record(record)` as each record is final."""
        raise NotImplementedError

    def rescore(self, task: Task, item: Item, record: dict) -> bool:
        """Re-judge a stored record with the current rules; True when its verdict changed."""
        return False

    def finalize(self, task: Task, records: list[dict]) -> dict:
        """Benchmark-level scoring after all records are in; returns extra numbers for the summary."""
        return {}


class GenerativeProtocol(Protocol):
    """The model writes an answer; the protocol's rules judge it."""

    # The verdict keys that only the rules decide; others may be set per benchmark by `finalize`.
    judged_keys: tuple[str, ...] = ("extracted", "method", "correct")

    def prompt(self, tokenizer, formatter, task: Task, item: Item) -> tuple[str, list[int]]:
        """(prompt text for items.jsonl, token ids)."""
        raise NotImplementedError

    def decoding(self, cfg: Config) -> tuple[GenerateArgs, int | None, int]:
        """(sampling settings, thinking budget or None, answer tokens) for `generate_answers`."""
        raise NotImplementedError

    def judge(self, task: Task, item: Item, text: str) -> dict:
        """The verdict on one output: {"extracted", "method", "correct", ...}."""
        raise NotImplementedError

    def check(self, cfg: Config) -> None:
        gen, _, _ = self.decoding(cfg)
        if cfg.eval.samples > 1 and gen.temperature <= 0:
            raise ConfigError(
                f"eval.samples={cfg.eval.samples} draws several answers per item, but greedy decoding gives the "
                f"same answer every time; set generate.temperature > 0 (e.g. generate.temperature=0.6 "
                f"generate.top_p=0.95, DeepSeek-R1's evaluation setting)"
            )

    def answer(self, model, tokenizer, formatter, task, items, cfg, tag, on_record=None):
        k = cfg.eval.samples
        prompts = [self.prompt(tokenizer, formatter, task, it) for it in items]
        gen, budget, answer_tokens = self.decoding(cfg)
        records: list[dict | None] = [None] * len(items)
        waiting: dict[int, dict[int, Answer]] = {}  # item -> its answers so far

        def answered(i: int, a: Answer) -> None:  # an item is judged as soon as its k answers are in
            j = i // k
            got = waiting.setdefault(j, {})
            got[i % k] = a
            if len(got) < k:
                return
            del waiting[j]
            samples = [{"output": x.text, "num_tokens": x.num_tokens, "closed": x.closed, "forced": x.forced,
                        **self.judge(task, items[j], x.text)} for x in (got[c] for c in range(k))]
            records[j] = _record(task, items[j], tag, prompts[j][0], samples)
            if on_record is not None:
                on_record(records[j])

        # All k copies of an item go into one call: the engine seeds each prompt of a call by its position,
        # so the copies differ (copies split over calls could repeat one another's seed).
        ids = [p[1] for p in prompts for _ in range(k)]
        generate_answers(model, tokenizer, ids, gen, cfg.eval.batch_size, budget, answer_tokens, on_answer=answered)
        return records

    def rescore(self, task, item, record):
        samples = record.get("samples") or [record]
        changed = False
        for s in samples:
            verdict = self.judge(task, item, s["output"])
            changed |= any(s.get(key) != verdict[key] for key in self.judged_keys)
            s.update(verdict)
        if record.get("samples"):
            record.update(verdict_of(record["samples"], record["answer"]))
        return changed


def verdict_of(samples: list[dict], gold: str) -> dict:
    """An item's verdict from its k samples: their majority vote."""
    label = vote([s["extracted"] for s in samples])
    return {"extracted": label, "method": f"vote of {len(samples)}", "correct": label is not None and label == gold}


def _record(task: Task, item: Item, tag: str, prompt: str, samples: list[dict]) -> dict:
    record = {"model": tag, "benchmark": task.name, "id": item.id, "answer": item.answer}
    if len(samples) == 1:
        record.update({key: value for key, value in samples[0].items() if key != "output"})
    else:  # the vote; per item: mean tokens, the share that closed their reasoning, how many were forced
        record.update(verdict_of(samples, item.answer),
                      num_tokens=sum(s["num_tokens"] for s in samples) / len(samples),
                      closed=sum(s["closed"] for s in samples) / len(samples),
                      forced=sum(s["forced"] for s in samples))
    record.update(prompt=prompt, output=samples[0]["output"])
    if len(samples) > 1:
        record["samples"] = samples
    return record
