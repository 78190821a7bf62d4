"""Generation with a thinking budget: reason for up to N tokens, then close the reasoning and answer.

A reasoning model may think past any token limit and never state an answer. With a budget, every
completion gets an answer phase (s1's "budget forcing"): eval, the training report's before/after
answers and the server all use this one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medcot.config import GenerateArgs
from medcot.generate.batch import completion_text, run_requests, sampling_params
from medcot.generate.reasoning import FORCE_CLOSE, THINK_CLOSE

__all__ = ["FORCE_CLOSE", "Answer", "generate_answers"]


# ---------------------------------------------------------------------------------------------
# Generation with a thinking budget


@dataclass(frozen=True)
class Answer:
    text: str  # the completion after the prompt (reasoning, </think>, answer), forced tag included
    num_tokens: int  # generated tokens (the forced tag is not counted: the model did not write it)
    closed: bool  # the model wrote </think> itself
    forced: bool  # the budget ran out and "</think>" was appended before the answer was generated
    token_ids: tuple[int, ...] = ()  # the sampled ids, EOS and the forced tag's ids excluded
    forced_at: int | None = None  # where among token_ids the forced tag's ids were fed
    stopped: bool = False  # ended on EOS (or a stop string), not on a token limit


def generate_answers(model, tokenizer, prompts: list[list[int]], gen: GenerateArgs, batch_size: int,
                     thinking_budget: int | None, answer_tokens: int,
                     on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
    """Generate a reasoning + answer for each prompt.

    Without a budget: one pass of `gen.max_new_tokens`. With one, the engine's rule (the server's too): the
    reasoning gets up to `thinking_budget` tokens; where it runs out, or ends in EOS before `</think>`,
    "\\n</think>\\n" is fed to the model and up to `answer_tokens` more are generated, so every item gets a
    chance to answer (s1's "budget forcing"). A model that closes its reasoning itself gets `thinking_budget +
    answer_tokens` tokens in all. The continuation is the same token stream (no re-tokenization).
    `on_answer(index, answer)` is called for each prompt as soon as its answer is complete.
    """
    if thinking_budget is None:
        params = [sampling_params(gen, i) for i in range(len(prompts))]
    else:
        params = [sampling_params(gen, i, max_tokens=thinking_budget + answer_tokens, thinking_budget=thinking_budget,
                                  answer_tokens=answer_tokens) for i in range(len(prompts))]
    answers: list[Answer | None] = [None] * len(prompts)

    def done(i: int, r) -> None:
        text, forced = completion_text(tokenizer, r), r.result.forced_close
        answers[i] = Answer(text, r.result.completion_tokens, not forced and THINK_CLOSE in text, forced,
                            tuple(r.token_ids), r.forced_at, r.result.finish_reason == "stop")
        if on_answer is not None:
            on_answer(i, answers[i])

    run_requests(model, tokenizer, prompts, params, batch_size, on_done=done)
    return answers
