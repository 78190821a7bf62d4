"""`medcot serve`: an OpenAI-compatible chat API with the reasoning apart from the answer, and a chat page.

    medcot serve                                   # the embedded demo model on http://127.0.0.1:8000
    medcot serve --adapter runs/demo --port 8080   # a fine-tuned run
    MEDCOT_API_KEY=... medcot serve --host 0.0.0.0 serve.max_batch_size=16

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (readiness), `GET /health/live` (liveness), `GET /` (the chat page). See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medcot.config import Config
from medcot.data.prompts import PromptFormatter
from medcot.disclaimer import DISCLAIMER
from medcot.errors import MedcotError, Overloaded, Unavailable
from medcot.generate.engine import Engine, Event, SamplingParams, Ticket
from medcot.generate.reasoning import ReasoningSplitter
from medcot.serve.chat import build_prompt
from medcot.serve.security import (
    API_KEY_ENV,
    GuardMiddleware,
    check_bind,
    is_loopback,
    key_problem,
)

from .protocol import (
    REASONING_EFFORT_TOKENS,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionTokensDetails,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelNotFoundError,
    RateLimitError,
    RequestError,
    ServiceUnavailableError,
    UsageInfo,
)

log = logging.getLogger("medcot.serve")

STATIC = Path(__file__).parent / "static"
_ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


@dataclass
class _Served:
    """What the model load produces once and every request reads."""

    formatter: PromptFormatter
    engine: Engine
    cfg: Config
    default_max_tokens: int


class _Lifecycle:
    """Readiness: the server listens while the model loads, serves once it is in, drains on shutdown.

    status: "loading" -> "ready" -> "draining"; "failed" when the model could not be loaded. /v1/chat/completions
    answers 503 (with Retry-After) in every state but "ready"; /health is 200 only when "ready".
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.status: Literal["loading", "ready", "draining", "failed"] = "loading"
        self.served: _Served | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()

    def require_ready(self) -> _Served:
        """The loaded model, or the 503 that says why there is none.

        Raises:
            ServiceUnavailableError: loading (code "loading"), draining ("shutting_down") or failed ("load_failed").
        """
        if self.status == "ready" and self.served is not None:
            return self.served
        if self.status == "loading":
            raise ServiceUnavailableError(
                f"The model is still loading ({time.monotonic() - self.started:.0f} s so far); retry shortly "
                "(GET /health answers 200 once it is ready)", code="loading", headers={"Retry-After": "5"})
        if self.status == "draining":
            raise ServiceUnavailableError(
                "The server is shutting down and takes no new requests; retry shortly (another replica, or this "
                "one after its restart)", code="shutting_down", headers={"Retry-After": "5"})
        raise ServiceUnavailableError("The model failed to load (see the server log).", code="load_failed")

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let running and queued requests finish for up to `grace_s`, then end the rest (their
        streams get an error event and [DONE])."""
        if self.status != "ready" or self.served is None:
            return
        self.status = "draining"
        engine = self.served.engine
        load = engine.load()
        log.info("draining: %d running, %d waiting; new requests get 503; open requests get up to %g s "
                 "(serve.drain_timeout_s)", load["running"], load["waiting"], grace_s)
        deadline = time.monotonic() + grace_s
        while sum(engine.load().values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = sum(engine.load().values())
        if left:
            log.warning("drain timeout: ending %d open requests with a 'shutting down' error", left)
        await asyncio.to_thread(engine.stop)  # sends each open request its error event


# -- errors: one envelope, one mapping --------------------------------------------------------------


def _error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


# Pydantic's wording where it misleads: NaN passes no range check, and its message said "less than or equal".
_FRIENDLIER = {"finite_number": "must be a finite number (not NaN or Infinity)"}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status_code, exc.envelope().error, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # OpenAI answers a malformed body with 400 (not FastAPI's 422); name every bad field, never echo values.
        problems, params = [], []
        for err in exc.errors()[:8]:
            loc = ".".join(str(p) for p in err["loc"] if p != "body")
            if err["type"] == "json_invalid":
                problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            else:
                problems.append(f"{loc or 'body'}: {_FRIENDLIER.get(err['type'], err['msg'])}")
                params += [loc] if loc else []
        info = ErrorInfo(message="Invalid request: " + "; ".join(problems), type="invalid_request_error",
                         param=params[0] if params else None, code="invalid_request")
        return _error_response(400, info)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown route (404), wrong method (405)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        info = ErrorInfo(message="The server had an error while processing your request (see the server log).",
                         type="server_error", code="internal_error")
        return _error_response(500, info)


def _as_api_error(error: Exception | None) -> APIError:
    """The HTTP error for what the engine reported: capacity (429), time or shutdown (503), or a failure (500)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, Overloaded):
        return RateLimitError(str(error), headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, Unavailable):
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
        return ServiceUnavailableError(str(error), code=error.code, headers=headers)
    log.error("generation failed: %r", error)
    return APIError("Generation failed on the server (see the server log).", code="generation_failed")


# -- the app ----------------------------------------------------------------------------------------


def create_app(cfg: Config, adapter: str | Path | None = None, *, load_model: Callable | None = None) -> FastAPI:
    """Build the app. It listens at once; the model loads in the background (FastAPI lifespan), and
    `/health` says "loading" (503) until it is ready.

    Args:
        cfg: the resolved config; `serve.*` sets the limits, `generate.*` the default sampling.
        adapter: a run folder from `medcot train`.
        load_model: `(cfg, adapter) -> (model, tokenizer, cfg)`; default `medcot.model.load_for_inference`.
    """
    serve_args = cfg.serve  # the run's saved config (with an adapter) must not replace the server's limits
    api_key = os.environ.get(API_KEY_ENV) or None
    life = _Lifecycle(serve_args.model_name or "medcot")

    async def load() -> None:
        if load_model is None:
            from medcot.model.load import load_for_inference as load_fn
        else:
            load_fn = load_model
        try:
            model, tokenizer, run_cfg = await _in_daemon_thread(load_fn, cfg, adapter)
            run_cfg.serve = serve_args
            engine = Engine(model, tokenizer, max_batch_size=serve_args.max_batch_size,
                            max_queue=serve_args.max_queue, request_timeout_s=serve_args.request_timeout_s)
            engine.start()
        except Exception as e:  # the server cannot serve: /health says "failed" and serve() exits with it
            life.status, life.error = "failed", e
            if isinstance(e, MedcotError):
                log.error("the model could not be loaded: %s", e)
            else:
                log.exception("the model could not be loaded")
            return
        default_max = min(run_cfg.generate.max_new_tokens, serve_args.max_tokens_limit)
        if default_max < run_cfg.generate.max_new_tokens:
            log.warning("generate.max_new_tokens=%d is above serve.max_tokens_limit=%d: requests without "
                        "max_tokens get %d", run_cfg.generate.max_new_tokens, serve_args.max_tokens_limit, default_max)
        life.served = _Served(formatter=PromptFormatter(tokenizer, run_cfg.prompt), engine=engine, cfg=run_cfg,
                              default_max_tokens=default_max)
        life.status = "ready"
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        log.info("ready | model %s = %s%s | %s %s | %.1f s to load", life.model_name, run_cfg.model.name_or_path,
                 f" + adapter {adapter}" if adapter else "", engine.device, dtype, time.monotonic() - life.started)
        budget = serve_args.thinking_budget
        log.info("limits | batch %d | queue %d | max_tokens %d (default %d) | thinking %s | prompt %d tokens | "
                 "timeout %g s | API key %s | CORS %s", serve_args.max_batch_size, serve_args.max_queue,
                 serve_args.max_tokens_limit, default_max,
                 "off" if budget is None else f"{budget} + {serve_args.answer_tokens} answer tokens",
                 serve_args.max_prompt_tokens, serve_args.request_timeout_s,
                 "required" if api_key else "off (loopback only)", ", ".join(serve_args.cors_origins) or "off")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so that the server answers /health ("loading") during a long model load.
        task = asyncio.create_task(load())
        yield
        if life.served is not None:
            life.served.engine.stop()
        elif not task.done():
            task.cancel()  # its daemon thread ends with the process
            log.info("stopped while the model was still loading")

    app = FastAPI(title="medcot", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible chat API of a medical reasoning model. {DISCLAIMER}")
    app.state.life = life
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=serve_args.max_body_bytes)
    if serve_args.cors_origins:  # outermost, so that preflight requests (without the key) are answered
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=serve_args.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        """Readiness: 200 once the model serves requests; 503 while it loads, after it failed, or while draining."""
        body = {"status": "ok" if life.status == "ready" else life.status, "model": life.model_name,
                "auth_required": api_key is not None, "disclaimer": DISCLAIMER,
                "max_tokens_limit": serve_args.max_tokens_limit, "max_batch_size": serve_args.max_batch_size,
                "max_queue": serve_args.max_queue, "thinking_budget": serve_args.thinking_budget}
        if life.served is not None:
            body.update(life.served.engine.load(), default_max_tokens=life.served.default_max_tokens,
                        stats=asdict(life.served.engine.stats))
        return JSONResponse(body, status_code=200 if life.status == "ready" else 503,
                            headers=None if life.status == "ready" else {"Retry-After": "5"})

    @app.get("/health/live")
    async def liveness() -> dict:
        """Liveness: the process answers (also while loading or draining); restart it only if this fails."""
        return {"status": "alive"}

    def _card() -> ModelCard:
        return ModelCard(id=life.model_name, max_model_len=serve_args.max_prompt_tokens + serve_args.max_tokens_limit)

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[_card()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != life.model_name:
            raise ModelNotFoundError(f"The model {model_id!r} does not exist; this server serves "
                                     f"{life.model_name!r}", param="model")
        return _card()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        if body.model is not None and body.model != life.model_name:
            raise ModelNotFoundError(f"The model {body.model!r} does not exist; this server serves "
                                     f"{life.model_name!r} (GET /v1/models)", param="model")
        body.check_supported()
        served = life.require_ready()
        ticket, prompt_opens_reasoning = await _submit(served, body)
        splitter = ReasoningSplitter(prompt_opens_reasoning)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = ticket.events()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
        timeout_s = serve_args.request_timeout_s
        try:
            # Wait for the first event before answering, so that a request that never starts (it waited past
            # the timeout) still gets a real status code rather than a stream that errors.
            first = await _next_event(ticket, events, timeout_s)
            if first.kind == "error":
                raise _as_api_error(first.error)
            if body.stream:
                watcher.cancel()  # from here on the StreamingResponse notices a disconnect itself
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = _sse(first, events, ticket, splitter, rid, created, life.model_name, include_usage,
                              timeout_s)
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, event = "", first
            while event.kind == "text":
                text += event.text
                event = await _next_event(ticket, events, timeout_s)
            if event.kind == "error":
                raise _as_api_error(event.error)
        except _DeadlinePassed:
            raise  # the engine drops the request at its next step and counts it as timed out
        except BaseException:
            ticket.cancel()
            raise
        finally:
            watcher.cancel()
        pieces = splitter.feed(text) + splitter.flush()
        reasoning = "".join(t for k, t in pieces if k == "reasoning") or None
        content = "".join(t for k, t in pieces if k == "content") or None
        _log_request(ticket, event)
        return ChatCompletionResponse(
            id=rid, created=created, model=life.model_name,
            choices=[ChatCompletionResponseChoice(
                message=ChatMessage(content=content, reasoning=reasoning), finish_reason=event.finish_reason)],
            usage=_usage(event),
        )

    return app


async def _in_daemon_thread(fn: Callable, *args):
    """`await fn(*args)` run in a daemon thread: unlike asyncio.to_thread's pool, which the interpreter joins at
    exit, a SIGTERM during a long model load then ends the process at once."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine, which decides
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop is closed: the server stopped meanwhile
            pass

    threading.Thread(target=work, name="medcot-load", daemon=True).start()
    return await future


def _thinking_budget(body: ChatCompletionRequest, default: int | None) -> tuple[int | None, bool]:
    """(budget, asked): the request's max_thinking_tokens, else its reasoning_effort, else serve.thinking_budget."""
    if body.max_thinking_tokens is not None:
        return body.max_thinking_tokens, True
    if body.reasoning_effort is not None:
        return REASONING_EFFORT_TOKENS[body.reasoning_effort], True
    return default, False


async def _submit(served: _Served, body: ChatCompletionRequest) -> tuple[Ticket, bool]:
    """Validate the request against the limits, build the prompt and queue it (429 when full)."""
    limits, gen = served.cfg.serve, served.cfg.generate
    prompt = await asyncio.to_thread(build_prompt, served.formatter, body.messages)  # tokenizing is CPU work
    if len(prompt.ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"This server's maximum prompt length is {limits.max_prompt_tokens} tokens (serve.max_prompt_tokens). "
            f"However, your messages came to {len(prompt.ids)} tokens. Please reduce the length of the messages.",
            param="messages", code="context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > limits.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise RequestError(f"{param}={asked} is above this server's limit of {limits.max_tokens_limit} "
                           "(serve.max_tokens_limit); ask for fewer tokens", param=param)
    budget, budget_asked = _thinking_budget(body, limits.thinking_budget)
    max_tokens = asked or served.default_max_tokens
    if asked is None and budget_asked and budget is not None:
        # A request that asks for a budget but not a length gets room for the whole budget and its answer.
        max_tokens = min(limits.max_tokens_limit, max(max_tokens, budget + limits.answer_tokens))
    # Priority: request -> server default (generate.*) ; sampling without a seed is random, as at OpenAI.
    temperature = gen.temperature if body.temperature is None else body.temperature
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=gen.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        ignore_eos=body.ignore_eos,
        thinking_budget=budget,
        # The engine keeps answer_tokens of max_tokens free for the answer; of a short max_tokens, half, so that
        # a small request still reasons a little before it answers.
        answer_tokens=max(1, min(limits.answer_tokens, max_tokens // 2)),
        starts_in_reasoning=prompt.opens_reasoning,
    )
    try:
        return served.engine.submit(prompt.ids, params), prompt.opens_reasoning
    except (Overloaded, Unavailable) as e:
        raise _as_api_error(e) from None


async def _cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    """Stop the generation of a client that hangs up (checked every 0.25 s while it waits for the answer)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    ticket.cancel()


class _DeadlinePassed(ServiceUnavailableError):
    """The request's deadline passed while the server waited for its next event (a 503, at the deadline)."""


async def _next_event(ticket: Ticket, events: AsyncIterator[Event], timeout_s: float) -> Event:
    # The deadline is kept here, to the moment: the engine only notices it between steps, which can be long.
    remaining = ticket.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(anext(events), max(remaining, 0.01))
    except asyncio.TimeoutError:
        waited = "waited for a free slot" if ticket.first_token_at is None else "was still generating"
        raise _DeadlinePassed(
            f"the request {waited} at its deadline (serve.request_timeout_s={timeout_s:g} s); ask for fewer "
            "tokens (max_tokens, reasoning_effort) or retry later", code="timeout", headers={"Retry-After": "5"},
        ) from None


def _usage(event: Event) -> UsageInfo:
    return UsageInfo(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                     total_tokens=event.prompt_tokens + event.completion_tokens,
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=event.reasoning_tokens))


def request_log_line(ticket: Ticket, done: Event, now: float) -> str:
    """One fixed-field line per request. The decode rate counts the tokens after the first over the time after
    it: the first token comes out of the prefill, whose time is the TTFT."""
    ttft = (ticket.first_token_at or now) - ticket.submitted
    total = now - ticket.submitted
    decode = done.completion_tokens - 1
    rate = f"{decode / (total - ttft):.1f} tok/s" if decode > 0 and total > ttft else "- tok/s"
    forced = " (thinking budget: </think> forced)" if done.forced_close else ""
    return (f"request {ticket.id} | prompt {done.prompt_tokens} tok | completion {done.completion_tokens} tok, "
            f"reasoning {done.reasoning_tokens}{forced} | ttft {ttft:.2f} s | total {total:.2f} s | decode {rate} | "
            f"finish {done.finish_reason}")


def _log_request(ticket: Ticket, done: Event) -> None:
    # The conversation itself is never logged: it may be about a patient.
    log.info("%s", request_log_line(ticket, done, time.monotonic()))


async def _sse(first: Event, events: AsyncIterator[Event], ticket: Ticket, splitter: ReasoningSplitter, rid: str,
               created: int, model_name: str, include_usage: bool, timeout_s: float) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, reasoning/content deltas, a finish chunk, [usage chunk], [DONE].

    Every stream ends with [DONE], also one cut by the deadline or a shutdown: an error event comes first.
    """
    exclude = None if include_usage else {"usage"}

    def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
        body = ChatCompletionStreamResponse(
            id=rid, created=created, model=model_name,
            choices=[ChatCompletionResponseStreamChoice(delta=delta, finish_reason=finish)])
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

    deadline_passed = False
    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        event = first
        while True:
            if event.kind == "text":
                for kind, text in splitter.feed(event.text):
                    yield chunk(DeltaMessage(**{kind: text}))
            elif event.kind == "done":
                for kind, text in splitter.flush():
                    yield chunk(DeltaMessage(**{kind: text}))
                yield chunk(DeltaMessage(), finish=event.finish_reason)
                if include_usage:
                    last = ChatCompletionStreamResponse(id=rid, created=created, model=model_name, choices=[],
                                                        usage=_usage(event))
                    yield f"data: {last.model_dump_json()}\n\n"
                _log_request(ticket, event)
                break
            else:  # the stream has started: the error travels in the stream, as vLLM does
                yield _error_event(_as_api_error(event.error))
                break
            try:
                event = await _next_event(ticket, events, timeout_s)
            except _DeadlinePassed as e:
                deadline_passed = True
                yield _error_event(e)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not deadline_passed:  # the engine counts a request past its deadline as timed out, not cancelled
            ticket.cancel()  # a no-op once finished; stops generation when the client went away mid-stream


def _error_event(err: APIError) -> str:
    return f"data: {json.dumps(err.envelope().model_dump())}\n\n"


class _Server(uvicorn.Server):
    """uvicorn, with a graceful drain on the first SIGTERM/Ctrl-C (a second one stops at once), and an exit
    when the model fails to load."""

    def __init__(self, config: uvicorn.Config, life: _Lifecycle, drain_timeout_s: float):
        super().__init__(config)
        self.life = life
        self.drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task | None = None
        self._drain_asked = False

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: only set a flag; on_tick (in the event loop) starts the drain.
        if self._drain_asked or self.life.status != "ready":
            super().handle_exit(sig, frame)
        else:
            self._drain_asked = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_asked and self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())
        if self.life.status == "failed":
            self.should_exit = True
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.life.drain(self.drain_timeout_s)
        finally:
            self.should_exit = True


def serve(cfg: Config, adapter: str | Path | None = None) -> int:
    """Check the bind address and key, then run the server until SIGTERM or Ctrl-C (drained, see `_Server`).

    Raises:
        InsecureBindError: a non-loopback `serve.host` without a usable MEDCOT_API_KEY.
        Exception: what loading the model raised (the server listened meanwhile, saying "loading").
    """
    host, port = cfg.serve.host, cfg.serve.port
    api_key = os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)
    if api_key is not None and (problem := key_problem(api_key)):
        log.warning("%s: fine on loopback, refused on any other address", problem)
    app = create_app(cfg, adapter)
    shown = f"[{host}]" if ":" in host else host
    log.info("medcot serve on http://%s:%d (chat page /, API /v1)%s; loading the model (/health: 'loading' until "
             "ready)", shown, port, "" if is_loopback(host) else ", reachable from the network, API key required")
    log.info("%s", DISCLAIMER)
    # log_config=None: uvicorn logs through medcot's logging setup; the access log never shows headers or bodies.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    life: _Lifecycle = app.state.life
    _Server(config, life, cfg.serve.drain_timeout_s).run()
    if life.error is not None:
        raise life.error
    return 0
