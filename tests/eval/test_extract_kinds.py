"""Answer extraction by kind of output: the failure kinds of issue 16, several cases each.

Each case is (answer text after `</think>`, expected label); None means unparseable. The held-out set
(tests/eval/heldout_extraction.jsonl, test_extract_heldout.py) is checked apart and never tuned on.
"""

import pytest

from medcot.eval.extract import extract_choice, extract_yes_no

OPTS = {"A": "Ceftriaxone", "B": "Doxycycline", "C": "Azithromycin", "D": "Vancomycin"}
TEN = {k: f"Finding number {i}" for i, k in enumerate("ABCDEFGHIJ")}
THINK = "The rash, the tick bite and the season point to early Lyme disease.\n</think>\n\n"


def choice(answer: str, options=OPTS):
    return extract_choice(THINK + answer, options)


def yes_no(answer: str):
    return extract_yes_no("The cohort was small and the follow-up short.\n</think>\n\n" + answer)


def check(got, expected):
    assert got.label == expected, got
    assert (got.label is None) == (got.method == "none" or got.method.endswith(":conflict")), got


SEVERAL = [
    "The answer is B and C.",
    "The answer is A or D.",
    "Answer: A, C and D",
    "The answers are B and D.",
    "Correct options: B, C.",
    "The correct answer is either A or B.",
    "Final answer: (B) and (D)",
    "\\boxed{B, C}",
    "The answer is B (doxycycline) or C (azithromycin).",
    "答案是B和C。",
    "B and C are both correct.",
    "I'd go with B or C.",
    "The answer could be A or C.",
    "Answer: B/C",
    "The correct answers are A & D.",
    "Options B and C are correct.",
    "答案：B、C",
    "So B or C.",
]


@pytest.mark.parametrize("answer", SEVERAL)
def test_several_letters_stated_as_the_answer_are_unparseable(answer):
    check(choice(answer), None)


@pytest.mark.parametrize("answer,expected", [
    ("The answer is B, not C.", "B"),
    ("The answer is B and not D, since the patient is a child over 8.", "B"),
    ("Both A and C were considered, but the answer is B.", "B"),
    ("The answer is B. Doxycycline and azithromycin both cover it, but the former is first-line.", "B"),
])
def test_one_answer_among_other_letters_is_no_list(answer, expected):
    check(choice(answer), expected)


REVISED = [
    ("The answer is A. Wait, actually, oral therapy is enough here, so it's B.", "B"),
    ("Answer: C\n\nHmm, on second thought, azithromycin is second-line. Final answer: B", "B"),
    ("The answer is D. No wait, vancomycin has no role here. The answer is B.", "B"),
    ("So the answer is C. Actually, let me reconsider: doxycycline is preferred. The answer is B.", "B"),
    ("Final answer: A.\n\nCorrection: the answer is B.", "B"),
    ("The answer is yes... I mean, the answer is B.", "B"),
    ("The answer is A or B. Actually, it's B.", "B"),
    ("答案是C。不对，应该是B。", "B"),
    ("The answer is A. Hmm, no \u2014 it's B.", "B"),
    ("I'll go with C... Actually, B is better. Final answer: B", "B"),
    ("**Answer: D**\n\nWait, I need to re-check the allergy. The correct answer is **B**.", "B"),
]


@pytest.mark.parametrize("answer,expected", REVISED)
def test_a_revised_answer_counts_its_last_statement(answer, expected):
    check(choice(answer), expected)


@pytest.mark.parametrize("answer", [
    "The answer is A.\n\nThe answer is B.",  # two statements and nothing that revises the first
    "The answer is A. Ceftriaxone\n\nThe answer is B. Doxycycline\n\nThe answer is C. Azithromycin",
    "Answer: B\nAnswer: D",
])
def test_two_different_answers_without_a_revision_conflict(answer):
    check(choice(answer), None)


MARKERS = [
    # lower-case and abbreviated
    ("answer: b", "B"), ("ans: b", "B"), ("Ans. B", "B"), ("final ans - b", "B"), ("the answer is b.", "B"),
    ("ANS: B", "B"),
    # quoted letters
    ("The answer is 'B'.", "B"), ('Answer: "B"', "B"), ("The correct option is \u201cB\u201d.", "B"),
    ("I pick \u2018B\u2019.", "B"), ("'B'", "B"),
    # dashes as separators
    ("**Answer \u2014 B**", "B"), ("Answer\u2014B", "B"), ("Answer \u2013 B (doxycycline)", "B"),
    ("Correct option \u2014 B", "B"), ("Final answer -> B", "B"),
    # LaTeX wrappers
    ("\\boxed{\\mathbf{B}}", "B"), ("$\\boxed{\\text{B}}$", "B"), ("\\[\\boxed{\\textbf{B}}\\]", "B"),
    ("\\(\\boxed{\\mathrm{B}}\\)", "B"), ("$$\\boxed{(B)}$$", "B"), ("\\boxed{\\text{(B) Doxycycline}}", "B"),
    ("\\boxed{B\\text{: Doxycycline}}", "B"), ("The final answer is $\\boxed{B}$.", "B"),
    ("\\fbox{B}", "B"), ("$\\mathbf{Answer: B}$", "B"),
    # answer tags
    ("<answer>B</answer>", "B"), ("<answer> (B) </answer>", "B"), ("<answer>\nB. Doxycycline\n</answer>", "B"),
    ("<ANSWER>b</ANSWER>", "B"),
    # a final clause
    ("Oral doxycycline covers Borrelia, so B.", "B"),
    ("The erythema migrans needs oral treatment; therefore, B.", "B"),
    ("No neurological signs, hence B.", "B"),
    ("Thus B.", "B"),
    ("Given the age of the patient, it's B.", "B"),
    ("That leaves B.", "B"),
    # negation, then the choice
    ("Not A; it's B.", "B"),
    ("It isn't C, it's B.", "B"),
    ("Not D but B.", "B"),
    ("The answer is not C but rather B.", "B"),
    ("Rather than A, it must be B.", "B"),
    # Chinese markers
    ("答案：B", "B"), ("答案: B", "B"), ("正确答案是 **B**", "B"), ("答案是B。", "B"), ("最终答案为B", "B"),
    ("因此，正确选项是B。", "B"), ("故选B。", "B"), ("不是A，而是B。", "B"), ("答案：（B）", "B"),
    ("答案：Ｂ", "B"),
    # more of the ordinary ones
    ("Answer: Option B", "B"), ("The answer is option (b)", "B"), ("Final Answer: B. Doxycycline", "B"),
    ("**Final Answer:** \\boxed{B}", "B"), ("The answer is: B", "B"), ("Answer is B", "B"), ("answer = B", "B"),
    ("Correct Answer: (B)", "B"), ("My final answer is B.", "B"), ("The most likely answer is B.", "B"),
    ("The right choice here is B.", "B"), ("The correct answer here is B.", "B"), ("**B** is correct.", "B"),
    ("B is the answer.", "B"), ("The answer is **B: Doxycycline**", "B"), ("Answer: 'b'", "B"),
    ("**Answer**\u2014B", "B"), ("\\boxed{\\textbf{B. Doxycycline}}", "B"), ("\\textbf{B}", "B"),
    ("<Answer>B</Answer>", "B"), ("It is early disease, so the answer is B.", "B"), ("Oral therapy suffices; hence option B.", "B"),
    ("Oral therapy suffices, thus (B).", "B"), ("Therefore, choose B.", "B"), ("It's not A. It's B.", "B"),
    ("A is incorrect; B is correct.", "B"), ("答案为：B", "B"), ("选B", "B"), ("正确答案：B", "B"),
    ("答案是 B. 多西环素", "B"), ("所以选择B", "B"), ("本题选B。", "B"), ("答案应该是B", "B"), ("B项正确。", "B"),
    ("选项B正确。", "B"), ("The answer could be B.", "B"),
]


@pytest.mark.parametrize("answer,expected", MARKERS)
def test_answer_markers(answer, expected):
    check(choice(answer), expected)


@pytest.mark.parametrize("answer,expected", [
    ("The answer is (J).", "J"), ("Answer: I", "I"), ("I think the answer is I.", "I"),
    ("I would say H is correct.", "H"), ("I'm going with G.", "G"), ("\\boxed{E}", "E"),
    ("answer: f", "F"), ("I believe (I) fits best.", "I"), ("I am not sure, but the answer is J.", "J"),
])
def test_ten_options_and_the_pronoun_i(answer, expected):
    check(choice(answer, TEN), expected)


@pytest.mark.parametrize("answer", [
    "The answer is a beta-lactam.",  # the article, not the letter
    "I think so.",  # the pronoun, not option I
    "So A, B and D are ruled out.",  # letters ruled out are no answer
    "Options C and D are wrong.",
    "The answer is E.",  # not one of the options
    "Answer: it depends on the allergy history.",
    "\\boxed{}",
    "<answer></answer>",
])
def test_what_is_not_an_answer(answer):
    check(choice(answer), None)


@pytest.mark.parametrize("output,expected", [
    # HuatuoGPT-o1 writes "## Thinking" ... "## Final Response" instead of <think> tags
    ("## Thinking\n\nThe answer is A? No.\n\n## Final Response\n\nThe answer is B.", "B"),
    ("## Thinking\n\nLyme disease.\n\n## Final Response\n\nDoxycycline (B) is first-line.", "B"),
    # unfinished reasoning: only a stated answer counts, and a stated list is none
    ("Let me weigh B against C. So the answer is B or C. Hmm", None),
    ("So the answer is C. Wait, actually, doxycycline. The answer is B. Let me verify", "B"),
])
def test_regions(output, expected):
    check(extract_choice(output, OPTS), expected)


PUBMEDQA = [
    # "No" as a determiner is no answer
    ("No definitive conclusion can be drawn from this trial.", "maybe"),
    ("No significant difference was found in the primary outcome.", None),
    ("No clear association emerged; the answer is maybe.", "maybe"),
    ("No adverse events occurred, and survival improved. The answer is yes.", "yes"),
    ("No firm conclusion is possible, but the trend favours benefit: yes.", "yes"),
    ("No differences were observed. So, no.", "no"),
    # "No" as the answer
    ("No, the screening did not reduce mortality.", "no"), ("No. The effect vanished after adjustment.", "no"),
    ("No \u2014 the association was confounded.", "no"), ("**No**", "no"),
    # markers, as for letters
    ("answer: YES", "yes"), ("ans: maybe", "maybe"), ("Answer \u2014 no", "no"), ("\\boxed{\\text{Yes}}", "yes"),
    ("$\\boxed{\\mathbf{maybe}}$", "maybe"), ("<answer>no</answer>", "no"), ("The answer is 'yes'.", "yes"),
    ("The evidence is consistent across subgroups, so yes.", "yes"), ("答案：否", "no"), ("答案是：是", "yes"),
    ("答案：maybe", "maybe"),
    # revised, several
    ("The answer is no. Wait, actually the adjusted model was significant, so the answer is yes.", "yes"),
    ("Answer: maybe\n\nOn reflection, the effect is consistent. Final answer: yes", "yes"),
    ("The answer is yes or no depending on the subgroup.", None),
    ("The answer is yes and maybe.", None),
    ("The answer is yes.\n\nThe answer is no.", None),
    ("Final Answer: Yes", "yes"), ("**Answer: No.**", "no"), ("The answer is: maybe", "maybe"),
    ("Based on the study, the answer to the question is yes", "yes"), ("The answer would be no.", "no"),
    ("Answer: Maybe (the evidence is mixed).", "maybe"), ("我认为答案是否。", "no"), ("答案：不确定", "maybe"),
    ("No strong evidence supports it. The answer is no.", "no"), ("The answer is not clear from this abstract.", "maybe"),
    ("There is no evidence either way in this small sample.", None),
]


@pytest.mark.parametrize("answer,expected", PUBMEDQA)
def test_yes_no_maybe(answer, expected):
    check(yes_no(answer), expected)
