"""Answer extraction: the label a model's output commits to, and how we found it.

Where: the text after `</think>` (the model's final answer). When the output has no `</think>`
(the model never closed its reasoning), the whole output is searched instead, for an explicitly
stated answer only ("so the answer is C"; options merely discussed don't count), and the method
says so (`whole_output:explicit`).

How, in order (the first rule that yields exactly one label wins; the method names the rule):
- `explicit`: a stated answer: "The answer is (C)", "Answer: B", "correct option is D",
  "option C is correct", "I'd go with A", `\\boxed{B}`. Inside the reasoning the last statement
  counts (models revise as they think); a final answer that states two different labels ("The
  answer is A. ... The answer is B", typical of a small model listing options) is a `conflict`:
  unparseable.
- `leading`: the answer starts with the label ("B. Cholesterol embolization", "(B)", "Yes, ...")
  and names no other label.
- `letter` / `word`: exactly one distinct bare mention of a label ("(C)", "option C"; "maybe").
- `option_text`: exactly one option's text appears (longest match wins over a contained one);
  if it disagrees with a bare-letter mention the output is ambiguous.
Anything else is unparseable (`label=None`, method `none` or `...:conflict`): it is scored wrong
and counted apart.

    python -m pytest tests/eval/test_eval_extract.py   # the hand-written cases in extractor_cases.jsonl
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from medcot.generate.reasoning import split_reasoning


@dataclass(frozen=True)
class Extraction:
    label: str | None  # a letter, or yes/no/maybe; None when nothing parseable was found
    method: str  # "<where>:<how>", e.g. "after_think:explicit", "whole_output:option_text"; "none"


NONE = Extraction(None, "none")


# A model that runs on after its answer often starts a new prompt of the seed template ("### Question:
# ..."); whatever follows belongs to a question it invented, not to this one.
_NEW_PROMPT = re.compile(r"\n#{2,3} ?(?:Question|Instruction|Response)\b|<think>", re.I)


def _region(output: str) -> tuple[str, str]:
    s = split_reasoning(output)
    text, where = (s.answer, "after_think") if s.closed else (output, "whole_output")
    m = _NEW_PROMPT.search(text, 1)
    return (text[: m.start()] if m else text), where


def _clean(text: str) -> str:
    """Drop markdown and LaTeX wrappers so "**Answer: B**" and "$\\boxed{B}$" read like "Answer: B"."""
    text = re.sub(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{)?\s*([^{}]*?)\s*\}?\s*\}", r" answer: \1 ", text)
    text = re.sub(r"\\text(?:bf)?\s*\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\*\*|__|[*`$#]", "", text)
    return text.replace("’", "'")


# ---------------------------------------------------------------------------------------------
# Multiple choice


@lru_cache(maxsize=16)
def _choice_patterns(letters: str) -> dict[str, re.Pattern]:
    up, low = letters, letters.lower()
    # A label: "(C)", "[c]" (case-free inside brackets), or a bare capital letter that is not the
    # start of a word ("B-cell", "B12", "Aspirin" are words, not labels).
    let = rf"(?:[\(\[]\s*(?P<b>[{up}{low}])\s*[\)\]]|(?-i:(?P<l>[{up}]))(?![\w'\-]))"
    end = r"(?=\s*(?:$|[\.\)\]:,;!?]|\s[-–—]))"  # the letter ends its clause
    verb = r"(?:is|was|would\s+be|will\s+be|should\s+be|must\s+be|=|:|-|–)"
    hedge = r"(?:(?:most\s+)?likely\s+|probably\s+|clearly\s+|definitely\s+|therefore\s+|thus\s+)?"
    which = r"(?:option\s+|choice\s+|letter\s+)?"
    answer = r"\banswer(?:\s+choice)?(?:\s+to\s+(?:the|this)\s+question)?"
    explicit = [
        rf"{answer}\s*{verb}\s*{hedge}{which}:?\s*{let}",  # The answer is (C) / Answer: B
        rf"{answer}\s+{which}{let}{end}",  # "Answer B." (no verb: only where the letter ends the clause)
        rf"\b(?:correct|right|best)\s+(?:option|choice|response)\s*{verb}?\s*{hedge}{which}{let}",
        rf"\b(?:option|choice)\s+{let}\s*(?:\([^)]*\)\s*)?(?:is|would\s+be|seems|appears)\s+(?:to\s+be\s+)?"
        r"(?:the\s+)?(?:most\s+)?(?:correct|right|best|most\s+likely|most\s+appropriate|accurate)\b",
        rf"(?:^|(?<=[\s(]))(?-i:(?P<s>[{up}]))[\)\.]?\s+is\s+(?:the\s+)?(?:correct|right|best)\b",
        r"\b(?:I(?:\s+would|\s+will|'d|'ll)?\s+(?:choose|pick|select|go\s+with)|going\s+with)\s+"
        rf"{which}{let}",
    ]
    return {
        "explicit": re.compile("|".join(f"(?:{p})" for p in _renumber(explicit)), re.I | re.M),
        "leading": re.compile(rf"^\s*(?:(?:option|choice)\s+)?[\(\[]?(?-i:(?P<x>[{up}]))[\)\]]?(?P<rest>.*)", re.I | re.S),
        "bare": re.compile(
            rf"(?:\b(?:option|choice)\s+{let})"
            rf"|(?:[\(\[]\s*(?-i:(?P<p>[{up}]))\s*[\)\]])"
            rf"|(?:(?:^|(?<=\s))(?-i:(?P<q>[{up}]))\)(?!\w))"
            rf"|(?:^[ \t]*(?-i:(?P<r>[{up}]))[\.:](?!\w))",
            re.I | re.M,
        ),
    }


def _renumber(patterns: list[str]) -> list[str]:
    """Give each alternative's named groups unique names (b0, l0, b1, ...): one regex, many rules."""
    out = []
    for i, p in enumerate(patterns):
        out.append(re.sub(r"\(\?P<(\w)>", lambda m: f"(?P<{m.group(1)}{i}>", p))
    return out


def _group_letter(m: re.Match) -> str:
    return next(v for v in m.groupdict().values() if v and len(v) == 1).upper()


_NEGATED_AFTER = re.compile(r"^\s*(?:is|are|seems|was)\s+(?:not|incorrect|wrong|unlikely|less\s+likely|ruled\s+out)\b", re.I)
_NEGATED_BEFORE = re.compile(r"\b(?:not|exclude|excludes|rule\s+out|rules\s+out|than)\s+(?:option\s+|choice\s+)?[\(\[]?$", re.I)


def _norm(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def _option_text_label(text: str, options: dict[str, str]) -> str | None:
    hay = _norm(text)
    found = {k: _norm(v) for k, v in options.items() if len(_norm(v).strip()) >= 3 and _norm(v) in hay}
    # "Glycogen synthesis" inside "glycogen synthesis and breakdown": the longer, more specific one
    specific = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    return specific[0] if len(specific) == 1 else None


def _choice(text: str, options: dict[str, str], final: bool) -> tuple[str | None, str] | None:
    """(label, rule) for one region; `final`: the region is the answer after </think>, not the reasoning."""
    letters = "".join(options)
    pats = _choice_patterns(letters)
    text = _clean(text)
    if not text.strip():
        return None
    explicit = list(pats["explicit"].finditer(text))
    if explicit:
        if final and len({_group_letter(m) for m in explicit}) > 1:
            return None, "conflict"  # a final answer naming two different options commits to neither
        return _group_letter(max(explicit, key=lambda m: m.start())), "explicit"
    if not final:
        return None  # inside the reasoning only a stated answer counts, not options being discussed
    bare = set()
    for m in pats["bare"].finditer(text):
        if _NEGATED_BEFORE.search(text[max(0, m.start() - 20) : m.start()]) or _NEGATED_AFTER.match(text[m.end() :]):
            continue
        bare.add(_group_letter(m))
    m = pats["leading"].match(text)
    if m and bare <= {m.group("x")}:
        rest = m.group("rest")
        # "B. ...", "(B)", "B" alone; or "B Cholesterol embolization" (the letter, then its option text)
        if re.match(r"^\s*$|^[\.\):,]|^\s+[-–—]", rest) or _norm(rest).startswith(_norm(options[m.group("x")])):
            return m.group("x"), "leading"
    by_text = _option_text_label(text, options)
    if len(bare) == 1:
        (letter,) = bare
        if by_text is not None and by_text != letter:
            return None  # the letter and the option text name different options
        return letter, "letter"
    if not bare and by_text is not None:
        return by_text, "option_text"
    return None


def extract_choice(output: str, options: dict[str, str]) -> Extraction:
    """The option letter an output commits to (see the module docstring for the rules)."""
    text, where = _region(output)
    found = _choice(text, options, final=where == "after_think")
    return Extraction(found[0], f"{where}:{found[1]}") if found else NONE


# ---------------------------------------------------------------------------------------------
# Yes / no / maybe (PubMedQA)

_YN = r"(?P<w>yes|no|maybe|uncertain|unclear|inconclusive|not\s+sure|cannot\s+be\s+determined)"
_YN_EXPLICIT = re.compile(
    r"\banswer(?:\s+to\s+(?:the|this)\s+question)?\s*(?:is|was|would\s+be|will\s+be|should\s+be|=|:|-|–)\s*"
    r"(?:(?:most\s+)?likely\s+|probably\s+|clearly\s+|definitely\s+|therefore\s+|a\s+)?[\"'“(\[]?\s*"
    + _YN + r"(?![\w-])"
    + r"|\b(?:conclusion|decision|verdict)\s*(?:is|:)\s*[\"'“]?\s*" + _YN.replace("<w>", "<v>") + r"(?![\w-])",
    re.I,
)
_YN_LEADING = re.compile(r"^\W*(?P<w>yes|no|maybe)(?![\w-])", re.I)
# Bare mentions: "yes"/"maybe" anywhere; "no" only as a sentence of its own ("No." / "No, ...") since
# "no significant difference" is prose, not an answer.
_YN_BARE = re.compile(r"(?<!not )\b(?P<w>yes|maybe)\b|(?:^|(?<=[\.\!\?:]\s))(?P<n>no)(?=\s*(?:[\.,!;:]|$))", re.I | re.M)
_YN_HEDGE = re.compile(r"\b(?:inconclusive|uncertain|unclear|cannot\s+be\s+determined|not\s+sure)\b", re.I)
_MAYBE = {"uncertain", "unclear", "inconclusive", "not sure", "cannot be determined"}


def _yn_label(word: str) -> str:
    word = " ".join(word.lower().split())
    return "maybe" if word in _MAYBE else word


def extract_yes_no(output: str) -> Extraction:
    """The yes/no/maybe an output commits to (see the module docstring for the rules)."""
    text, where = _region(output)
    text = _clean(text)
    explicit = list(_YN_EXPLICIT.finditer(text))
    if explicit:
        labels = {_yn_label(m.group("w") or m.group("v")) for m in explicit}
        if where == "after_think" and len(labels) > 1:
            return Extraction(None, f"{where}:conflict")
        m = max(explicit, key=lambda m: m.start())
        return Extraction(_yn_label(m.group("w") or m.group("v")), f"{where}:explicit")
    if where != "after_think":
        return NONE  # inside the reasoning only a stated answer counts
    if re.search(r"\b(?:yes|no)\s+(?:and|or)\s+(?:yes|no)\b", text, re.I):
        return NONE  # "yes and no: it depends" commits to neither
    m = _YN_LEADING.match(text)
    if m:
        return Extraction(_yn_label(m.group("w")), f"{where}:leading")
    words = {_yn_label(m.group("w") or m.group("n")) for m in _YN_BARE.finditer(text)}
    if len(words) == 1:
        return Extraction(words.pop(), f"{where}:word")
    if not words and _YN_HEDGE.search(text):
        return Extraction("maybe", f"{where}:word")  # "the evidence is inconclusive", and no yes/no in sight
    return NONE
