"""Rollouts: sample completions through medcot's generation functions, score them, and turn them into the
tensors of the update.

Prompts are eval's (the `medcot` protocol's `prompt`), and completions come from
`medcot.generate.budget.generate_answers`, the function eval answers with: reasoning up to
`grpo.thinking_budget` tokens, then `</think>` forced where the model had not closed it, then the answer.
So a training completion is what eval would have scored, and it is scored by eval's verdict (rl/rewards.py).

`generate_answers` returns text, not token ids, so a completion is tokenized again to train on it: the
reasoning, the forced "\\n</think>\\n" and the answer each on their own, as the engine feeds them. Where a
token boundary merges differently the ids can differ from the sampled ones; the policy, the sampling-time
log-probabilities and the reference are all computed on these same ids, so ratio and KL stay consistent.
The forced tag is masked out of the loss: the model did not choose it. EOS is trained on where the text
shows the completion stopped by itself: unforced and shorter than its limit (for a forced completion the
text cannot tell EOS from the answer's token limit, so its end is left untrained).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from medcot.config import GenerateArgs, GrpoArgs
from medcot.eval.tasks import Item, Task
from medcot.generate.budget import FORCE_CLOSE, Answer, generate_answers
from medcot.rl.algorithm import token_logprobs
from medcot.rl.rewards import EVAL_PROTOCOL, Scored, score


@dataclass
class Rollout:
    item: Item
    prompt_ids: list[int]
    completion_ids: list[int]
    policy_mask: list[int]  # 1 where the policy chose the token; 0 for the forced "</think>" tag
    text: str
    num_tokens: int  # generated tokens as the generator counted them (the forced tag excluded)
    scored: Scored
    advantage: float = 0.0


def completion_limit(g: GrpoArgs, gen: GenerateArgs) -> int:
    """The most tokens a completion can have: reasoning budget + answer, or one pass of max_new_tokens."""
    return g.thinking_budget + g.answer_tokens if g.thinking_budget is not None else gen.max_new_tokens


def completion_tokens(tokenizer, answer: Answer, limit: int) -> tuple[list[int], list[int]]:
    """The ids a completion is trained on, and which of them the policy chose (the forced tag: 0)."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    if answer.forced:  # the model never wrote </think> itself, so the first FORCE_CLOSE is the forced one
        reasoning, rest = answer.text.split(FORCE_CLOSE, 1)
        parts = [(enc(reasoning), 1), (enc(FORCE_CLOSE), 0), (enc(rest), 1)]
    else:
        parts = [(enc(answer.text), 1)]
    # Unforced generation stops at EOS or at the limit: fewer tokens than the limit means it chose to stop.
    if not answer.forced and answer.num_tokens < limit:
        parts.append(([tokenizer.eos_token_id], 1))
    return [i for ids, _ in parts for i in ids], [m for ids, m in parts for _ in ids]


@contextlib.contextmanager
def generating(model):
    """Eval mode and the KV cache for generation; training mode (no cache) restored after."""
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


def sample(model, tokenizer, formatter, task: Task, items: list[Item], copies: int, gen: GenerateArgs,
           g: GrpoArgs) -> list[Rollout]:
    """`copies` completions of each item (consecutive: one group per item), scored.

    `gen` sets temperature, top_p, seed and batch size; `grpo.thinking_budget` / `answer_tokens` the lengths.
    """
    prompts = [EVAL_PROTOCOL.prompt(tokenizer, formatter, task, it)[1] for it in items]
    limit = completion_limit(g, gen)
    with generating(model):
        answers = generate_answers(model, tokenizer, [p for p in prompts for _ in range(copies)], gen,
                                   gen.batch_size, g.thinking_budget, g.answer_tokens)
    out = []
    for i, a in enumerate(answers):
        item, prompt = items[i // copies], prompts[i // copies]
        ids, mask = completion_tokens(tokenizer, a, limit)
        out.append(Rollout(item=item, prompt_ids=prompt, completion_ids=ids, policy_mask=mask, text=a.text,
                           num_tokens=a.num_tokens, scored=score(a.text, a.num_tokens, a.closed, item, task, g, limit)))
    return out


def rollout_args(gen: GenerateArgs, g: GrpoArgs, seed: int) -> GenerateArgs:
    """Sampling settings of the training completions; the seed makes a step's completions reproducible."""
    return replace(gen, temperature=g.temperature, top_p=g.top_p, seed=seed)


def collate(rollouts: list[Rollout], pad_id: int, device) -> dict[str, torch.Tensor]:
    """One micro-batch: prompts left-padded and completions right-padded, so every completion starts at the same
    column and only the completion logits are computed (`logits_to_keep`). Position ids count real tokens only,
    so padding changes no position.
    """
    p_len = max(len(r.prompt_ids) for r in rollouts)
    c_len = max(max(len(r.completion_ids) for r in rollouts), 1)
    n = len(rollouts)
    input_ids = torch.full((n, p_len + c_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + c_len), dtype=torch.long)
    mask = torch.zeros((n, c_len), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        input_ids[i, p_len - p : p_len] = torch.tensor(r.prompt_ids)
        input_ids[i, p_len : p_len + c] = torch.tensor(r.completion_ids, dtype=torch.long)
        attention[i, p_len - p : p_len + c] = 1
        mask[i, :c] = torch.tensor(r.policy_mask, dtype=torch.float32)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions,
             "completion_ids": input_ids[:, p_len:], "mask": mask,
             "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)}
    return {k: v.to(device) for k, v in batch.items()}


def completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, autocast) -> torch.Tensor:
    """log p of each completion token under `model` (B, C); the padding columns hold values the mask drops."""
    c_len = batch["completion_ids"].shape[1]
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=c_len + 1, use_cache=False).logits
    # The logit at position j predicts token j + 1: the last c_len + 1 positions predict the completion's c_len.
    return token_logprobs(logits[:, :-1], batch["completion_ids"], temperature)
