"""Batched and streamed generation: `generate` (eval, the training report) and `stream` (`medcot ask`), both
run by the one engine (`medcot.generate.engine`) in the caller's thread."""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from medcot.config import GenerateArgs
from medcot.generate.engine import Engine, Event, Request, SamplingParams
from medcot.generate.reasoning import FORCE_CLOSE


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int  # generated tokens, EOS excluded
    finished: bool  # ended with EOS (False: hit max_new_tokens)


def sampling_params(args: GenerateArgs, index: int = 0, **extra) -> SamplingParams:
    """The engine's parameters for prompt number `index` of a `generate.*` run (a seed of its own per prompt)."""
    sampled = args.temperature > 0
    return SamplingParams(max_tokens=extra.pop("max_tokens", args.max_new_tokens), temperature=args.temperature,
                          top_p=args.top_p if sampled else 1.0,
                          seed=(args.seed * 1_000_003 + index) % 2**63 if sampled else None, **extra)


def engine_for(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int) -> Engine:
    """An engine sized for these prompts (KV-cache slots of the longest prompt + max_tokens)."""
    return Engine(model, tokenizer, max_batch_size=batch_size, max_queue=0, request_timeout_s=math.inf,
                  max_len=max((len(p) for p in prompts), default=1) + max_tokens + 8)


def completion_text(tokenizer, request: Request) -> str:
    """The text of a finished request, decoded from its ids at once (as `tokenizer.decode` would), with the
    forced close where the thinking budget put it."""
    ids, at = request.token_ids, request.forced_at
    if at is None:
        return tokenizer.decode(ids, skip_special_tokens=True)
    return (tokenizer.decode(ids[:at], skip_special_tokens=True) + FORCE_CLOSE
            + tokenizer.decode(ids[at:], skip_special_tokens=True))


@contextlib.contextmanager
def full_weights(model) -> Iterator[None]:
    """Gather FSDP2-sharded weights for the duration of a generation (every process takes part).

    FSDP2 gathers a layer's weights in that layer's forward hooks, but the engine calls the layers' parts
    directly, so the hooks never run: without this it would multiply by shards (DTensors).
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def run_requests(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams], batch_size: int,
                 progress=None, on_done: Callable[[int, Request], None] | None = None) -> list[Request]:
    """Run every prompt to its end with continuous batching (`batch_size` at a time); raises the first error.

    `progress(n_done)` is called as requests finish, and `on_done(index, request)` for each request that
    finished without an error, as it finishes (eval stores an item's answer then, not at the end).
    """
    requests = [Request(ids, p) for ids, p in zip(prompts, params)]
    pending = dict(enumerate(requests))

    def finished(n: int) -> None:
        if on_done is not None:
            for i in [i for i, r in pending.items() if r.result is not None]:
                r = pending.pop(i)
                if r.result.kind == "done":
                    on_done(i, r)
        if progress is not None:
            progress(n)

    with full_weights(model):
        engine = engine_for(model, tokenizer, prompts, max((p.max_tokens for p in params), default=1), batch_size)
        engine.run(requests, finished)
    for r in requests:
        if r.result is None or r.result.kind == "error":
            raise r.result.error if r.result is not None else RuntimeError("generation did not finish")
    return requests


def generate(model, tokenizer, prompts: list[list[int]], args: GenerateArgs, progress=None) -> list[Generation]:
    """Generate a completion for each tokenized prompt, `args.batch_size` at a time (continuous batching).

    Args:
        prompts: token ids of each prompt (from `PromptFormatter.encode_prompt`).
        progress: optional callable(n_done) called as completions finish.
    """
    if not prompts:
        return []
    params = [sampling_params(args, i) for i in range(len(prompts))]
    requests = run_requests(model, tokenizer, prompts, params, args.batch_size, progress)
    return [Generation(completion_text(tokenizer, r), r.result.completion_tokens, r.result.finish_reason == "stop")
            for r in requests]


def stream(model, tokenizer, prompt: list[int], args: GenerateArgs,
           stop_event: threading.Event | None = None) -> Generator[str, None, Generation]:
    """Yield the completion of one prompt piece by piece as it is generated.

    Setting `stop_event` (e.g. Ctrl-C handling, a client that went away) ends it at the next token; what was
    generated until then has been yielded. The generator's return value (`StopIteration.value`) is the whole
    `Generation`: `finished` says whether it ended on the end token (False: max_new_tokens, or stopped).
    """
    pieces: collections.deque[str] = collections.deque()

    def on_event(event: Event) -> None:
        if event.kind == "text" and event.text:
            pieces.append(event.text)

    request = Request(prompt, sampling_params(args), on_event=on_event)
    engine = engine_for(model, tokenizer, [prompt], args.max_new_tokens, 1)
    for _ in engine.steps([request]):
        while pieces:
            yield pieces.popleft()
        if stop_event is not None and stop_event.is_set():
            request.cancel()
    while pieces:
        yield pieces.popleft()
    if request.result is not None and request.result.kind == "error" and not request.cancelled:
        raise request.result.error
    done = request.result  # None when stopped through stop_event
    n_tokens = len(request.token_ids) if done is None else done.completion_tokens
    return Generation(completion_text(tokenizer, request), n_tokens, done is not None and done.finish_reason == "stop")
