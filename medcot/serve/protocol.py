"""The HTTP contract: OpenAI chat-completion request/response models and the error envelope.

Fields follow the OpenAI API reference, in its order (https://platform.openai.com/docs/api-reference/chat),
so the official `openai` client and tools built for it work unchanged. Fields that medcot adds sit in a
commented block at the end of each model. Spec fields medcot cannot honour (tools, logprobs, n > 1, ...)
are accepted with their defaults and rejected with a 400 that names them otherwise; fields the spec does
not have are ignored with a log line (as vLLM does), so a newer client never breaks the server.

Types are strict, as OpenAI's are: `"max_tokens": "2"`, `true` or `2.0`, `"stream": "yes"` and a
temperature of `"0.5"` or NaN are 400s that name the field, never silently converted.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    computed_field,
    model_serializer,
    model_validator,
)

log = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# A JSON number (an integer is fine), never a string or a bool; Python's JSON parser reads NaN and
# Infinity, which no sampling parameter can use.
StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]

# reasoning_effort -> thinking budget in tokens (the reasoning is closed and the answer generated after it).
REASONING_EFFORT_TOKENS = {"none": 0, "low": 128, "medium": 512, "high": 2048}


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept (and logged once per request) rather than rejected: clients send newer spec fields.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if self.model_extra:
            log.info("The following fields were present in the request but ignored: %s", sorted(self.model_extra))
        return self


# -- request ---------------------------------------------------------------------------------------


class ContentPart(OpenAIBaseModel):
    """One part of a multi-part message; medcot reads text parts only."""

    type: StrictStr
    text: StrictStr | None = None


class ChatMessageParam(OpenAIBaseModel):
    """A message of the conversation, as the client sends it."""

    role: Literal["system", "developer", "user", "assistant"]
    # Optional for an assistant turn only (as in OpenAI's API); check_supported names a missing one.
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self, index: int) -> str:
        """The message as plain text.

        Raises:
            RequestError: a non-text content part (image, audio, file).
        """
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"messages[{index}].content[{j}] has type {part.type!r}; medcot serves a text model and "
                    "accepts only {'type': 'text', 'text': ...} parts",
                    param=f"messages.{index}.content.{j}.type",
                )
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(OpenAIBaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(OpenAIBaseModel):
    # Ordered by the official OpenAI API documentation
    # https://platform.openai.com/docs/api-reference/chat/create
    messages: list[ChatMessageParam] = Field(min_length=1)
    model: StrictStr | None = Field(None, description="The served model id (GET /v1/models); omitted: the served model.")
    frequency_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = False
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    max_tokens: StrictInt | None = Field(
        None, ge=1, description="Deprecated by OpenAI for max_completion_tokens; both work.")
    n: StrictInt | None = Field(1, ge=1)
    presence_penalty: StrictFloat | None = Field(0.0, ge=-2.0, le=2.0)
    reasoning_effort: Literal["none", "low", "medium", "high"] | None = Field(
        None, description="Thinking budget: none 0, low 128, medium 512, high 2048 reasoning tokens, after which "
                          "'</think>' is forced and the answer generated. Omitted: serve.thinking_budget.")
    response_format: dict[str, Any] | None = None
    seed: StrictInt | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(
        None, ge=0.0, le=2.0, description="0: greedy. Omitted: generate.temperature.")
    tool_choice: Any | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0, description="Omitted: generate.top_p.")
    user: StrictStr | None = None

    # medcot-specific fields that are not in the OpenAI spec
    ignore_eos: StrictBool = Field(
        False, description="Keep generating past the end-of-sequence token up to max_tokens (benchmarks; as vLLM)."
    )
    max_thinking_tokens: StrictInt | None = Field(
        None, ge=0, description="Reasoning tokens before '</think>' is forced and the answer generated (0: answer at "
                                "once). Omitted: reasoning_effort, else serve.thinking_budget.")

    def check_supported(self) -> None:
        """Reject spec features this server does not implement, naming the field.

        Raises:
            RequestError: the first unsupported field with a non-default value.
        """
        unsupported = {
            "n": (self.n or 1) != 1,
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "logit_bias": bool(self.logit_bias),
            "frequency_penalty": bool(self.frequency_penalty),
            "presence_penalty": bool(self.presence_penalty),
            "response_format": self.response_format not in (None, {"type": "text"}),
        }
        for param, bad in unsupported.items():
            if bad:
                raise RequestError(
                    f"{param}={getattr(self, param)!r} is not supported by medcot serve; omit it or use its default",
                    param=param,
                )
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError("stop: up to 4 non-empty strings", param="stop")
        if self.max_thinking_tokens is not None and self.reasoning_effort is not None:
            raise RequestError("set max_thinking_tokens or reasoning_effort, not both", param="max_thinking_tokens")
        for i, m in enumerate(self.messages):
            # A question without text would be answered as an empty question; OpenAI requires content too.
            if m.role != "assistant" and (m.content is None or (m.role == "user" and not m.text(i).strip())):
                what = "is missing" if m.content is None else "is empty"
                raise RequestError(f"messages[{i}].content {what}: a {m.role} message needs text",
                                   param=f"messages.{i}.content")
        if self.messages[-1].role != "user":
            raise RequestError(
                f"the last message must come from the user, got role {self.messages[-1].role!r}",
                param=f"messages.{len(self.messages) - 1}.role",
            )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- response --------------------------------------------------------------------------------------


class CompletionTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int  # of completion_tokens, those before the reasoning closed (as OpenAI reports them)


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None

    # medcot-specific fields that are not in the OpenAI spec: the chain-of-thought, apart from the answer.
    # `reasoning` as vLLM's reasoning parsers write it; `reasoning_content` as DeepSeek's API and older vLLM do.
    reasoning: str | None = None

    @computed_field
    @property
    def reasoning_content(self) -> str | None:
        return self.reasoning


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    # medcot-specific fields that are not in the OpenAI spec (see ChatMessage).
    reasoning: str | None = None

    @computed_field
    @property
    def reasoning_content(self) -> str | None:
        return self.reasoning

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler):
        # A delta carries only the keys that changed in this chunk, as OpenAI's stream does.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    # With stream_options.include_usage every chunk carries "usage": null and a last chunk (no choices) the
    # totals; without it the key is left out (see app.py).
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "medcot"

    # medcot-specific fields that are not in the OpenAI spec
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors ----------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


class APIError(Exception):
    """An error with its HTTP status; app.py turns every one into the OpenAI envelope in one place."""

    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def envelope(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class RequestError(APIError):
    """400: the request is malformed or asks for something this server does not do."""

    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(APIError):
    """429: batch and queue are full; Retry-After says when to come back."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(APIError):
    """503: the model is loading, the request ran past serve.request_timeout_s, or the server is draining."""

    status_code = 503
    type = "server_error"
    code = "server_busy"
