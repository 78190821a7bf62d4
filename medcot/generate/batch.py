"""Batched and streamed generation with the KV cache (HF `generate`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import torch

from medcot.config import GenerateArgs


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, EOS excluded
    finished: bool  # ended with EOS (False: hit max_new_tokens)


def _sampling_kwargs(args: GenerateArgs, tokenizer) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Decoder-only models continue from the last position, so padding goes on the left.
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], args: GenerateArgs, progress=None) -> list[Generation]:
    """Generate a completion for each tokenized prompt, `args.batch_size` at a time, with the KV cache.

    Args:
        prompts: token ids of each prompt (from `PromptFormatter.encode_prompt`).
        progress: optional callable(n_done) called after each batch.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[Generation] = []
    if args.temperature > 0:
        torch.manual_seed(args.seed)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        input_ids, mask = left_pad(batch, tokenizer.pad_token_id, device)
        seqs = model.generate(input_ids=input_ids, attention_mask=mask, use_cache=True, **_sampling_kwargs(args, tokenizer))
        for row in seqs[:, input_ids.shape[1] :].tolist():
            finished = eos in row
            row = row[: row.index(eos)] if finished else row
            out.append(Generation(tokenizer.decode(row, skip_special_tokens=True), len(row), finished))
        if progress:
            progress(len(out))
    return out


def stream(model, tokenizer, prompt: list[int], args: GenerateArgs, stop_event: threading.Event | None = None) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece as it is generated.

    Generation runs in a thread; setting `stop_event` (e.g. when a client disconnects) ends it at the
    next token.
    """
    from transformers import (
        StoppingCriteria,
        StoppingCriteriaList,
        TextIteratorStreamer,
    )

    # Our own event when the caller gave none: a consumer that stops reading (Ctrl-C, an exception)
    # must also stop the generating thread, or the interpreter aborts at exit while torch still runs in it.
    stop_event = stop_event or threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop_event.is_set()

    device = next(model.parameters()).device
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = torch.tensor([prompt], device=device)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stop()]),
        use_cache=True,
        **_sampling_kwargs(args, tokenizer),
    )
    if args.temperature > 0:
        torch.manual_seed(args.seed)
    errors: list[BaseException] = []

    def _run():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # surface generation errors in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop_event.set()
        thread.join()
    if errors:
        raise errors[0]
