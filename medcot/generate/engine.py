"""Engine: the one generation engine of medcot. Prompts in, token streams out, for eval, serve, ask, the
training report and RL rollouts.

One owner thread (the server's worker thread, or the caller's thread for `run`) loops: (1) admit waiting
requests into free KV-cache slots and prefill them (several prompts per forward pass, long prompts in
chunks), (2) run one decode step for every running request (`runner.ModelRunner`: a CUDA graph per batch
and cache-length bucket), (3) choose every row's token on the device (`sampler.sample`: greedy,
temperature, top-p, per-request seeds; one host sync per step for the whole batch), then send each request
its new text (`detok.TextStream`) and retire the finished ones, so a long answer never holds up a short one
and new requests join between steps (continuous batching).

Limits, all from `serve.*`: at most `max_batch_size` requests run and `max_queue` wait; past that,
`submit` raises 429 with a Retry-After estimate. A request whose client went away is dropped at the next
step. A request still running or waiting at `request_timeout_s` ends with a timeout error (the server
answers 503), never with a cut-short "done". The KV cache (a fixed block per slot, grown only when a
request needs longer slots), the queue and each request's output are bounded, so memory stays bounded
under any load.

Thinking budget (`SamplingParams.thinking_budget`, s1's "budget forcing"): a reasoning that reaches its
budget, or that ends in EOS before `</think>`, gets "\\n</think>\\n" appended (fed to the model, sent as
text, not counted as completion tokens) and an answer phase of up to `answer_tokens` tokens, so every
finished request has an answer. Eval (`budget.generate_answers`) uses the same rule through `run`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from medcot.errors import Overloaded, Unavailable
from medcot.generate.detok import TextStream
from medcot.generate.reasoning import (
    FORCE_CLOSE,
    THINK_CLOSE,
    THINK_OPEN,
    force_close_ids,
)
from medcot.generate.runner import BATCH_BUCKETS, ModelRunner, fit_slots
from medcot.generate.sampler import RowParams, sample

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Thinking budget: None turns it off (the model reasons until it closes, stops or hits max_tokens).
    # With one, the reasoning gets min(thinking_budget, max_tokens - answer_tokens) tokens (at least 0), so
    # the answer phase always fits in max_tokens; then FORCE_CLOSE is forced and `answer_tokens` more are
    # generated. EOS inside the reasoning is taken as its end: the close is forced and the answer generated.
    # A model that writes </think> itself is bounded by max_tokens only.
    thinking_budget: int | None = None
    # 128: room for a few sentences of answer (~100 words) after a forced close; eval's 64 fits a letter
    # and a line, a chat answer needs more, and more would eat into the reasoning of a short max_tokens.
    answer_tokens: int = 128
    # The prompt opened <think> (medcot's templates, R1 chat templates). False: the completion is reasoning
    # only if it opens with <think> itself; otherwise it is all answer and the budget does not apply.
    starts_in_reasoning: bool = True


@dataclass(frozen=True)
class Event:
    """What the engine sends a request: text pieces, then one "done" (or "error")."""

    kind: Literal["text", "done", "error"]
    text: str = ""
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens the model wrote; a forced "</think>" is not counted
    reasoning_tokens: int = 0  # of completion_tokens, those before the reasoning closed
    forced_close: bool = False  # the thinking budget (or EOS in the reasoning) forced "</think>"
    error: Exception | None = None


class Request:
    """A request to the engine, for callers that run it in their own thread (`Engine.run`).

    `on_event` (optional) gets every Event as it happens; the final "done"/"error" is kept in `.result`,
    and the ids the model wrote in `.token_ids` (forced ids excluded; `.forced_at`: where the forced close
    went among them, or None).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float = math.inf,
                 on_event: Callable[[Event], None] | None = None):
        self.id = uuid.uuid4().hex[:12]
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.first_token_at: float | None = None
        self.result: Event | None = None
        self.token_ids: list[int] = []
        self.forced_at: int | None = None
        self._on_event = on_event
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def streams_text(self) -> bool:
        """Whether text events are wanted as tokens arrive (otherwise only the final event and the ids)."""
        return self._on_event is not None

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        if event.kind != "text":
            self.result = event
        if self._on_event is not None:
            self._on_event(event)


class Ticket(Request):
    """A submitted server request: iterate `events()` for its output, `cancel()` when the client goes away."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float):
        super().__init__(prompt_ids, params, timeout_s)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        """Called from the engine thread; hands the event to the request's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()

    @property
    def streams_text(self) -> bool:
        return True

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
    """A running request: its KV-cache slot, detokenizer, emitted text and thinking-budget state."""

    ticket: Request
    slot: int
    length: int  # positions written in its cache slot
    stream: TextStream
    seed: int
    # Text (detokenized per token) is kept for streams, stop strings and the thinking budget; a batch request
    # without them only needs its ids (decoded at the end), so its rows skip the per-token text work.
    track_text: bool = True
    n_generated: int = 0
    n_drawn: int = 0  # tokens sampled (the noise counter of a seeded row)
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    finish: str | None = None
    last_token: int = 0
    started: float = field(default_factory=time.monotonic)
    # "reasoning" until </think> (written or forced), then "answer"; "start" while a completion that did not
    # start inside the reasoning has shown nothing but (part of) "<think>": it may still open one.
    phase: Literal["start", "reasoning", "answer"] = "reasoning"
    n_reasoning: int = 0
    forced: collections.deque[int] = field(default_factory=collections.deque)  # forced ids still to feed
    answer_from: int = -1  # after a forced close: where the answer text starts, and its token limit
    answer_limit: int = 0


class Engine:
    """Continuous-batching generation over one model, fed from asyncio requests (`submit`) or run to the
    end in the caller's thread (`run`)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int, max_queue: int, request_timeout_s: float,
                 max_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        gen_cfg = getattr(model, "generation_config", None)
        eos = gen_cfg.eos_token_id if gen_cfg is not None else None
        self._eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos.discard(None)
        self._eos_list = sorted(self._eos)
        self._force_ids = force_close_ids(tokenizer)
        self._max_len_hint = max_len
        on_cuda = self.device.type == "cuda"
        self._prefill_tokens = 16384 if on_cuda else 2048  # prompt tokens per prefill pass
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._n_running = 0
        self._stopping = False
        self._avg_request_s = 5.0  # running mean of request time, for Retry-After
        # Batch state, touched only by the thread that runs the loop.
        self.runner: ModelRunner | None = None
        self._rows: list[_Row] = []
        self._thread = threading.Thread(target=self._run, name="medcot-engine", daemon=True)

    # -- the asyncio side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident is not None:
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

    # -- running in the caller's thread -------------------------------------------------------------

    def run(self, requests: list[Request], progress: Callable[[int], None] | None = None,
            close: bool = True) -> list[Request]:
        """Generate every request to its end in this thread (eval, reports, rollouts); the engine must not also
        be started. `progress(n_done)` is called as requests finish; `close`: free the KV cache at the end."""
        done = 0
        for _ in self.steps(requests, close):
            n = sum(r.result is not None for r in requests)
            if progress is not None and n != done:
                progress(n)
            done = n
        return requests

    def steps(self, requests: list[Request], close: bool = True) -> Iterator[None]:
        """`run`, one engine step per iteration (streaming in the caller's thread: `ask`)."""
        if self._thread.ident is not None:
            raise RuntimeError("Engine.run and Engine.steps are for an engine that was not started")
        with self._cond:
            self._waiting.extend(requests)
        try:
            while self._waiting or self._rows:
                with self._cond:
                    self._expire_waiting()
                    admitted = self._admit()
                with torch.inference_mode():
                    self._step(admitted)
                yield
        finally:
            if close:
                self.close()

    def close(self) -> None:
        """Free the KV cache and CUDA graphs (the engine starts a new cache if it is used again)."""
        for r in self._rows:
            if r.ticket.result is None:
                r.ticket.cancel()
        self._rows, self.runner = [], None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            if self.device.type == "cuda":
                self._warm_up()
            while True:
                with self._cond:
                    self._expire_waiting()
                    while not self._waiting and not self._rows and not self._stopping:
                        self._cond.wait(timeout=1.0)
                        self._expire_waiting()
                    if self._stopping:
                        break
                    admitted = self._admit()
                    self._n_running = len(self._rows) + len(admitted)
                self._step(admitted)
                with self._cond:
                    self._n_running = len(self._rows)
        # Shutting down: nobody will serve what is left.
        with self._cond:
            left = list(self._waiting) + [r.ticket for r in self._rows]
            self._waiting.clear()
        for t in left:
            t.emit(Event("error", error=Unavailable("the server is shutting down", code="shutting_down")))

    def _warm_up(self) -> None:
        """Compile and capture the decode graphs of every batch size at the shortest cache length before the
        first request, so that it does not wait for them (requests that come meanwhile wait in the queue)."""
        try:
            t0 = time.perf_counter()
            runner = self._ensure_runner(self._max_len_hint or 2048)
            runner.capture([b for b in BATCH_BUCKETS if b <= runner.slots] + [runner.slots], [256])
            log.info("engine warm-up: %d slots of %d positions, %d CUDA graphs, %.1f s", runner.slots,
                     runner.max_len, len(runner._graphs), time.perf_counter() - t0)
        except Exception as e:  # the first requests pay for it instead
            log.warning("engine warm-up failed (%s: %s); continuing without it", type(e).__name__, e)

    def _admit(self) -> list[Request]:
        """Waiting requests that get a slot now (caller holds the lock)."""
        slots = self.max_batch_size if self.runner is None else min(self.max_batch_size, self.runner.slots)
        admitted = []
        while self._waiting and len(self._rows) + len(admitted) < slots:
            admitted.append(self._waiting.popleft())
        return admitted

    def _step(self, admitted: list[Request]) -> None:
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
                if t.result is None:
                    t.emit(Event("error", error=e))
            self.stats.failed += len(rows)
            self._rows = []
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

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

    # -- the model: prefill and decode through the runner -------------------------------------------------

    def _needed_len(self, t: Request) -> int:
        return len(t.prompt_ids) + t.params.max_tokens + len(self._force_ids) + 1

    def _ensure_runner(self, need: int) -> ModelRunner:
        """The runner, with cache slots of at least `need` positions (grown, keeping the running rows)."""
        old = self.runner
        if old is not None and old.max_len >= need:
            return old
        max_len = max(need, self._max_len_hint or 0, 2 * old.max_len if old is not None else 0)
        max_len = -(-max_len // 256) * 256
        if old is not None:  # give the old graphs' and cache's memory back before taking the new block
            old._graphs.clear()
        slots = fit_slots(self.model, self.max_batch_size, max_len)
        if old is not None:
            slots = max(slots, len(self._rows))
        runner = ModelRunner(self.model, slots=slots, max_len=max_len)
        if old is not None and self._rows:
            n = len(self._rows)
            runner.kv.k[:, :n, :, : old.max_len].copy_(old.kv.k[:, :n])
            runner.kv.v[:, :n, :, : old.max_len].copy_(old.kv.v[:, :n])
        if slots < self.max_batch_size:
            log.warning("KV cache: %d slots of %d positions fit in memory (max_batch_size=%d); the rest wait",
                        slots, max_len, self.max_batch_size)
        self.runner = runner
        return runner

    def _forward(self, kind: str, *args):
        """("prefill", seqs, slots, start) or ("decode", tokens, positions) -> (logits [n, vocab] fp32, None)."""
        if kind == "prefill":
            return self.runner.prefill(*args), None
        return self.runner.decode(*args), None

    def _prefill(self, tickets: list[Request]) -> None:
        self._ensure_runner(max(self._needed_len(t) for t in tickets))
        # Prompts share a forward pass up to `_prefill_tokens` (rows x longest); a longer one goes alone, in chunks.
        groups: list[list[tuple[Request, int]]] = []
        group: list[tuple[Request, int]] = []
        width = 0
        for i, t in enumerate(tickets):
            slot, n = len(self._rows) + i, len(t.prompt_ids)
            if group and (n > self._prefill_tokens or max(width, n) * (len(group) + 1) > self._prefill_tokens):
                groups.append(group)
                group, width = [], 0
            group.append((t, slot))
            width = max(width, n)
        groups.append(group)
        for group in groups:
            if len(group) == 1 and len(group[0][0].prompt_ids) > self._prefill_tokens:
                (t, slot), chunk = group[0], self._prefill_tokens
                for start in range(0, len(t.prompt_ids), chunk):
                    logits, _ = self._forward("prefill", [t.prompt_ids[start:start + chunk]], [slot], start)
            else:
                logits, _ = self._forward("prefill", [t.prompt_ids for t, _ in group], [s for _, s in group], 0)
            rows = [self._new_row(t, slot) for t, slot in group]
            self._rows.extend(rows)
            self._advance(rows, self._sample(logits, rows))

    def _new_row(self, t: Request, slot: int) -> _Row:
        p = t.params
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        track = t.streams_text or bool(p.stop) or p.thinking_budget is not None or not p.starts_in_reasoning
        return _Row(ticket=t, slot=slot, length=len(t.prompt_ids), stream=TextStream(self.tokenizer), seed=seed,
                    track_text=track, phase="reasoning" if p.starts_in_reasoning else "start")

    def _decode_step(self) -> None:
        rows = self._rows
        logits, _ = self._forward("decode", [r.last_token for r in rows], [r.length for r in rows])
        for r in rows:
            r.length += 1
        self._advance(rows, self._sample(logits, rows))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        params = RowParams(
            temperature=[r.ticket.params.temperature for r in rows],
            top_p=[r.ticket.params.top_p for r in rows],
            seeds=[r.seed for r in rows],
            steps=[r.n_drawn for r in rows],
            # After a forced close, EOS waits for a visible answer character: a forced answer is never empty.
            block_eos=[r.ticket.params.ignore_eos or (r.answer_from >= 0 and not r.text[r.answer_from:].strip())
                       for r in rows],
        )
        for r in rows:
            r.n_drawn += 1
        return sample(logits, params, self._eos_list).tolist()

    # -- what each token does to its request ----------------------------------------------------------------

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.monotonic()
        eos = self._eos
        for r, tok in zip(rows, tokens):
            ticket = r.ticket
            params = ticket.params
            if ticket.first_token_at is None:
                ticket.first_token_at = now
            if r.forced:  # feeding the forced close: what the model would have written here is not used
                r.last_token = r.forced.popleft()
                continue
            is_eos = tok in eos and not params.ignore_eos
            if params.thinking_budget is not None and r.phase == "reasoning" and (
                r.n_reasoning >= min(params.thinking_budget, max(0, params.max_tokens - params.answer_tokens))
                or is_eos
            ):
                self._force_close(r)
                r.last_token = r.forced.popleft()
            elif is_eos:
                r.finish = "stop"
            else:
                ticket.token_ids.append(tok)
                r.last_token = tok
                r.n_generated += 1
                limit = r.answer_limit if r.answer_from >= 0 else params.max_tokens
                if r.track_text:
                    before = len(r.text)
                    r.text += r.stream.push(tok)
                    if r.phase != "answer":
                        r.n_reasoning += 1
                        self._update_phase(r, before)
                    if params.stop:
                        hits = [p for s in params.stop if (p := r.text.find(s, max(0, before - len(s) + 1))) >= 0]
                        if hits:  # the stop string itself is not part of the answer (OpenAI semantics)
                            r.text, r.finish = r.text[:min(hits)], "stop"
                if r.finish is None and (r.n_generated >= limit or r.length + 1 >= self.runner.max_len):
                    r.finish = "length"  # (the second: cannot happen, the slots fit every request's max_tokens)
            if r.track_text:
                # Hold back text that may be the start of a stop string until the next token decides.
                hold = 0 if r.finish or not params.stop else max(
                    (k for s in params.stop for k in range(len(s) - 1, 0, -1) if r.text.endswith(s[:k])), default=0)
                if len(r.text) - hold > r.sent:
                    ticket.emit(Event("text", text=r.text[r.sent:len(r.text) - hold]))
                    r.sent = len(r.text) - hold
            if r.finish:
                self._finish(r)

    @staticmethod
    def _update_phase(r: _Row, before: int) -> None:
        """The reasoning ends at </think>; a completion that did not start inside it must open with <think>
        (as ReasoningSplitter decides)."""
        if r.phase == "start":
            head = r.text.lstrip()
            if head.startswith(THINK_OPEN):
                r.phase = "reasoning"
            elif not THINK_OPEN.startswith(head):  # not even a partial tag: the completion is all answer
                r.phase, r.n_reasoning = "answer", 0
        if r.phase == "reasoning" and THINK_CLOSE in r.text[max(0, before - len(THINK_CLOSE)):]:
            r.phase = "answer"

    def _force_close(self, r: _Row) -> None:
        """Close the reasoning: send FORCE_CLOSE as text and queue its ids to be fed before the answer."""
        r.text += FORCE_CLOSE
        r.stream.skip(self._force_ids)  # detokenizer context only: their text was added above, verbatim
        r.forced.extend(self._force_ids)
        r.ticket.forced_at = len(r.ticket.token_ids)
        r.phase, r.answer_from = "answer", len(r.text)
        r.answer_limit = min(r.ticket.params.max_tokens, r.n_generated + r.ticket.params.answer_tokens)

    def _finish(self, r: _Row) -> None:
        r.ticket.emit(Event("done", finish_reason=r.finish, prompt_tokens=len(r.ticket.prompt_ids),
                            completion_tokens=r.n_generated, reasoning_tokens=r.n_reasoning,
                            forced_close=r.answer_from >= 0))
        self.stats.completed += 1
        self.stats.generated_tokens += r.n_generated
        self._avg_request_s = 0.8 * self._avg_request_s + 0.2 * (time.monotonic() - r.started)

    def _retire(self) -> None:
        """Drop finished, cancelled and timed-out rows; the rows in the highest slots move into the holes."""
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
                # A cut-short answer would look finished; the deadline is an error the client can act on.
                r.finish = "timeout"
                self.stats.timed_out += 1
                log.warning("request %s | ran past serve.request_timeout_s=%g after %d tokens; ended with a "
                            "timeout error", r.ticket.id, self.request_timeout_s, r.n_generated)
                r.ticket.emit(Event("error", error=Unavailable(
                    f"the request ran past serve.request_timeout_s={self.request_timeout_s:g} s after "
                    f"{r.n_generated} tokens; ask for fewer tokens (max_tokens, reasoning_effort) or retry later",
                    code="timeout", retry_after_s=self._retry_after_s())))
        if all(r.finish is None for r in self._rows):
            return
        alive = [r for r in self._rows if r.finish is None]
        n = len(alive)
        holes = iter(sorted(set(range(n)) - {r.slot for r in alive}))
        for r in alive:
            if r.slot >= n:
                dst = next(holes)
                self.runner.kv.move(r.slot, dst, r.length)
                r.slot = dst
        self._rows = sorted(alive, key=lambda r: r.slot)


def _client_gone() -> Unavailable:
    return Unavailable("the client disconnected; generation stopped", code="client_disconnected")
