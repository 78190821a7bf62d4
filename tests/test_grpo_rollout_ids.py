"""GRPO trains on the ids the engine sampled: the forced close where the engine fed it, EOS where it stopped."""

from __future__ import annotations

import pytest
import torch

from medcot.config import GenerateArgs
from medcot.generate.budget import FORCE_CLOSE, Answer, generate_answers
from medcot.rl.rollout import completion_tokens


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), tok


@pytest.mark.parametrize("forced_at, stopped", [(None, False), (None, True), (2, False), (2, True), (0, True), (4, False)])
def test_the_trained_ids_are_the_sampled_ones_with_the_forced_tag_and_eos_where_they_happened(tiny, forced_at, stopped):
    _, tok = tiny
    sampled = (101, 102, 103, 104)
    force = tok(FORCE_CLOSE, add_special_tokens=False)["input_ids"]
    ids, mask = completion_tokens(tok, Answer("x", 4, False, forced_at is not None, sampled, forced_at, stopped))
    at = len(sampled) if forced_at is None else forced_at
    expect = list(sampled[:at]) + (force if forced_at is not None else []) + list(sampled[at:])
    assert ids == expect + ([tok.eos_token_id] if stopped else [])
    assert len(mask) == len(ids)
    # only the forced tag is masked out: the policy chose every other token, EOS included
    assert [i for i, m in zip(ids, mask) if m == 0] == (force if forced_at is not None else [])
    assert sum(mask) == len(sampled) + stopped


@pytest.mark.parametrize("budget", [None, 3])
def test_generate_answers_returns_the_ids_its_text_was_decoded_from(tiny, budget):
    model, tok = tiny
    prompts = [tok("Which vitamin deficiency causes scurvy?")["input_ids"], tok("Name a beta blocker.")["input_ids"]]
    gen = GenerateArgs(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3)
    answers = generate_answers(model, tok, prompts, gen, batch_size=2, thinking_budget=budget, answer_tokens=4)
    for a in answers:
        assert len(a.token_ids) == a.num_tokens > 0
        at = a.forced_at
        if at is None:
            assert not a.forced and a.text == tok.decode(list(a.token_ids), skip_special_tokens=True)
        else:  # the text is the sampled ids decoded around the forced close, exactly where it was fed
            assert a.forced and 0 <= at <= len(a.token_ids)
            assert a.text == (tok.decode(list(a.token_ids[:at]), skip_special_tokens=True) + FORCE_CLOSE
                              + tok.decode(list(a.token_ids[at:]), skip_special_tokens=True))
        # one that did not stop by itself ran to its limit: max_new_tokens, budget + answer, or the answer's
        # tokens after the forced close
        limit = 8 if budget is None else (a.forced_at + 4 if a.forced else budget + 4)
        assert a.stopped or a.num_tokens == limit
