"""HuatuoGPT-o1's answer scorer, ported line for line so that scores line up with its published table.

Source: FreedomIntelligence/HuatuoGPT-o1 @ 2c8d7fcaadaad44000eb1765cbe36a09968a0164 (evaluation/ last
changed in dc6e08a2), `evaluation/scorer.py` (blob 987c9f33): `match_choice`, `str_similarity`,
`find_most_similar_index`, and `score`'s rule that a benchmark's accuracy is the better of the
first-match and the last-match accuracy. Its quirks are kept on purpose (they are part of the number):
- the whole output is read, reasoning included (only HuatuoGPT-o1's "## Final Response" is split off);
- "answer is X" accepts any letter A-N, even one that is not an option;
- the "first" option-text match is the option whose first mention comes last;
- nothing is unparseable: without a letter or an option's text, the option most similar to the whole
  output (difflib ratio, ties to the last option) is the answer.
"""

from __future__ import annotations

import difflib
import re

# evaluation/scorer.py: match types, named for the report
MATCH_TYPES = {1: "letter", 2: "option_text", 3: "nearest_option"}


def str_similarity(str1: str, str2: str) -> float:
    return difflib.SequenceMatcher(None, str1, str2).ratio()


def find_most_similar_index(str_list: list[str], target_str: str) -> int:
    """Index of the string most similar to `target_str`; `>=` makes the last of equals win, as upstream."""
    most_similar_index, highest_similarity = 0, 0.0
    for i, s in enumerate(str_list):
        similarity = str_similarity(s, target_str)
        if similarity >= highest_similarity:
            most_similar_index, highest_similarity = i, similarity
    return most_similar_index


def match_choice(text: str, options: dict[str, str]) -> tuple[tuple[str, str], int]:
    """((first letter, last letter), match type 1/2/3) as `scorer.match_choice` returns them."""
    if "## Final Response\n\n" in text:  # HuatuoGPT-o1's own output format
        text = text.split("## Final Response\n\n")[-1]

    matches = list(re.finditer(r"(answer is\s*?)([A-N])", text, re.S))  # the strict prompt's phrase
    if matches:
        return (matches[0].group(2), matches[-1].group(2)), 1

    match_options = "ABCDEFGHIJKLMN"[: len(options)]
    matches = list(re.finditer(
        r"([\u4e00-\u9fff]|is |是|项|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([" + match_options + r"])(\W|[\u4e00-\u9fff]|$)",
        text, re.S))
    if matches:
        return (matches[0].group(2), matches[-1].group(2)), 1

    text = text.lower()
    opsindex = [(opt, text.rindex(options[opt].lower())) for opt in options if options[opt].lower() in text]
    if opsindex:
        ans_last = sorted(opsindex, key=lambda x: x[1], reverse=True)[0][0]
        opsindex = [(opt, text.index(options[opt].lower())) for opt in options if options[opt].lower() in text]
        ans_first = sorted(opsindex, key=lambda x: x[1], reverse=True)[0][0]
        return (ans_first, ans_last), 2
    labels = list(options)
    nearest = labels[find_most_similar_index([options[x].lower() for x in options], text.lower())]
    return (nearest, nearest), 3


def postprocess_output(pred: str) -> str:
    """evaluation/eval.py's `postprocess_output`: drop "</s>" and one leading space."""
    pred = pred.replace("</s>", "")
    return pred[1:] if pred.startswith(" ") else pred


def better_side(first_correct: int, last_correct: int) -> str:
    """`score`'s choice per benchmark: first-match accuracy when it is strictly higher, else last-match."""
    return "first" if first_correct > last_correct else "last"
