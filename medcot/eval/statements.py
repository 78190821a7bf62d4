"""Stated answers: the places where an output says which label it picks, in order.

"The answer is C", "answer: c", "ans - c", "Correct option: 'C'", "I'd go with C", "option C is
correct", "…, so C.", "it's C", "not A but C", "答案：C", "正确答案是C", "故选C"; for PubMedQA the
same markers with yes / no / maybe ("答案：否"). The text comes through `extract.clean` first, so
markdown, `\\boxed{}` and `<answer>` tags are already plain "answer: C".

Each statement is the set of labels it names: "The answer is A or C" is one statement naming two,
which commits to neither. Markers that are strong on their own ("answer", "答案") take a lower-case
letter when it ends its clause ("answer: c", never "answer is a beta blocker"); weak ones ("so",
"it's") need a capital letter that ends its sentence ("…, so D."), so "so A, B and D are ruled out"
states nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# A revision between two different statements means the later one takes the earlier back
# ("The answer is A. Wait, actually ... it's B"); without one, two answers are a conflict.
_REVISION = re.compile(
    r"\b(?:wait|actually|hold\s+on|hm+|on\s+(?:second|further)\s+thought|on\s+reflection|correction|corrected"
    r"|reconsider\w*|re-?(?:check|read|think|evaluat)\w*|double[- ]check\w*|scratch\s+that|my\s+mistake|mistaken"
    r"|I\s+was\s+wrong|I\s+mean|rather|instead|oops|however|but|upon\s+(?:further\s+)?review|revis\w+)\b"
    r"|\bno\s*[,.!]|不对|等等|更正|其实|实际上|但是|不过|改为",
    re.I,
)
# "I'd say B is wrong": a letter followed by its rejection is no statement.
_REJECTED = re.compile(r"\s*(?:is|are|seems|was|would\s+be)\s+(?:not|incorrect|wrong|unlikely|less\s+likely|ruled\s+out|excluded)\b", re.I)
# A list of labels ends there: "A and C." is a list; "A, and C is wrong" is not.
_LIST_END = r"(?![A-Za-z0-9'\-])(?!\s+(?:is|was|are|were|has|have|had|would|will|can|could|should|may|might|must|does|did)\b)"


@dataclass(frozen=True)
class Statement:
    start: int
    end: int
    labels: frozenset[str]

    def revises(self, text: str, earlier: Statement) -> bool:
        """A revision word stands between `earlier` and this statement."""
        return _REVISION.search(text, earlier.end, self.start) is not None


_VERB = r"(?:(?:here\s+)?(?:is|are|was)|(?:would|will|should|must|could|may|might)\s+be|seems\s+to\s+be|appears\s+to\s+be|=>|->|→|=|:|-|–|—)"
_HEDGE = r"(?:(?:(?:most\s+)?likely|probably|clearly|definitely|therefore|thus|then|still|indeed|simply|just|either)\s+)*"
_WHICH = r"(?:(?:option|choice|letter)\s+)?"
_ANSWER = (r"\b(?:(?:final|correct|right|best|my|the|your)\s+)*(?:answers?|ans)\b\.?(?:\s+(?:choice|option)s?)?"
           r"(?:\s+to\s+(?:the|this)\s+(?:research\s+)?question)?")
_END_STRONG = r"(?=\s*(?:$|[.,;:!?)\]。]|\s[-–—]))"
_END_WEAK = r"(?=\s*(?:$|[.!?;)\]。]|\s[-–—]))"
_IT_IS = (r"(?:it(?:'s|\s+is|\s+must\s+be|\s+has\s+to\s+be|\s+should\s+be|\s+would\s+be)|that(?:'s|\s+is|\s+would\s+be"
          r"|\s+leaves(?:\s+us\s+with)?)|which\s+leaves|this\s+leaves|leaving(?:\s+us\s+with)?|leaves\s+us\s+with)")
_SO = r"\b(?:so|thus|therefore|hence|ergo|consequently|accordingly)\b\s*,?\s*"
_PICK = r"(?:I\s+)?(?:choose|pick|select|go\s+with)"
_CHOOSE = (r"(?:\bI(?:\s+would|\s+will|'d|'ll|\s+am|'m)?\s+(?:choose|choosing|pick|picking|select|selecting|go(?:ing)?\s+with"
           r"|say|opt\s+for)|\bmy\s+(?:choice|pick|selection)\s+(?:is|would\s+be)|\b(?:we|let's)\s+(?:choose|pick|select|go\s+with))")

# Markers before the label: (regex, strength). Strong markers take `answer: c`; weak ones need "C." at a
# sentence end. The Chinese ones have no word boundaries to lean on, so they are spelled out.
_CHOICE_MARKERS = [
    (rf"{_ANSWER}\s*{_VERB}\s*{_HEDGE}{_WHICH}:?\s*", "strong"),  # The answer is (C) / Answer: B / ans - c
    (rf"{_ANSWER}\s+{_WHICH}", "clause"),  # "Answer B." / "Answer\nB": only where the letter ends the clause
    (rf"\b(?:correct|right|best|final|most\s+appropriate)\s+(?:options?|choices?|responses?|letters?|selections?)"
     rf"\s*{_VERB}?\s*{_HEDGE}{_WHICH}:?\s*", "strong"),
    (rf"{_CHOOSE}\s+{_WHICH}", "strong"),
    (r"答案\s*(?:应该|应当|应|就|也)?\s*(?:是|为|選|选)?\s*:?\s*", "cjk"),
    (r"(?:正确|最佳|最终|最合适|标准)的?(?:答案|选项|选择)\s*(?:应该|应当|应|就)?\s*(?:是|为)?\s*:?\s*", "cjk"),
    (r"(?:故|所以|因此|因而|应|我|则|可)?选(?:择)?\s*", "cjk"),
    (r"(?:而|应该|应当|就)是\s*", "cjk"),
    (rf"{_SO}(?:(?:{_IT_IS}|the\s+answer\s+is|{_PICK})\s+)?{_WHICH}", "weak"),  # …, so D.
    (rf"\b{_IT_IS}\s+{_WHICH}", "weak"),  # it's B / that leaves B
    (r"\bnot\s+{neg}\s*[,;]?\s*but\s+(?:rather\s+)?" + _WHICH, "weak"),  # not A but B
]
# The label first, then what makes it the answer: "option C is correct", "C is the correct answer".
_CHOICE_AFTER = (r"\s*(?:\([^)]*\)\s*)?(?:is|would\s+be|seems|appears)\s+(?:to\s+be\s+)?(?:the\s+)?(?:most\s+)?"
                 r"(?:correct|right|best|most\s+likely|most\s+appropriate|accurate|true|(?:final\s+)?answer)\b")
_SEVERAL_AFTER = (r"\s+(?:are|were)\s+(?:both\s+|all\s+|equally\s+)?(?:correct|right|true|valid|acceptable"
                  r"|(?:the\s+)?(?:correct\s+|right\s+)?answers)\b")


def _letter(up: str, kind: str) -> str:
    """One label of `up` (e.g. "ABCD") as a marker of this kind may state it."""
    bracket = rf"[\(\[]\s*[{up}]\s*[\)\]]"  # case-free inside brackets: "(c)"
    quoted = rf"'\s*[{up}]\s*'|\"\s*[{up}]\s*\""
    capital = rf"(?-i:[{up}])(?![A-Za-z0-9_'\-])"  # not the start of a word: "B-cell", "B12", "Aspirin"
    if kind == "cjk":
        return rf"(?:[\(\[]\s*)?(?-i:[{up}])(?![A-Za-z0-9_'\-])(?:\s*[\)\]])?"
    if kind == "strong":
        return rf"(?:{bracket}|{quoted}|{capital}|(?-i:[{up.lower()}]){_END_STRONG})"
    return rf"(?:{bracket}|{quoted}|{capital})"


_SEP = r"\s*(?:,|/|&|\+|、|\band\b|\bor\b|\bplus\b|和|或|及|与)\s*(?:(?:and|or)\s+)?(?:(?:option|choice)\s+)?"


@lru_cache(maxsize=32)
def _choice_patterns(up: str) -> tuple[list[re.Pattern], list[re.Pattern]]:
    """(single-label patterns, several-label patterns) for the option letters `up`."""
    flags = re.I | re.M
    any_letter = _letter(up, "weak")
    singles, lists = [], []
    for marker, kind in _CHOICE_MARKERS:
        marker = marker.replace("{neg}", rf"(?:(?:option|choice)\s+)?{any_letter}")
        one = _letter(up, kind)
        end = {"weak": _END_WEAK, "clause": _END_STRONG}.get(kind, "")
        singles.append(re.compile(rf"{marker}(?P<x>{one}){end}", flags))
        item = rf"{one}(?:\s*\([^()]*\))?"
        lists.append(re.compile(rf"{marker}(?P<list>{item}(?:{_SEP}{_letter(up, 'weak')}(?:\s*\([^()]*\))?)+){_LIST_END}", flags))
    singles.append(re.compile(rf"\b(?:option|choice)\s+(?P<x>{_letter(up, 'strong')}){_CHOICE_AFTER}", flags))
    singles.append(re.compile(rf"(?:^|(?<=[\s(]))(?P<x>{any_letter})[\)\.]?{_CHOICE_AFTER}", flags))
    cjk = _letter(up, "cjk")
    singles.append(re.compile(rf"(?:选项\s*)?(?P<x>{cjk})\s*(?:项|选项)?\s*(?:是|为)?(?:正确|对的|最佳|最合适)", flags))
    lists.append(re.compile(rf"(?:\bboth\s+)?(?P<list>{any_letter}(?:{_SEP}{any_letter})+){_SEVERAL_AFTER}", flags))
    return singles, lists


def _labels_in(text: str) -> frozenset[str]:
    text = re.sub(r"\([^()]{2,}\)", " ", text)  # "B (doxycycline) or C": the letters, not the option text
    return frozenset(c.upper() for c in re.findall(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])", text))


def _collect(text: str, singles, lists, label_of) -> list[Statement]:
    found = []
    for p in lists:
        for m in p.finditer(text):
            labels = label_of(m.group("list"), several=True)
            if len(labels) > 1:
                found.append(Statement(m.start("list"), m.end("list"), labels))
    spans = [(s.start, s.end) for s in found]
    for p in singles:
        for m in p.finditer(text):
            start, end = m.span("x")
            if any(a <= start < b for a, b in spans) or _REJECTED.match(text, end):
                continue
            found.append(Statement(start, end, label_of(m.group("x"), several=False)))
    unique = {(s.start, s.labels): s for s in found}  # one label stated by two markers at once
    return sorted(unique.values(), key=lambda s: s.start)


def choice_statements(text: str, letters: str) -> list[Statement]:
    """The stated answers in `text` (already `clean`ed), in order; labels are letters of `letters`."""
    singles, lists = _choice_patterns(letters)

    def label_of(span: str, several: bool) -> frozenset[str]:
        return _labels_in(span) if several else frozenset(re.search(r"[A-Za-z]", span).group().upper())

    return _collect(text, singles, lists, label_of)


# ---------------------------------------------------------------------------------------------
# Yes / no / maybe

_YN = (r"(?:yes|no|maybe|uncertain|unclear|inconclusive|not\s+(?:sure|clear)|cannot\s+be\s+determined|undetermined"
       r"|是|否|肯定|否定|不确定|可能|不一定|也许)(?![A-Za-z\-])")
_YN_WORDS = {"yes": "yes", "是": "yes", "肯定": "yes", "no": "no", "否": "no", "否定": "no"}  # everything else: maybe
_YN_MARKERS = [
    rf"{_ANSWER}\s*{_VERB}\s*{_HEDGE}(?:a\s+)?[\"'(\[]?\s*",
    r"\b(?:conclusion|decision|verdict)\s*(?:is|:|-|–|—)\s*[\"'(\[]?\s*",
    r"答案\s*(?:应该|应|就)?\s*(?:是|为)?\s*:?\s*",
]


@lru_cache(maxsize=1)
def _yn_patterns() -> tuple[list[re.Pattern], list[re.Pattern]]:
    several = rf"{_YN}(?:\s*(?:/|\bor\b|\band\b|和|或)\s*{_YN})+{_LIST_END}"
    singles = [re.compile(rf"{m}(?P<x>{_YN})", re.I) for m in _YN_MARKERS]
    singles.append(re.compile(rf"{_SO}(?:the\s+answer\s+is\s+)?(?P<x>yes|no|maybe)(?=\s*(?:$|[.!?;。]))", re.I))
    return singles, [re.compile(rf"{m}(?P<list>{several})", re.I) for m in _YN_MARKERS]


def _yn_label(word: str) -> str:
    return _YN_WORDS.get(" ".join(word.lower().split()), "maybe")


def yes_no_statements(text: str) -> list[Statement]:
    """The stated yes / no / maybe answers in `text` (already `clean`ed), in order."""
    singles, lists = _yn_patterns()

    def label_of(span: str, several: bool) -> frozenset[str]:
        if several:
            return frozenset(_yn_label(w) for w in re.findall(_YN, span, re.I))
        return frozenset([_yn_label(span)])

    return _collect(text, singles, lists, label_of)
