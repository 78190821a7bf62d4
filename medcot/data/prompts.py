"""Prompt: a record becomes a prompt (what inference sees) and a completion (what the model learns).

Training text is always `prompt + completion`, and the two are tokenized separately and
concatenated, so the token ids the model trains on after the prompt are exactly the ids it sees at
inference: training and inference never drift, not even at the token boundary.

Templates:
- `seed`: the recipe's instruction template; the prompt ends in `<think>\\n`, the completion is
  `reasoning \\n</think>\\n answer` + EOS.
- `chat`: the tokenizer's chat template. DeepSeek-R1's template strips everything before `</think>`
  from assistant turns, which would silently train away the reasoning. So the assistant turn is
  never rendered through the template with the reasoning in it: the template renders the prompt
  (with its generation prefix) and the end-of-turn marker, and medcot writes the reasoning between.
- a path to a text file whose `{question}` is replaced by the question.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from medcot.config import PromptArgs
from medcot.data.rows import Record
from medcot.errors import ConfigError

IGNORE_INDEX = -100  # label value that the loss skips (PyTorch / transformers convention)

INSTRUCTION = (
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning. "
    "Please answer the following medical question."
)

SEED_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts "
    "to ensure a logical and accurate response.\n\n"
    "### Instruction:\n" + INSTRUCTION + "\n\n"
    "### Question:\n{question}\n\n"
    "### Response:\n<think>\n"
)

_SENTINEL = "\u2063MEDCOT_ASSISTANT_TURN\u2063"  # never occurs in real text; marks where the answer goes


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    prompt_len: int
    # Lengths of the documents packed into this row, in order (pre-training blocks); empty: one document.
    # Positions restart and attention stops at each document's end (collate.pack_collate).
    doc_lens: tuple[int, ...] = ()


@dataclass
class LengthReport:
    count: int
    min: int
    mean: float
    median: float
    p95: int
    max: int
    over_limit: int
    action: str  # what happened to rows over the limit: "dropped" or "truncated"
    max_seq_length: int

    def summary(self) -> str:
        return (
            f"{self.count} rows, tokens min {self.min} / mean {self.mean:.0f} / median {self.median:.0f} / "
            f"p95 {self.p95} / max {self.max}; {self.over_limit} over max_seq_length={self.max_seq_length} "
            f"({self.action})"
        )


class PromptFormatter:
    """Turns questions and records into prompt text, completion text and token ids with a loss mask."""

    def __init__(self, tokenizer, args: PromptArgs):
        self.tokenizer = tokenizer
        self.args = args
        if tokenizer.eos_token_id is None:
            raise ConfigError("The tokenizer has no EOS token; set one so the model learns where an answer ends")
        if args.template == "seed":
            self._user_template = SEED_TEMPLATE
        elif args.template == "chat":
            if not tokenizer.chat_template:
                raise ConfigError("prompt.template='chat' but the tokenizer has no chat template; use 'seed'")
            self._user_template = None
            self._turn_end = self._chat_turn_end()
        else:
            path = Path(args.template)
            if not path.is_file():
                raise FileNotFoundError(
                    f"prompt.template={args.template!r} is neither 'seed', 'chat' nor an existing template file"
                )
            text = path.read_text(encoding="utf-8")
            if "{question}" not in text:
                raise ConfigError(f"{path}: a template file must contain the placeholder {{question}}")
            self._user_template = text

    # -- text ------------------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        """The inference prompt: everything the model sees before it starts to reason."""
        if self._user_template is not None:
            return self._user_template.replace("{question}", question)
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def completion(self, prompt: str, reasoning: str, answer: str) -> str:
        """What follows `prompt` in training: reasoning in <think> tags, the answer, the end of the turn.

        The EOS token itself is appended as an id by `encode` (not as text), unless the chat template's
        end-of-turn marker already is the EOS token.
        """
        if prompt.endswith("<think>\n"):
            opening = ""
        elif prompt.endswith("<think>"):
            opening = "\n"
        else:
            opening = "<think>\n"
        if self._user_template is not None:
            return f"{opening}{reasoning}\n</think>\n{answer}"
        # DeepSeek-R1 style: a blank line after </think>; the template's own end-of-turn closes the turn.
        return f"{opening}{reasoning}\n</think>\n\n{answer}{self._turn_end}"

    def _chat_turn_end(self) -> str:
        """Text the chat template writes after an assistant message, up to and including EOS."""
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        if _SENTINEL not in rendered:
            raise ConfigError("The chat template drops assistant content; use prompt.template='seed'")
        after = rendered.split(_SENTINEL, 1)[1]
        eos = self.tokenizer.eos_token
        return after[: after.index(eos) + len(eos)] if eos in after else after

    # -- tokens ----------------------------------------------------------------------------------

    def encode_prompt(self, question: str) -> list[int]:
        text = self.prompt(question)
        # A chat template writes its own BOS; the plain templates rely on the tokenizer adding it.
        return self.tokenizer(text, add_special_tokens=self._user_template is not None)["input_ids"]

    def encode(self, record: Record) -> Encoded:
        """Token ids for prompt + completion, labels masked to the completion (or the whole sequence)."""
        prompt_text = self.prompt(record.question)
        prompt_ids = self.encode_prompt(record.question)
        completion_text = self.completion(prompt_text, record.reasoning, record.answer)
        completion_ids = self.tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if not completion_ids or completion_ids[-1] != self.tokenizer.eos_token_id:
            completion_ids = completion_ids + [self.tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        if self.args.loss_on == "response":
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        else:
            labels = list(input_ids)
        return Encoded(input_ids=input_ids, labels=labels, prompt_len=len(prompt_ids))


def encode_records(
    formatter: PromptFormatter, records: list[Record], max_seq_length: int, overlong: str
) -> tuple[list[Encoded], LengthReport]:
    """Encode rows and apply the over-length policy; returns the kept rows and a length report.

    A row whose prompt alone reaches `max_seq_length` is always dropped: it has nothing left to learn.
    """
    encoded = [formatter.encode(r) for r in records]
    lengths = [len(e.input_ids) for e in encoded]
    kept: list[Encoded] = []
    for e in encoded:
        if len(e.input_ids) <= max_seq_length:
            kept.append(e)
        elif overlong == "truncate" and e.prompt_len < max_seq_length:
            kept.append(Encoded(e.input_ids[:max_seq_length], e.labels[:max_seq_length], e.prompt_len))
    ordered = sorted(lengths)
    report = LengthReport(
        count=len(lengths),
        min=ordered[0],
        mean=statistics.fmean(lengths),
        median=statistics.median(lengths),
        p95=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        max=ordered[-1],
        over_limit=sum(n > max_seq_length for n in lengths),
        action="truncated" if overlong == "truncate" else "dropped",
        max_seq_length=max_seq_length,
    )
    return kept, report
