"""Security: the API key, the loopback rule, and the request-size limit.

- `MEDCOT_API_KEY` (environment only: never in a config file, never logged) turns on bearer-token auth
  for every `/v1/` route, compared in constant time. The chat page and `/health` stay open: they hold no
  data, and the page asks for the key when the API answers 401.
- Without a key the server binds only to loopback; `medcot serve --host 0.0.0.0` without one refuses to
  start (a model answering medical questions should not be open to a whole network by accident).
- Bodies are limited to `serve.max_body_bytes` before any parsing (413), whether or not the client sends
  Content-Length.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from medcot.errors import InsecureBindError
from medcot.serve.protocol import APIError, AuthenticationError, RequestTooLargeError

API_KEY_ENV = "MEDCOT_API_KEY"

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


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key.

    Raises:
        InsecureBindError: `host` is not a loopback address and no key is set.
    """
    if api_key is None and not is_loopback(host):
        raise InsecureBindError(
            f"serve.host={host!r} is reachable from other machines, but {API_KEY_ENV} is not set. "
            f"Set a key (e.g. export {API_KEY_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')) "
            "or bind to 127.0.0.1"
        )


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header."""
    scheme, _, token = (authorization or "").partition(" ")
    # Hash both sides first so that compare_digest also hides the key's length.
    given = hashlib.sha256(token.strip().encode()).digest()
    expected = hashlib.sha256(api_key.encode()).digest()
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


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
        if self.api_key is not None and scope["path"].startswith("/v1/") and not key_matches(
            headers.get("authorization"), self.api_key
        ):
            err = AuthenticationError(
                f"Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key the "
                f"server was started with ({API_KEY_ENV})."
            )
            return await _send_error(send, err, [(b"www-authenticate", b"Bearer")])
        too_large = RequestTooLargeError(
            f"The request body is larger than this server's limit of {self.max_body_bytes:,} bytes "
            "(serve.max_body_bytes); shorten the conversation."
        )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, too_large)
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

