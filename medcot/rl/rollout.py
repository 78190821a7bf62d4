"""Rollouts: sample completions through medcot's generation functions, score them, and turn them into the
tensors of the update.

Prompts are eval's (the `medcot` protocol's `prompt`), and completions come from
`medcot.generate.budget.generate_answers`, the function eval answers with: reasoning up to
`grpo.thinking_budget` tokens, then `</think>` forced where the model had not closed it, then the answer.
So a training completion is what eval would have scored, and it is scored by eval's verdict (rl/rewards.py).

The update trains on the ids the engine sampled (`Answer.token_ids`), not on the text tokenized again (which
can merge token boundaries differently and so score tokens nobody sampled), with the forced "\\n</think>\\n"
ids where the engine fed them, masked out of the loss (the model did not choose them), and EOS where the
completion stopped by itself.

The update's micro-batches are SFT's (medcot/data/collate.py `micro_batches`): where the trainer packs
(`Trainer.packing`, the fast path), as many prompt + completion sequences as fit in `train.micro_batch_tokens`
concatenated into one (`pack_rollouts`), attention running row by row; otherwise `train.per_device_batch_size`
padded rows (`collate`). `completion_logprobs` reads either and returns the same (B, C) log-probabilities.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint

from medcot.config import GenerateArgs, GrpoArgs
from medcot.eval.tasks import Item, Task
from medcot.generate.budget import Answer, generate_answers
from medcot.generate.reasoning import force_close_ids
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

    @property
    def input_ids(self) -> list[int]:
        """The sequence the update runs: the prompt, then the completion (what `micro_batches` counts)."""
        return self.prompt_ids + self.completion_ids


def completion_limit(g: GrpoArgs, gen: GenerateArgs) -> int:
    """The most tokens a completion can have: reasoning budget + answer, or one pass of max_new_tokens."""
    return g.thinking_budget + g.answer_tokens if g.thinking_budget is not None else gen.max_new_tokens


def completion_tokens(tokenizer, answer: Answer) -> tuple[list[int], list[int]]:
    """The ids a completion is trained on, and which of them the policy chose (the forced tag: 0).

    Exactly the ids the engine sampled, with the forced "\\n</think>\\n" ids where the engine fed them and EOS
    where the completion stopped by itself, so the update scores the very tokens that were sampled.
    """
    ids, at = list(answer.token_ids), answer.forced_at
    parts = [(ids, 1)] if at is None else [(ids[:at], 1), (force_close_ids(tokenizer), 0), (ids[at:], 1)]
    if answer.stopped:  # it chose to stop (EOS); a completion cut by its token limit has no end to train on
        parts.append(([tokenizer.eos_token_id], 1))
    return [i for part, _ in parts for i in part], [m for part, m in parts for _ in part]


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
        ids, mask = completion_tokens(tokenizer, a)
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


def pack_rollouts(rollouts: list[Rollout], device) -> dict:
    """One micro-batch, padding-free: every rollout's prompt + completion concatenated into a (1, T) sequence,
    positions restarting at 0 for each, `row_bounds` the rows' offsets as `pack_collate` makes them (attention
    runs row by row at them: `fast.use_packed_attention`).

    What the loss reads keeps `collate`'s (B, C) layout (`completion_ids`, `mask`, `advantages`), so the rest of
    the update is the same for both. The N real completion tokens, row by row, are tied to the packed sequence by
    `predictors` (N,), the positions whose hidden states predict them (token j is predicted at j - 1, inside its
    own row: a prompt is never empty), and to the (B, C) layout by `slots` (N,), their flat index in it.
    """
    n = len(rollouts)
    c_len = max(max(len(r.completion_ids) for r in rollouts), 1)
    input_ids, positions, bounds, predictors, slots = [], [], [0], [], []
    completion_ids = torch.zeros((n, c_len), dtype=torch.long)  # padding columns: any token, the mask drops them
    mask = torch.zeros((n, c_len), dtype=torch.float32)
    for i, r in enumerate(rollouts):
        start, p, c = bounds[-1], len(r.prompt_ids), len(r.completion_ids)
        input_ids += r.input_ids
        positions += range(p + c)
        bounds.append(start + p + c)
        predictors += range(start + p - 1, start + p + c - 1)
        slots += range(i * c_len, i * c_len + c)
        completion_ids[i, :c] = torch.tensor(r.completion_ids, dtype=torch.long)
        mask[i, :c] = torch.tensor(r.policy_mask, dtype=torch.float32)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = {"input_ids": as_long([input_ids]), "position_ids": as_long([positions]),
             "predictors": as_long(predictors), "slots": as_long(slots), "completion_ids": completion_ids,
             "mask": mask, "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)}
    # row_bounds stays a Python list: the packed attention slices at these offsets without a GPU sync.
    return {**{k: v.to(device) for k, v in batch.items()}, "row_bounds": bounds}


# Positions whose vocabulary logits exist at once in the update. At a 128k vocabulary one chunk's fp32 logits are
# 512 x 128,256 x 4 B = 0.24 GiB, and the forward + backward of a chunk peaks at about 4 such copies (1 GiB),
# against ~8 GiB for a whole 8 x 512-token micro-batch's logits. A 512-row lm_head matmul still runs at full speed.
LOGIT_CHUNK_TOKENS = 512

# Config fields with which a model's forward changes the logits after `lm_head` (Gemma 2/3's tanh soft-capping,
# Cohere's `logit_scale`, Granite/MiniCPM's `logits_scaling`, Falcon-H1's `lm_head_multiplier`, ...): the
# chunked path applies the plain `lm_head` only, so these models take the full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                     "output_multiplier")


def _head_and_decoder(model):
    """(lm_head, decoder) of the causal LM inside `model` (PEFT and/or DDP wrapped), or None when the logits
    are not just `lm_head(decoder output)` or the model does not say where those are."""
    lm = getattr(model, "module", model)  # DDP keeps the model in .module
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # PEFT: the *ForCausalLM, LoRA injected
    if not (hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")):
        return None
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if any(getattr(config, name, None) is not None for name in _LOGIT_TRANSFORMS):
        return None
    head, decoder = lm.get_output_embeddings(), lm.get_decoder()
    if head is None or decoder is None or decoder is lm:
        return None
    return head, decoder


def packable(model) -> bool:
    """Whether the update may pack `model`'s micro-batches: only the chunked path below reads a packed batch
    (the full-logits one keeps the last positions of padded rows)."""
    return _head_and_decoder(model) is not None


def completion_logprobs(model, batch: dict, temperature: float, autocast,
                        chunk_tokens: int = LOGIT_CHUNK_TOKENS) -> torch.Tensor:
    """log p of each completion token under `model` (B, C); the padding columns hold values the mask drops.

    `batch` is padded (`collate`) or packed (`pack_rollouts`, for a `packable` model only). The (B, C, vocab)
    logits never exist at once, in forward or backward: the model runs to its last hidden states, then
    `chunk_tokens` completion positions at a time go through lm_head -> fp32 -> log-softmax at the chosen token,
    each chunk under activation checkpointing, so backward recomputes one chunk's logits at a time and only the
    log-probabilities are kept.
    """
    n, c_len = batch["completion_ids"].shape
    packed = "row_bounds" in batch
    if packed:  # no attention mask: attention stops at row_bounds
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                  "row_bounds": batch["row_bounds"], "use_cache": False}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "position_ids": batch["position_ids"], "use_cache": False}
    parts = _head_and_decoder(model)
    if parts is None:  # the model's forward does more to the logits than lm_head: take them whole
        if packed:
            raise ValueError("a packed batch needs a model whose logits are lm_head(decoder output) (`packable`)")
        with autocast:
            logits = model(**inputs, logits_to_keep=c_len + 1).logits
        # The logit at position j predicts token j + 1: the last c_len + 1 positions predict the completion's c_len.
        return token_logprobs(logits[:, :-1], batch["completion_ids"], temperature)

    head, decoder = parts
    captured = []
    # The decoder's output is taken by a hook while `model` itself runs forward, rather than by calling the
    # decoder directly: whatever wraps the model runs as in the full-logits path (PEFT's forward; DDP's, without
    # which its gradients would silently not be all-reduced). logits_to_keep=1 makes the model's own lm_head
    # cost one position per row (0 would mean all of them).
    hook = decoder.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    try:
        with autocast:
            model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    if packed:  # only the real completion tokens, no padding: (N, H) and (N,)
        hidden = captured[-1][0, batch["predictors"]]
        tokens = batch["completion_ids"].reshape(-1)[batch["slots"]]
    else:  # position j predicts token j + 1, as in the full-logits path
        hidden = captured[-1][:, -(c_len + 1) : -1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        tokens = batch["completion_ids"].reshape(-1)

    def chunk_logprobs(h, t):
        return token_logprobs(head(h), t, temperature)

    out = []
    with autocast:  # the lm_head matmul under the same autocast as the decoder, as in the model's forward
        for h, t in zip(hidden.split(chunk_tokens), tokens.split(chunk_tokens)):
            if torch.is_grad_enabled():
                # Non-reentrant checkpointing keeps only the chunk's inputs and recomputes its logits (under the
                # autocast and RNG state it recorded: a LoRA dropout on lm_head) when backward reaches it.
                out.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False))
            else:  # reference / no-grad passes: nothing is kept for backward anyway
                out.append(chunk_logprobs(h, t))
    flat = torch.cat(out)
    if packed:  # into the (B, C) layout of the loss; the padding columns stay 0
        return flat.new_zeros(n * c_len).index_copy(0, batch["slots"], flat).view(n, c_len)
    return flat.view(n, c_len)
