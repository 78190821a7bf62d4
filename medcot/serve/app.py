"""`medcot serve`: an OpenAI-compatible chat API with the reasoning apart from the answer, and a chat page.

    medcot serve                                   # the embedded demo model on http://127.0.0.1:8000
    medcot serve --adapter runs/demo --port 8080   # a fine-tuned run
    MEDCOT_API_KEY=... medcot serve --host 0.0.0.0 serve.max_batch_size=16

Routes: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health`, `GET /` (the chat page). See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medcot.config import Config
from medcot.data.prompts import PromptFormatter
from medcot.disclaimer import DISCLAIMER
from medcot.errors import Overloaded, Unavailable
from medcot.generate.engine import Engine, Event, SamplingParams, Ticket
from medcot.generate.reasoning import ReasoningSplitter
from medcot.serve.chat import build_prompt
from medcot.serve.security import API_KEY_ENV, GuardMiddleware, check_bind, is_loopback

from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
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
    """What the lifespan loads once and every request reads."""

    model_name: str
    formatter: PromptFormatter
    engine: Engine
    cfg: Config
    default_max_tokens: int


# -- errors: one envelope, one mapping --------------------------------------------------------------


def _error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


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
                problems.append(f"{loc or 'body'}: {err['msg']}")
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
    """Build the app; the model loads once, when the app starts (FastAPI lifespan).

    Args:
        cfg: the resolved config; `serve.*` sets the limits, `generate.*` the default sampling.
        adapter: a run folder from `medcot train`.
        load_model: `(cfg, adapter) -> (model, tokenizer, cfg)`; default `medcot.model.load_for_inference`.
    """
    serve_args = cfg.serve  # the run's saved config (with an adapter) must not replace the server's limits
    api_key = os.environ.get(API_KEY_ENV) or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_model is None:
            from medcot.model.load import load_for_inference as load
        else:
            load = load_model
        t0 = time.monotonic()
        model, tokenizer, run_cfg = await asyncio.to_thread(load, cfg, adapter)
        run_cfg.serve = serve_args
        default_max = min(run_cfg.generate.max_new_tokens, serve_args.max_tokens_limit)
        if default_max < run_cfg.generate.max_new_tokens:
            log.warning("generate.max_new_tokens=%d is above serve.max_tokens_limit=%d: requests without "
                        "max_tokens get %d", run_cfg.generate.max_new_tokens, serve_args.max_tokens_limit, default_max)
        engine = Engine(model, tokenizer, max_batch_size=serve_args.max_batch_size, max_queue=serve_args.max_queue,
                        request_timeout_s=serve_args.request_timeout_s)
        engine.start()
        app.state.served = _Served(
            model_name=serve_args.model_name or "medcot",
            formatter=PromptFormatter(tokenizer, run_cfg.prompt),
            engine=engine,
            cfg=run_cfg,
            default_max_tokens=default_max,
        )
        device = engine.device
        log.info("medcot serve | model %s = %s%s | %s %s | %.1f s to load", app.state.served.model_name,
                 run_cfg.model.name_or_path, f" + adapter {adapter}" if adapter else "", device,
                 str(next(model.parameters()).dtype).removeprefix("torch."), time.monotonic() - t0)
        log.info("limits | batch %d | queue %d | max_tokens %d | prompt %d tokens | body %d bytes | timeout %g s",
                 serve_args.max_batch_size, serve_args.max_queue, serve_args.max_tokens_limit,
                 serve_args.max_prompt_tokens, serve_args.max_body_bytes, serve_args.request_timeout_s)
        log.info("API key %s | CORS %s", f"required ({API_KEY_ENV} is set)" if api_key else
                 "off (loopback only; set MEDCOT_API_KEY to require one)",
                 ", ".join(serve_args.cors_origins) or "off")
        log.info("%s", DISCLAIMER)
        yield
        engine.stop()

    app = FastAPI(title="medcot", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible chat API of a medical reasoning model. {DISCLAIMER}")
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
    async def health(request: Request) -> dict:
        served: _Served = request.app.state.served
        return {"status": "ok", "model": served.model_name, "auth_required": api_key is not None,
                "disclaimer": DISCLAIMER, **served.engine.load(),
                "max_batch_size": serve_args.max_batch_size, "max_queue": serve_args.max_queue,
                "max_tokens_limit": serve_args.max_tokens_limit, "default_max_tokens": served.default_max_tokens,
                "stats": asdict(served.engine.stats)}

    def _card(served: _Served) -> ModelCard:
        return ModelCard(id=served.model_name, max_model_len=serve_args.max_prompt_tokens + serve_args.max_tokens_limit)

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=[_card(request.app.state.served)])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def retrieve_model(model_id: str, request: Request) -> ModelCard:
        served: _Served = request.app.state.served
        if model_id != served.model_name:
            raise ModelNotFoundError(f"The model {model_id!r} does not exist; this server serves "
                                     f"{served.model_name!r}", param="model")
        return _card(served)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        served: _Served = request.app.state.served
        if body.model is not None and body.model != served.model_name:
            raise ModelNotFoundError(f"The model {body.model!r} does not exist; this server serves "
                                     f"{served.model_name!r} (GET /v1/models)", param="model")
        body.check_supported()
        ticket, prompt_opens_reasoning = await _submit(served, body)
        splitter = ReasoningSplitter(prompt_opens_reasoning)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = ticket.events()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, ticket))
        try:
            # Wait for the first event before answering, so that a request that never starts (it waited past
            # the timeout) still gets a real status code rather than a stream that errors.
            first = await _next_event(ticket, events)
            if first.kind == "error":
                raise _as_api_error(first.error)
            if body.stream:
                watcher.cancel()  # from here on the StreamingResponse notices a disconnect itself
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = _sse(first, events, ticket, splitter, rid, created, served.model_name, include_usage)
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, event = "", first
            while event.kind == "text":
                text += event.text
                event = await _next_event(ticket, events)
            if event.kind == "error":
                raise _as_api_error(event.error)
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
            id=rid, created=created, model=served.model_name,
            choices=[ChatCompletionResponseChoice(
                message=ChatMessage(content=content, reasoning=reasoning), finish_reason=event.finish_reason)],
            usage=_usage(event),
        )

    return app


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
    # Priority: request -> server default (generate.*) ; sampling without a seed is random, as at OpenAI.
    temperature = gen.temperature if body.temperature is None else body.temperature
    params = SamplingParams(
        max_tokens=asked or served.default_max_tokens,
        temperature=temperature,
        top_p=gen.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        ignore_eos=body.ignore_eos,
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


async def _next_event(ticket: Ticket, events: AsyncIterator[Event]) -> Event:
    # The engine ends every request by its deadline; the extra wait here only guards against a stuck engine.
    timeout = max(1.0, ticket.deadline + 30 - time.monotonic())
    try:
        return await asyncio.wait_for(anext(events), timeout)
    except asyncio.TimeoutError:
        raise ServiceUnavailableError("generation did not finish in time", code="timeout") from None


def _usage(event: Event) -> UsageInfo:
    return UsageInfo(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                     total_tokens=event.prompt_tokens + event.completion_tokens)


def _log_request(ticket: Ticket, done: Event) -> None:
    # One fixed-field line per request. The conversation itself is never logged: it may be about a patient.
    now = time.monotonic()
    ttft = (ticket.first_token_at or now) - ticket.submitted
    total = now - ticket.submitted
    log.info("request %s | prompt %d tok | completion %d tok | ttft %.2f s | total %.2f s | %.1f tok/s | finish %s",
             ticket.id, done.prompt_tokens, done.completion_tokens, ttft, total,
             done.completion_tokens / max(total - ttft, 1e-6), done.finish_reason)


async def _sse(first: Event, events: AsyncIterator[Event], ticket: Ticket, splitter: ReasoningSplitter, rid: str,
               created: int, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, reasoning/content deltas, a finish chunk, [usage chunk], [DONE]."""
    exclude = None if include_usage else {"usage"}

    def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
        body = ChatCompletionStreamResponse(
            id=rid, created=created, model=model_name,
            choices=[ChatCompletionResponseStreamChoice(delta=delta, finish_reason=finish)])
        return f"data: {body.model_dump_json(exclude=exclude)}\n\n"

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
                err = _as_api_error(event.error)
                yield f"data: {json.dumps(err.envelope().model_dump())}\n\n"
                break
            event = await _next_event(ticket, events)
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a no-op once finished; stops generation when the client went away mid-stream


def serve(cfg: Config, adapter: str | Path | None = None) -> int:
    """Check the bind address and key, then run the server until Ctrl-C.

    Raises:
        InsecureBindError: a non-loopback `serve.host` without MEDCOT_API_KEY.
    """
    import uvicorn

    host, port = cfg.serve.host, cfg.serve.port
    api_key = os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)
    if api_key is not None and len(api_key) < 16:
        log.warning("%s is only %d characters long; use a long random key", API_KEY_ENV, len(api_key))
    app = create_app(cfg, adapter)
    shown = f"[{host}]" if ":" in host else host
    log.info("starting on http://%s:%d (chat page /, API /v1)%s", shown, port,
             "" if is_loopback(host) else " -- reachable from the network, API key required")
    # log_config=None: uvicorn logs through medcot's logging setup; the access log never shows headers or bodies.
    uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    return 0
