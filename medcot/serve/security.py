"""Security: the API key, the loopback rule, and the request-size limit.

- `MEDCOT_API_KEY` (environment only: never in a config file, never logged) turns on bearer-token auth
  for every `/v1/` route, compared in constant time. The chat page and `/health` stay open: they hold no
  data, and the page asks for the key when the API answers 401.
- Without a key the server binds only to loopback; `medcot serve --host 0.0.0.0` without one refuses to
  start (a model answering medical questions should not be open to a whole network by accident), and so
  does one with a key shorter than `MIN_API_KEY_CHARS` or with whitespace in it (a blank key, a typo'd
  export, a guessable word).
- Bodies are limited to `serve.max_body_bytes` before any parsing (413), whether or not the client sends
  Content-Length, and must be sent as `Content-Type: application/json` (400 saying so otherwise).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from medcot.errors import InsecureBindError
from medcot.serve.protocol import (
    APIError,
    AuthenticationError,
    RequestError,
    RequestTooLargeError,
)

API_KEY_ENV = "MEDCOT_API_KEY"
# 16 characters of a random token (secrets.token_urlsafe) are ~96 bits: out of reach of online guessing.
MIN_API_KEY_CHARS = 16
_MAKE_KEY = f"export {API_KEY_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"

# The page is self-contained (no CDN): everything it loads comes from this server.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def key_problem(api_key: str) -> str | None:
    """Why a key is too weak to guard a network-facing server (None: it will do). Never shows the key."""
    if not api_key.strip():
        return f"{API_KEY_ENV} is blank"
    if any(c.isspace() for c in api_key):
        return f"{API_KEY_ENV} contains whitespace (a copy-paste slip? clients cannot send it reliably)"
    if len(api_key) < MIN_API_KEY_CHARS:
        return f"{API_KEY_ENV} is {len(api_key)} characters long; the minimum is {MIN_API_KEY_CHARS}"
    return None


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without a usable API key.

    Raises:
        InsecureBindError: `host` is not a loopback address and no key is set, or the key is blank, has
            whitespace in it or is shorter than MIN_API_KEY_CHARS.
    """
    if is_loopback(host):
        return
    if api_key is None:
        raise InsecureBindError(
            f"serve.host={host!r} is reachable from other machines, but {API_KEY_ENV} is not set. "
            f"Set a key (e.g. {_MAKE_KEY}) or bind to 127.0.0.1"
        )
    if problem := key_problem(api_key):
        raise InsecureBindError(
            f"serve.host={host!r} is reachable from other machines, but {problem}. Use a long random key "
            f"(e.g. {_MAKE_KEY}) or bind to 127.0.0.1"
        )


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header."""
    scheme, _, token = (authorization or "").partition(" ")
    # Hash both sides first so that compare_digest also hides the key's length.
    given = hashlib.sha256(token.strip().encode()).digest()
    expected = hashlib.sha256(api_key.encode()).digest()
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _send_error(send, err: APIError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = err.envelope().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *[(k.lower().encode(), v.encode()) for k, v in err.headers.items()], *extra_headers, *SECURITY_HEADERS]
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI middleware: API key on /v1/ routes, body-size limit, security headers on every response.

    Pure ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        authorization = headers.get("authorization")
        if self.api_key is not None and scope["path"].startswith("/v1/") and not key_matches(
            authorization, self.api_key
        ):
            # Missing and wrong keys need different fixes: say which (the key itself is never echoed).
            if not (authorization or "").strip():
                message = (f"This server requires an API key: send the header 'Authorization: Bearer <key>' with "
                           f"the key it was started with ({API_KEY_ENV}).")
            else:
                message = (f"The API key was not accepted: the 'Authorization: Bearer <key>' header does not carry "
                           f"the key this server was started with ({API_KEY_ENV}).")
            return await _send_error(send, AuthenticationError(message), [(b"www-authenticate", b"Bearer")])
        too_large = RequestTooLargeError(
            f"The request body is larger than this server's limit of {self.max_body_bytes:,} bytes "
            "(serve.max_body_bytes); shorten the conversation."
        )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, too_large)
        if scope["method"] == "POST" and scope["path"].startswith("/v1/") and not _is_json(headers.get("content-type")):
            # Otherwise FastAPI reads the body as bytes and answers "Input should be a valid dictionary".
            got = f"got {headers['content-type'][:80]!r}" if "content-type" in headers else "no Content-Type header"
            return await _send_error(send, RequestError(
                f"Send the request body as JSON with the header 'Content-Type: application/json' ({got}).",
                param="Content-Type", code="invalid_content_type"))
        # Read the whole body (it is small: bounded above) before the app sees it, so an over-long chunked
        # body is refused here too, and replay it to the app.
        chunks, size, more = [], 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _send_error(send, too_large)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as the app expects

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(k, v) for k, v in SECURITY_HEADERS if k not in present]]}
            await send(message)

        await self.app(scope, replay, send_with_headers)

