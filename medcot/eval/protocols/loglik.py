"""lm-evaluation-harness-style scoring: the log-likelihood of each option's label, no generation.

Followed: EleutherAI/lm-evaluation-harness @ 4e7e0d47f33bc71070c1d38394bafbb52b117163, the
`multiple_choice` output type (`acc`): the context is the task's prompt ("Question: ...\\nA. ...\\n
Answer:", per benchmark in each task's `lm_eval_request`), each choice is its label after a space
(" A", " B", ...; " yes" / " no" / " maybe" for PubMedQA), and the answer is the choice whose tokens
have the highest summed log-probability. Tokenization as lm-eval's `_encode_pair` (lm_eval/api/model.py):
trailing spaces of the context move into the continuation, the context is encoded alone and the
continuation is what the whole string adds after it, with the tokenizer's own special tokens (HFLM's
default). Zero-shot, as the Open Medical-LLM leaderboard runs these tasks.

Fast (one forward pass per option, no decoding) and the right measure for base models that do not
follow instructions; a reasoning model's chain of thought plays no part in it.
"""

from __future__ import annotations

import torch

from medcot.eval.protocols.base import Protocol

SOURCE = ("EleutherAI/lm-evaluation-harness @ 4e7e0d4, multiple_choice acc: lm_eval/tasks/{medqa,medmcqa,pubmedqa,"
          "mmlu/default,gpqa/zeroshot,leaderboard/mmlu_pro}, zero-shot")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: (context ids, continuation ids)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def option_logliks(model, tokenizer, requests: list[tuple[str, list[str]]], batch_size: int) -> list[list[float]]:
    """Summed log-probability of each continuation given its context, for every (context, continuations)."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    seqs = []  # (request, choice, model input, number of continuation tokens)
    for r, (context, continuations) in enumerate(requests):
        for c, cont in enumerate(continuations):
            ctx, cont_ids = encode_pair(tokenizer, context, cont)
            seqs.append((r, c, (ctx + cont_ids)[:-1][-limit:], len(cont_ids), cont_ids))
    out = [[0.0] * len(conts) for _, conts in requests]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][2]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        batch = [seqs[i] for i in order[start : start + batch_size]]
        ids, mask = _left_pad([s[2] for s in batch], tokenizer.pad_token_id or 0, device)
        # Left padding puts every continuation at the end of its row; positions count real tokens only.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(s[3] for s in batch)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        for row, (r, c, _, n, cont_ids) in enumerate(batch):
            target = torch.tensor(cont_ids, device=device)
            out[r][c] = logprobs[row, keep - n :].gather(-1, target[:, None]).sum().item()
    return out


class LoglikProtocol(Protocol):
    name = "loglik"
    title = "loglik: log-likelihood of each option's label after lm-eval's prompt (no generation)"
    source = SOURCE
    generative = False

    def settings(self, cfg):
        return {}

    def answer(self, model, tokenizer, formatter, task, items, cfg, tag, on_record=None):
        requests = [task.lm_eval_request(it) for it in items]
        scores = option_logliks(model, tokenizer, [(ctx, list(conts.values())) for ctx, conts in requests],
                                cfg.eval.batch_size)
        records = []
        for it, (context, conts), ll in zip(items, requests, scores):
            by_label = dict(zip(conts, ll))
            best = max(by_label, key=by_label.get)
            records.append({
                "model": tag, "benchmark": task.name, "id": it.id, "answer": it.answer, "extracted": best,
                "method": "loglik", "correct": best == it.answer, "num_tokens": 0, "closed": False, "forced": 0,
                "loglik": {k: round(v, 4) for k, v in by_label.items()}, "prompt": context, "output": "",
            })
            if on_record is not None:
                on_record(records[-1])
        return records
