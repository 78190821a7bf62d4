"""Answer extraction: the label a model's output commits to, and how we found it.

Where: the text after `</think>` (the model's final answer), or after HuatuoGPT-o1's
"## Final Response" header. When the output has neither (the model never closed its reasoning), the
whole output is searched instead, for a stated answer only ("so the answer is C"; options merely
discussed don't count), and the method says so (`whole_output:explicit`).

How, in order (the first rule that yields exactly one label wins; the method names the rule):
- `explicit`: a stated answer ("The answer is (C)", "Answer: b", "ans - c", "correct option is D",
  "option C is correct", "I'd go with A", "it's B", "…, so D.", "not A but B", `\\boxed{\\mathbf{C}}`,
  `<answer>B</answer>`, "答案：B", "正确答案是C", "故选B"). Statements are read in order:
  - the last one counts when it revises an earlier, different one after a revision word ("wait",
    "actually", "on second thought", "correction", "不对", ...): method `revised`;
  - two different stated answers with no revision between them (a small model listing every option
    as "the answer") are a `conflict`: unparseable;
  - a statement naming several labels ("The answer is A and C", "A or C", "A, C and D") commits to
    none: `conflict`, unparseable.
  Inside unfinished reasoning the last statement counts (models revise as they think).
- `leading`: the answer starts with the label ("B. Cholesterol embolization", "(B)", "Yes, ...") and
  names no other label.
- `letter` / `word`: exactly one distinct bare mention of a label ("(C)", "option C"; "maybe").
- `option_text`: exactly one option's text appears (longest match wins over a contained one); if it
  disagrees with a bare-letter mention the output is ambiguous.
Anything else is unparseable (`label=None`, method `none` or `...:conflict`): it is scored wrong and
counted apart.

    python -m pytest tests/eval/test_eval_extract.py tests/eval/test_extract_kinds.py
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from medcot.eval.statements import Statement, choice_statements, yes_no_statements
from medcot.generate.reasoning import split_reasoning


@dataclass(frozen=True)
class Extraction:
    label: str | None  # a letter, or yes/no/maybe; None when nothing parseable was found
    method: str  # "<where>:<how>", e.g. "after_think:explicit", "whole_output:option_text"; "none"


NONE = Extraction(None, "none")


# A model that runs on after its answer often starts a new prompt of the seed template ("### Question:
# ..."); whatever follows belongs to a question it invented, not to this one.
_NEW_PROMPT = re.compile(r"\n#{2,3} ?(?:Question|Instruction|Response)\b|<think>", re.I)
# HuatuoGPT-o1 (and models tuned on its data) separate reasoning and answer with markdown headers.
_FINAL_RESPONSE = re.compile(r"^#{1,3} ?Final Response\s*$", re.M | re.I)


def _region(output: str) -> tuple[str, str]:
    s = split_reasoning(output)
    headers = list(_FINAL_RESPONSE.finditer(output))
    if s.closed:
        text, where = s.answer, "after_think"
    elif headers:
        text, where = output[headers[-1].end():], "final_response"
    else:
        text, where = output, "whole_output"
    m = _NEW_PROMPT.search(text, 1)
    return (text[: m.start()] if m else text), where


_LATEX_STYLE = re.compile(
    r"\\(?:text\w*|math\w*|bf|it|rm|emph|operatorname|mbox|bm|boldsymbol|underline)\s*\{([^{}]*)\}")
_LATEX_BOX = re.compile(r"\\(?:boxed|fbox|framebox)\s*\{([^{}]*)\}")


def clean(text: str) -> str:
    """Plain text for the rules: no markdown, LaTeX or tags; full-width forms and curly quotes folded.

    `\\boxed{...}` and `<answer>...</answer>` become "answer: ...", which is what they mean.
    """
    text = unicodedata.normalize("NFKC", text)  # "答案：Ｂ" -> "答案:B", "（B）" -> "(B)"
    text = text.translate(str.maketrans("‘’“”«»", "''\"\"\"\""))
    for _ in range(3):  # nested styles: \boxed{\textbf{\mathrm{C}}}
        text = _LATEX_STYLE.sub(r"\1", text)
    text = _LATEX_BOX.sub(r" answer: \1 ", text)
    text = re.sub(r"\\[()\[\]]|\\(?:quad|qquad|left|right)\b|\\[,;! ]|\$", " ", text)
    text = re.sub(r"<answer>(.*?)</answer>", r" answer: \1 ", text, flags=re.I | re.S)
    text = re.sub(r"</?(?:answer|b|strong|em|i|u|p|br)\s*/?>", " ", text, flags=re.I)
    return re.sub(r"\*\*|__|[*`#]", "", text)


def _resolve(statements: list[Statement], text: str, final: bool) -> tuple[str | None, str] | None:
    """(label, rule) from the stated answers of one region, in order; None when nothing was stated."""
    if not statements:
        return None
    last = statements[-1]
    if len(last.labels) > 1:
        return None, "conflict"  # "the answer is A or C" commits to neither
    (label,) = last.labels
    differing = [s for s in statements[:-1] if s.labels != last.labels]
    if not differing or not final:
        return label, "explicit"  # inside the reasoning the last statement counts
    if last.revises(text, differing[-1]):
        return label, "revised"
    return None, "conflict"  # two different answers, neither taken back


# ---------------------------------------------------------------------------------------------
# Multiple choice


_NEGATED_AFTER = re.compile(r"^\s*(?:is|are|seems|was)\s+(?:not|incorrect|wrong|unlikely|less\s+likely|ruled\s+out)\b", re.I)
_NEGATED_BEFORE = re.compile(r"\b(?:not|exclude|excludes|rule\s+out|rules\s+out|than)\s+(?:option\s+|choice\s+)?[\(\[]?$", re.I)


def _bare_patterns(letters: str) -> tuple[re.Pattern, re.Pattern]:
    up = letters
    leading = re.compile(rf"^\s*(?:(?:option|choice)\s+)?[\(\['\"]?(?-i:(?P<x>[{up}]))[\)\]'\"]?(?P<rest>.*)", re.I | re.S)
    bare = re.compile(
        rf"\b(?:option|choice)\s+(?:[\(\['\"]\s*)?(?P<o>[{up}])(?![\w\-])"
        rf"|[\(\[]\s*(?-i:(?P<p>[{up}]))\s*[\)\]]"
        rf"|(?:^|(?<=\s))(?-i:(?P<q>[{up}]))\)(?!\w)"
        rf"|^[ \t]*(?-i:(?P<r>[{up}]))[\.:](?!\w)"
        rf"|(?:^|(?<=\s))(?P<s>['\"])(?-i:(?P<t>[{up}]))(?P=s)",
        re.I | re.M,
    )
    return leading, bare


def _norm(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def _option_text_label(text: str, options: dict[str, str]) -> str | None:
    hay = _norm(text)
    found = {k: _norm(v) for k, v in options.items() if len(_norm(v).strip()) >= 3 and _norm(v) in hay}
    # "Glycogen synthesis" inside "glycogen synthesis and breakdown": the longer, more specific one
    specific = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    return specific[0] if len(specific) == 1 else None


def _choice(text: str, options: dict[str, str], final: bool) -> tuple[str | None, str] | None:
    """(label, rule) for one region; `final`: the region is the answer, not unfinished reasoning."""
    letters = "".join(options)
    text = clean(text)
    if not text.strip():
        return None
    stated = _resolve(choice_statements(text, letters), text, final)
    if stated or not final:
        return stated  # inside the reasoning only a stated answer counts, not options being discussed
    leading, bare_pattern = _bare_patterns(letters)
    bare = set()
    for m in bare_pattern.finditer(text):
        if _NEGATED_BEFORE.search(text[max(0, m.start() - 20) : m.start()]) or _NEGATED_AFTER.match(text[m.end() :]):
            continue
        bare.add(next(v for k, v in m.groupdict().items() if v and k != "s").upper())
    m = leading.match(text)
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
    found = _choice(text, options, final=where != "whole_output")
    return Extraction(found[0], f"{where}:{found[1]}") if found else NONE


# ---------------------------------------------------------------------------------------------
# Yes / no / maybe (PubMedQA)

_YN_LEADING = re.compile(r"^\W*(?:(?P<w>yes|maybe)(?![\w-])|(?P<n>no)(?=\s*(?:[.,;:!?。]|[-–—]|$)))", re.I)
# Bare mentions: "yes"/"maybe" anywhere; "no" only as a sentence of its own ("No." / "No, ...") since
# "no significant difference" is prose, not an answer.
_YN_BARE = re.compile(r"(?<!not )\b(?P<w>yes|maybe)\b|(?:^|(?<=[\.\!\?:]\s))(?P<n>no)(?=\s*(?:[\.,!;:]|$))", re.I | re.M)
# Saying the evidence settles nothing is PubMedQA's "maybe" ("no definitive conclusion can be drawn").
_YN_HEDGE = re.compile(
    r"\b(?:inconclusive|uncertain|unclear|cannot\s+be\s+(?:determined|concluded)|not\s+(?:sure|clear)"
    r"|no\s+(?:definitive|definite|firm|clear|conclusive)\s+(?:conclusions?|answer))\b",
    re.I,
)


def extract_yes_no(output: str) -> Extraction:
    """The yes/no/maybe an output commits to (see the module docstring for the rules)."""
    text, where = _region(output)
    text = clean(text)
    final = where != "whole_output"
    stated = _resolve(yes_no_statements(text), text, final)
    if stated:
        return Extraction(stated[0], f"{where}:{stated[1]}")
    if not final:
        return NONE  # inside the reasoning only a stated answer counts
    if re.search(r"\b(?:yes|no)\s+(?:and|or)\s+(?:yes|no)\b", text, re.I):
        return NONE  # "yes and no: it depends" commits to neither
    m = _YN_LEADING.match(text)
    if m:
        return Extraction((m.group("w") or m.group("n")).lower(), f"{where}:leading")
    words = {(m.group("w") or m.group("n")).lower() for m in _YN_BARE.finditer(text)}
    if len(words) == 1:
        return Extraction(words.pop(), f"{where}:word")
    if not words and _YN_HEDGE.search(text):
        return Extraction("maybe", f"{where}:word")  # "the evidence is inconclusive", and no yes/no in sight
    return NONE
