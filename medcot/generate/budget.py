"""Generation with a thinking budget: reason for up to N tokens, then close the reasoning and answer.

A reasoning model may think past any token limit and never state an answer. With a budget, every
completion gets an answer phase (s1's "budget forcing"): eval, the training report's before/after
answers and the server all use this one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from medcot.config import GenerateArgs
from medcot.generate.batch import generate
from medcot.generate.reasoning import THINK_CLOSE

FORCE_CLOSE = "\n" + THINK_CLOSE + "\n"  # what the thinking budget appends when the reasoning runs out


# ---------------------------------------------------------------------------------------------
# Generation with a thinking budget


@dataclass(frozen=True)
class Answer:
    text: str  # the completion after the prompt (reasoning, </think>, answer), forced tag included
    num_tokens: int  # generated tokens (the forced tag is not counted: the model did not write it)
    closed: bool  # the model wrote </think> itself
    forced: bool  # the budget ran out and "</think>" was appended before the answer was generated


def generate_answers(model, tokenizer, prompts: list[list[int]], gen: GenerateArgs, batch_size: int,
                     thinking_budget: int | None, answer_tokens: int) -> list[Answer]:
    """Generate a reasoning + answer for each prompt.

    Without a budget: one pass of `gen.max_new_tokens`. With one: reason for up to `thinking_budget`
    tokens; outputs that stopped at EOS are done. The others continue for `answer_tokens` more,
    after "\\n</think>\\n" is appended where the model had not closed its reasoning itself, so every
    item gets a chance to answer (s1's "budget forcing"). The continuation re-tokenizes the text
    generated so far; the ids can differ from the sampled ones at a token boundary, which changes
    nothing a greedy continuation depends on in practice.
    """
    if thinking_budget is None:
        outs = generate(model, tokenizer, prompts, replace(gen, batch_size=batch_size))
        return [Answer(o.text, o.num_tokens, THINK_CLOSE in o.text, False) for o in outs]
    first = generate(model, tokenizer, prompts, replace(gen, max_new_tokens=thinking_budget, batch_size=batch_size))
    answers = [Answer(o.text, o.num_tokens, THINK_CLOSE in o.text, False) for o in first]
    todo = [i for i, o in enumerate(first) if not o.finished]
    if not todo:
        return answers
    texts = [first[i].text if answers[i].closed else first[i].text + FORCE_CLOSE for i in todo]
    cont = [prompts[i] + tokenizer(t, add_special_tokens=False)["input_ids"] for i, t in zip(todo, texts)]
    second = generate(model, tokenizer, cont, replace(gen, max_new_tokens=answer_tokens, batch_size=batch_size))
    for i, text, o in zip(todo, texts, second):
        a = answers[i]
        answers[i] = Answer(text + o.text, a.num_tokens + o.num_tokens, a.closed, not a.closed)
    return answers
