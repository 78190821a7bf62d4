"""Engine: continuous batching on one model, a bounded queue, and the reasoning/answer split of a stream.

One worker thread owns the model. Each loop it (1) admits waiting requests into free batch slots and
prefills them together, (2) runs one decode step for every running request with the KV cache, (3) sends
each request its new text and retires the finished ones, so a long answer never holds up a short one and
new requests join between steps instead of waiting for the whole batch (continuous batching, as in vLLM
and TGI). Rows have different lengths: the batch is left-padded and the attention mask hides the padding.

Limits, all from `serve.*`: at most `max_batch_size` requests run and `max_queue` wait; past that,
`submit` raises 429 with a Retry-After estimate. A request whose client went away is dropped at the next
step. One that runs past `request_timeout_s` ends cleanly with finish_reason "length"; one that waited
that long for a slot gets a 503. The KV cache, the queue and each request's output are bounded, so memory
stays bounded under any load.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from medcot.errors import Overloaded, Unavailable
from medcot.generate.batch import left_pad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Event:
    """What the engine sends a request: text pieces, then one "done" (or "error")."""

    kind: Literal["text", "done", "error"]
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


class Ticket:
    """A submitted request: iterate `events()` for its output, `cancel()` when the client goes away."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float):
        self.id = uuid.uuid4().hex[:12]
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.first_token_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Called from the engine thread; hands the event to the request's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if event.kind != "text":
                return


@dataclass
class EngineStats:
    completed: int = 0
    rejected: int = 0  # 429s
    cancelled: int = 0  # client went away
    timed_out: int = 0  # ran or waited past serve.request_timeout_s
    failed: int = 0
    generated_tokens: int = 0


@dataclass
class _Row:
    """A running request: its generated tokens, incremental detokenizer state and emitted text."""

    ticket: Ticket
    tokens: list[int]  # the last prompt tokens (detokenizer context), then the generated ones
    prefix_off: int
    read_off: int
    generator: torch.Generator | None
    n_generated: int = 0
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    finish: str | None = None
    timed_out: bool = False
    last_token: int = 0
    started: float = field(default_factory=time.monotonic)


class Engine:
    """Continuous-batching generation over one model, fed from any number of asyncio requests."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, max_queue: int, request_timeout_s: float):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache` (5.2x); support the versions on both sides of it.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
        self._cache_kw = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        self.stats = EngineStats()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self._eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos.discard(None)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._n_running = 0
        self._stopping = False
        self._avg_request_s = 5.0  # running mean of request time, for Retry-After
        # Batch state, touched only by the worker thread.
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._can_merge = True  # False for caches that can't be padded and joined (sliding-window layers)
        self._thread = threading.Thread(target=self._run, name="medcot-engine", daemon=True)

    # -- the asyncio side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": self._n_running, "waiting": len(self._waiting)}

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Ticket:
        """Queue a request (call from the event loop).

        Raises:
            Overloaded: batch and queue are full (the server answers 429 with Retry-After).
            Unavailable: the engine is shutting down (503).
        """
        ticket = Ticket(prompt_ids, params, self.request_timeout_s)
        with self._cond:
            if self._stopping or (self._thread.ident is not None and not self._thread.is_alive()):
                raise Unavailable("the server is shutting down", retry_after_s=5)
            if self._n_running + len(self._waiting) >= self.max_batch_size + self.max_queue:
                self.stats.rejected += 1
                retry = self._retry_after_s()
                raise Overloaded(
                    f"the server is at capacity ({self._n_running} running, {len(self._waiting)} waiting; "
                    f"serve.max_batch_size={self.max_batch_size}, serve.max_queue={self.max_queue}); "
                    f"retry after {retry} s",
                    retry_after_s=retry,
                )
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def _retry_after_s(self) -> int:
        # Time until a slot frees up, roughly: the queue ahead drains max_batch_size requests per request time.
        waves = math.ceil((len(self._waiting) + 1) / self.max_batch_size)
        return int(min(60, max(1, math.ceil(self._avg_request_s * waves))))

    # -- the worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._expire_waiting()
                    while not self._waiting and not self._rows and not self._stopping:
                        self._cond.wait(timeout=1.0)
                        self._expire_waiting()
                    if self._stopping:
                        break
                    admitted: list[Ticket] = []
                    while self._waiting and len(self._rows) + len(admitted) < self.max_batch_size and (
                        self._can_merge or not self._rows
                    ):
                        admitted.append(self._waiting.popleft())
                    self._n_running = len(self._rows) + len(admitted)
                try:
                    if admitted:
                        self._prefill(admitted)
                    self._retire()
                    if self._rows:
                        self._decode_step()
                        self._retire()
                except Exception as e:  # a failed step (e.g. out of memory) fails its requests, not the server
                    log.exception("generation step failed; ending the %d running requests with an error",
                                  len(self._rows) + len(admitted))
                    rows = {id(r.ticket): r.ticket for r in self._rows}
                    rows.update({id(t): t for t in admitted})
                    for t in rows.values():
                        t.emit(Event("error", error=e))
                    self.stats.failed += len(rows)
                    self._rows, self._cache, self._mask = [], None, None
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                with self._cond:
                    self._n_running = len(self._rows)
        # Shutting down: nobody will serve what is left.
        with self._cond:
            left = list(self._waiting) + [r.ticket for r in self._rows]
            self._waiting.clear()
        for t in left:
            t.emit(Event("error", error=Unavailable("the server is shutting down")))

    def _expire_waiting(self) -> None:
        """Drop waiting requests whose client left, or that waited past the timeout (caller holds the lock)."""
        now = time.monotonic()
        keep = collections.deque()
        for t in self._waiting:
            if t.cancelled:
                self.stats.cancelled += 1
                t.emit(Event("error", error=_client_gone()))
            elif now > t.deadline:
                self.stats.timed_out += 1
                t.emit(Event("error", error=Unavailable(
                    f"the request waited {now - t.submitted:.0f} s for a free slot "
                    f"(serve.request_timeout_s={self.request_timeout_s:g}); retry later",
                    code="timeout", retry_after_s=self._retry_after_s())))
            else:
                keep.append(t)
        self._waiting = keep

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float(), out[self._cache_kw]

    def _prefill(self, tickets: list[Ticket]) -> None:
        ids, mask = left_pad([t.prompt_ids for t in tickets], self._pad, self.device)
        # Left padding: each row's positions count its own tokens only, so padding never shifts RoPE.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # No cache passed: the model builds the right kind for its layers (full or sliding-window).
        logits, cache = self._forward(ids, mask, positions, None)
        rows = []
        for t in tickets:
            tail = t.prompt_ids[-6:]  # detokenizer context: a word's leading space depends on what precedes it
            gen = None
            if t.params.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(t.params.seed if t.params.seed is not None else int(torch.randint(2**62, ())))
            rows.append(_Row(ticket=t, tokens=list(tail), prefix_off=0, read_off=len(tail), generator=gen))
        if self._rows:
            self._merge(cache, mask)
        else:
            self._cache, self._mask = cache, mask
            from transformers.cache_utils import DynamicLayer

            self._can_merge = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))
        self._rows.extend(rows)
        self._advance(rows, self._sample(logits, rows))

    def _merge(self, cache, mask: torch.Tensor) -> None:
        """Join freshly prefilled rows to the running batch: left-pad the shorter side, concatenate rows."""
        ta, tb = self._mask.shape[1], mask.shape[1]
        width = max(ta, tb)
        for la, lb in zip(self._cache.layers, cache.layers):
            la.keys = torch.cat([F.pad(la.keys, (0, 0, width - ta, 0)), F.pad(lb.keys, (0, 0, width - tb, 0))])
            la.values = torch.cat([F.pad(la.values, (0, 0, width - ta, 0)), F.pad(lb.values, (0, 0, width - tb, 0))])
        self._mask = torch.cat([F.pad(self._mask, (width - ta, 0)), F.pad(mask, (width - tb, 0))])

    def _decode_step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = self._mask.sum(-1, keepdim=True)  # the new token's position = real tokens before it
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits, self._cache = self._forward(ids, mask, positions, self._cache)
        self._mask = mask
        self._advance(rows, self._sample(logits, rows))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        for i, r in enumerate(rows):
            if r.ticket.params.ignore_eos:
                logits[i, list(self._eos)] = float("-inf")
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.generator is not None]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temp = torch.tensor([rows[i].ticket.params.temperature for i in sampled], device=logits.device)
            top_p = torch.tensor([rows[i].ticket.params.top_p for i in sampled], device=logits.device)
            probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)
            probs, order = probs.sort(dim=-1, descending=True)
            # Nucleus: keep the most likely tokens until their mass reaches top_p (the first one always stays).
            probs[(probs.cumsum(-1) - probs) >= top_p[:, None]] = 0
            for j, i in enumerate(sampled):
                choice = torch.multinomial(probs[j], 1, generator=rows[i].generator)
                tokens[i] = order[j, choice]
        return tokens.tolist()

    def _decode_delta(self, r: _Row, final: bool = False) -> str:
        # Incremental detokenization (as vLLM): decode a short window and keep only what it adds, holding
        # back an incomplete UTF-8 character (decoded as U+FFFD) until its next byte arrives.
        prefix = self.tokenizer.decode(r.tokens[r.prefix_off:r.read_off], skip_special_tokens=True)
        full = self.tokenizer.decode(r.tokens[r.prefix_off:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            r.prefix_off, r.read_off = r.read_off, len(r.tokens)
            return full[len(prefix):].rstrip("\ufffd") if final else full[len(prefix):]
        return ""

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.monotonic()
        for r, tok in zip(rows, tokens):
            params = r.ticket.params
            if r.ticket.first_token_at is None:
                r.ticket.first_token_at = now
            if tok in self._eos and not params.ignore_eos:
                r.finish = "stop"
                r.text += self._decode_delta(r, final=True)
            else:
                r.tokens.append(tok)
                r.last_token = tok
                r.n_generated += 1
                before = len(r.text)
                r.text += self._decode_delta(r, final=r.n_generated >= params.max_tokens)
                if params.stop:
                    hits = [p for s in params.stop if (p := r.text.find(s, max(0, before - len(s) + 1))) >= 0]
                    if hits:  # the stop string itself is not part of the answer (OpenAI semantics)
                        r.text, r.finish = r.text[:min(hits)], "stop"
                if r.finish is None and r.n_generated >= params.max_tokens:
                    r.finish = "length"
            # Hold back text that may be the start of a stop string until the next token decides.
            hold = 0 if r.finish else max(
                (k for s in params.stop for k in range(len(s) - 1, 0, -1) if r.text.endswith(s[:k])), default=0)
            if len(r.text) - hold > r.sent:
                r.ticket.emit(Event("text", text=r.text[r.sent:len(r.text) - hold]))
                r.sent = len(r.text) - hold
            if r.finish:
                self._finish(r)

    def _finish(self, r: _Row) -> None:
        r.ticket.emit(Event("done", finish_reason=r.finish, prompt_tokens=len(r.ticket.prompt_ids),
                            completion_tokens=r.n_generated))
        self.stats.completed += 1
        self.stats.generated_tokens += r.n_generated
        self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * (time.monotonic() - r.started)

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows from the batch (cache rows, mask rows, padding)."""
        now = time.monotonic()
        for r in self._rows:
            if r.finish is not None:
                continue
            if r.ticket.cancelled:
                r.finish = "cancelled"
                self.stats.cancelled += 1
                log.info("request %s | client went away after %d tokens; generation stopped",
                         r.ticket.id, r.n_generated)
                r.ticket.emit(Event("error", error=_client_gone()))  # unblocks a handler still waiting
            elif now > r.ticket.deadline:
                r.finish, r.timed_out = "length", True
                self.stats.timed_out += 1
                log.warning("request %s | ran past serve.request_timeout_s=%g after %d tokens; ended with "
                            "finish_reason=length", r.ticket.id, self.request_timeout_s, r.n_generated)
                r.text += self._decode_delta(r, final=True)
                if len(r.text) > r.sent:
                    r.ticket.emit(Event("text", text=r.text[r.sent:]))
                self._finish(r)
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(idx)
        self._mask = self._mask[idx]
        if self._can_merge:
            # Columns that are padding in every remaining row hold nothing: cut them so the cache stays small.
            lead = int((self._mask.cumsum(-1) == 0).sum(-1).min())
            if lead:
                self._mask = self._mask[:, lead:]
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


def _client_gone() -> Unavailable:
    return Unavailable("the client disconnected; generation stopped", code="client_disconnected")
