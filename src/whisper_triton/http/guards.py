"""What every HTTP request passes through before and around its route, as one ASGI middleware:

1. a request id: the caller's `X-Request-Id` when it is sane, else a new one; in every response
   header, in every log line of the proxy (`RequestIdFilter`), and sent to Triton as the gRPC id;
2. the opt-in API key (`Settings.api_key`): `Authorization: Bearer <key>` or `x-api-key`, compared
   in constant time and never logged; /ping stays open (SageMaker's health check sends no key);
3. admission (backpressure): at most `max_requests_in_flight` requests at work; beyond it an
   immediate 429 on OpenAI routes (/v1/...) or 503 on the SageMaker contract (which SageMaker
   retries), with Retry-After; the route's deadline is set here for `Admission.audio`, which admits
   the audio by deadline once the body has been read (http/admission.py);
4. cancellation: a client that disconnects stops its request; the route's task is cancelled, which
   cancels its gRPC call, and Triton marks the request cancelled for the model to stop decoding;
5. an unexpected exception becomes a 500 JSON error without internal details (logged with its id).

A pure ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hmac
import json
import logging
import re
import uuid

from ..errors import OverloadedError, WhisperTritonError
from ..settings import Settings
from .admission import Admission, reset_route, set_route

logger = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REQUEST_ID_HEADER = "x-request-id"
CLIENT_GONE = "client_gone"  # scope["state"] key: the client left before its answer was complete
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": the label a cancelled request gets
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
OPEN_PATHS = frozenset({"/ping"})  # no key, never refused for load
UNMETERED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # cheap reads are not admitted work
MAX_MESSAGE_CHARS = 600  # an error message longer than this quotes client text: cut, whatever it quotes
ECHO_CHARS = 64  # client text (a header, a value) an error message quotes at most
# control characters (line breaks above all) in client text a log line quotes: escaped, so a path with
# %0A cannot start a line of its own in the log
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def request_id_from(value: str | None) -> str:
    """The caller's id when it is short and plain (it ends up in logs and headers), else a new one."""
    if value and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """Client text as an error message may quote it: at most `limit` characters, and no control ones."""
    text = escaped(text)
    return text if len(text) <= limit else text[:limit] + "..."


def clipped_error(exc: WhisperTritonError) -> WhisperTritonError:
    """`exc` with its message cut to MAX_MESSAGE_CHARS (the safety net behind each message's own cut)."""
    if len(exc.message) <= MAX_MESSAGE_CHARS:
        return exc
    short = copy.copy(exc)
    short.message = exc.message[:MAX_MESSAGE_CHARS] + "..."
    return short


def escaped(text: str) -> str:
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


def _escaped_arg(value):
    if isinstance(value, str):
        return escaped(value)
    if isinstance(value, BaseException):  # an exception's text may quote the client
        return escaped(str(value))
    return value


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request's, "-" outside one) for the log format, and escapes
    control characters in the record's arguments (paths, ids, names: client text) so none forges a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped_arg(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _escaped_arg(arg) for key, arg in record.args.items()}
        return True


def install_request_id_logging() -> None:
    """Put the request id on every record the root handlers write (serve's log format shows it)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def presented_key(scope) -> str | None:
    authorization = _header(scope, b"authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return _header(scope, b"x-api-key")


def key_matches(presented: str | None, expected: str) -> bool:
    # compare_digest on equal types; a missing key still costs one comparison
    return hmac.compare_digest((presented or "").encode(), expected.encode()) and presented is not None


def _error_body(exc: WhisperTritonError) -> bytes:
    return json.dumps(clipped_error(exc).to_dict()).encode()


class Guards:
    """The ASGI middleware (module docstring); `create_app` installs it around every route."""

    def __init__(self, app, settings: Settings, admission: Admission):
        self.app = app
        self.settings = settings
        self.api_key = settings.api_key.get_secret_value()
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, REQUEST_ID_HEADER.encode()))
        id_token = REQUEST_ID.set(request_id)
        route_tokens = set_route(scope.get("path", ""), self.settings.deadline_s(scope.get("path", "")))
        try:
            await self._guarded(scope, receive, send, request_id)
        finally:
            reset_route(route_tokens)
            REQUEST_ID.reset(id_token)

    async def _guarded(self, scope, receive, send, request_id: str) -> None:
        path, method = scope.get("path", ""), scope.get("method", "GET")
        state = {"started": False, "complete": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        if path not in OPEN_PATHS and self.api_key and not key_matches(presented_key(scope), self.api_key):
            await self._refuse(send_with_id, WhisperTritonError(
                "A valid API key is required: send `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
                "Authorization", 401, "authentication_error"), {"WWW-Authenticate": "Bearer"})
            return
        metered = path not in OPEN_PATHS and method not in UNMETERED_METHODS
        if metered:
            try:
                self.admission.enter()
            except OverloadedError as exc:
                logger.warning("refused %s %s: %s", method, path, exc.message)
                await self._refuse(send_with_id, exc, exc.headers())
                return
        try:
            await self._run_until_disconnect(scope, receive, send_with_id, state)
        except Exception:  # noqa: BLE001 - no traceback, path or internal name reaches the caller
            logger.exception("unexpected error on %s %s", method, path)
            if not state["started"]:
                await self._refuse(send_with_id, WhisperTritonError(
                    "Internal error; retry, and check the server log (request id %s) if it persists." % request_id,
                    None, 500, "internal_error"), {})
        finally:
            if metered:
                self.admission.leave()

    async def _run_until_disconnect(self, scope, receive, send, state: dict) -> None:
        """Run the route; if the client goes away before the answer is complete, cancel it."""
        body_done = asyncio.Event()

        async def tracking_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done.set()
            elif message["type"] == "http.disconnect":
                body_done.set()
            return message

        route = asyncio.ensure_future(self.app(scope, tracking_receive, send))
        watcher = asyncio.ensure_future(self._disconnected(receive, body_done))
        try:
            done, _ = await asyncio.wait({route, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if route in done:
                route.result()
                return
            if state["complete"]:  # the server's answer was sent; the disconnect is the normal end
                await route
                return
            logger.info("client disconnected: cancelling %s %s", scope.get("method"), scope.get("path"))
            scope.setdefault("state", {})[CLIENT_GONE] = True  # the metrics count it as 499, not as an error
            route.cancel()
            try:
                await route
            except asyncio.CancelledError:
                pass
        finally:
            watcher.cancel()
            if not route.done():
                route.cancel()

    @staticmethod
    async def _disconnected(receive, body_done: asyncio.Event) -> None:
        """Returns when the client disconnects (after the route has read the whole body)."""
        await body_done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    @staticmethod
    async def _refuse(send, exc: WhisperTritonError, headers: dict[str, str]) -> None:
        body = _error_body(exc)
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": raw})
        await send({"type": "http.response.body", "body": body, "more_body": False})
