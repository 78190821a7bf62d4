"""GRPO's arithmetic: group-normalised advantages, per-token log-probabilities, the clipped loss with a KL
penalty, and how token losses add up over a step. Plain tensor functions, tested one by one.

For completion i of a prompt's group of k, with reward r_i, token t, policy probability p, sampling-time
probability p_old and reference probability p_ref:

    A_i   = (r_i - mean(r)) / (std(r) + 1e-4)            (Dr. GRPO: r_i - mean(r); grpo.scale_rewards=false)
    ratio = p(t) / p_old(t)
    loss  = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps_high) * A_i) + beta * KL(t)
    KL(t) = p_ref/p - log(p_ref/p) - 1                    (the k3 estimator: unbiased, never negative)

`std` is the sample standard deviation (Bessel-corrected, as TRL's GRPOTrainer), so advantages match TRL's
for the same rewards. How the token losses of a step add up is `grpo.loss_type` (see `step_normaliser`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_EPS = 1e-4  # keeps a group with (almost) equal rewards from blowing up; equal rewards give 0 anyway


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """Each reward minus its group's mean (divided by the group's std with `scale`).

    `rewards` holds the groups one after another: completions [0, k) belong to the first prompt.
    A group whose completions all scored the same gets advantage 0: it carries no signal.
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + ADV_EPS)
    return centred.reshape(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), for each position; (B, T, V) x (B, T) -> (B, T).

    The temperature is the sampling one, so the ratio compares the distribution the completions were drawn
    from. Computed in fp32; only the chosen token's log-probability is kept, not the (T x V) log-softmax.
    """
    logits = logits.float() / temperature
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


@dataclass
class TokenLoss:
    loss: torch.Tensor  # (B, T) per-token loss, 0 where the mask is 0
    kl: torch.Tensor | None  # (B, T) per-token KL to the reference (None when beta is 0)
    clipped: torch.Tensor  # (B, T) bool: the clip changed this token's gradient


def token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
               mask: torch.Tensor, eps_low: float, eps_high: float, beta: float) -> TokenLoss:
    """The clipped surrogate plus the KL penalty, per token (see the module docstring)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    # Where the min picked the clipped term and the clip was active, that token gets no gradient.
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        kl = kl * mask
    return TokenLoss(loss=loss * mask, kl=kl, clipped=clipped & mask.bool())


def step_normaliser(loss_type: str, mask: torch.Tensor, n_completions: int, n_tokens: int,
                    max_tokens: int) -> torch.Tensor:
    """Per-completion weights w (B,) such that sum_i w_i * sum_t loss_it, summed over the micro-batches of a
    step, is the step's loss. Step-wide counts make the loss independent of how completions are grouped.

    - 'grpo': mean over each completion's tokens, then mean over the step's completions (GRPO);
    - 'dapo': mean over all the step's tokens (DAPO's token-level loss);
    - 'dr_grpo': sum over tokens / (completions x max completion tokens), a constant (Dr. GRPO).
    """
    if loss_type == "grpo":
        return 1.0 / (mask.sum(dim=1).clamp(min=1) * n_completions)
    if loss_type == "dapo":
        return torch.full((mask.shape[0],), 1.0 / max(n_tokens, 1), device=mask.device)
    if loss_type == "dr_grpo":
        return torch.full((mask.shape[0],), 1.0 / (n_completions * max_tokens), device=mask.device)
    raise ValueError(f"unknown loss_type {loss_type!r}")  # config validation lists the choices
