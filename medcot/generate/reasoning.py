"""The reasoning/answer split: one streaming splitter, used on whole texts and on streams alike.

R1-style models write their chain-of-thought inside `<think>` ... `</think>` and the answer after it.
`ReasoningSplitter` splits text as it streams (serve, ask); `split_reasoning` runs the same splitter
over a whole completion (eval, reports), so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FORCE_CLOSE = "\n" + THINK_CLOSE + "\n"  # what the thinking budget appends when the reasoning runs out


def force_close_ids(tokenizer) -> list[int]:
    """The ids fed for FORCE_CLOSE: the engine feeds exactly these, and GRPO's update trains around them."""
    return tokenizer(FORCE_CLOSE, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str
    closed: bool  # False when the model never wrote </think> (ran out of tokens or never reasoned)


class ReasoningSplitter:
    """Split streamed model text into reasoning and answer, as it arrives.

    Cases, all handled on partial pieces (a tag may arrive split across pieces):
    - the prompt opened `<think>` (seed template, R1 chat templates): the text starts inside the
      reasoning, which ends at `</think>`; a repeated opening tag is dropped;
    - the prompt did not open it: text that starts with `<think>` is reasoning up to `</think>`; text that
      starts with anything else is all answer;
    - `</think>` never comes (max_tokens reached, timeout): everything is reasoning, the answer is empty.

    Whitespace around the tags is dropped, so the concatenated pieces equal
    `split_reasoning` of the whole text.
    """

    def __init__(self, starts_in_reasoning: bool):
        self.closed = False  # True once `</think>` has been seen
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""
        self._at_section_start = True  # leading whitespace of a section is dropped
        self._seen_open = False  # an opening tag at the very start decides (or repeats) the section

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Returns (kind, text) pieces, kind in "reasoning" | "content"."""
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self._state in ("start", "reasoning") and self._at_section_start and not self._seen_open:
                head = self._buf.lstrip()
                if THINK_OPEN.startswith(head) and len(head) < len(THINK_OPEN):
                    return out  # maybe an opening tag: wait for more
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                    self._state = "reasoning"
                elif self._state == "start":
                    self._state = "content"
                self._seen_open = True
            if self._state == "reasoning":
                before, sep, after = self._buf.partition(THINK_CLOSE)
                if sep:
                    self.closed = True
                    self._emit(out, "reasoning", before, final=True)
                    self._state, self._buf, self._at_section_start = "content", after, True
                    continue
                # Keep a possible partial closing tag for the next piece.
                keep = next((k for k in range(len(THINK_CLOSE) - 1, 0, -1)
                             if self._buf.endswith(THINK_CLOSE[:k])), 0)
                text, partial_tag = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._buf = self._emit(out, "reasoning", text) + partial_tag
                return out
            if self._state == "content":
                self._buf = self._emit(out, "content", self._buf)
                return out
            return out

    def flush(self) -> list[tuple[str, str]]:
        """The end of the text: what was held back for a tag that never came (trailing whitespace is dropped)."""
        out: list[tuple[str, str]] = []
        if self._state == "start":  # only whitespace or a partial "<think" ever came: an answer
            self._state = "content"
        self._emit(out, "reasoning" if self._state == "reasoning" else "content", self._buf, final=True)
        self._buf = ""
        return out

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str, final: bool = False) -> str:
        """Append `text` (less leading whitespace at a section start); returns trailing whitespace held back."""
        if self._at_section_start:
            text = text.lstrip()
        body = text.rstrip()
        held = "" if final else text[len(body):]
        if body:
            out.append((kind, body))
            self._at_section_start = False
        return held


def split_reasoning(text: str, starts_in_reasoning: bool = True) -> Split:
    """Split a whole completion into reasoning and answer (the streaming splitter, fed at once).

    Our prompts open `<think>` themselves, so by default a completion starts inside the reasoning; one
    that repeats `<think>` is handled too. Without `</think>` everything is reasoning and the answer is
    empty: the model never reached its answer.
    """
    splitter = ReasoningSplitter(starts_in_reasoning)
    pieces = splitter.feed(text) + splitter.flush()
    return Split(reasoning="".join(t for kind, t in pieces if kind == "reasoning"),
                 answer="".join(t for kind, t in pieces if kind == "content"), closed=splitter.closed)
