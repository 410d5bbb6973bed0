"""Slow clients: time limits on what the client sends and on how fast it reads a streamed answer.

uvicorn bounds the headers (h11's incomplete-event size) and idle keep-alive connections, but not a
body: a client that announces 6 MB and sends a byte every few seconds would hold its request slot
(and its admission) for ever. Here, as one pure ASGI middleware around every HTTP route:

- the body must arrive whole within `client_body_timeout_s`, with no gap longer than
  `client_idle_timeout_s` between two pieces; past either the route's read fails with 408
  `request_timeout` (param `body`) and the connection is closed (`Connection: close`);
- a streamed answer (SSE, JSON lines) whose client stops reading: once the socket's buffers are full a
  send waits for the client; when one waits longer than `stream_send_timeout_s` the answer is ended,
  which closes its chunks (so Triton cancels the decoding) and releases its slot. uvicorn then closes
  the connection (it logs that the response was not completed). Streamed routes answer with
  `ClosingStreamingResponse`, which closes its chunks whatever ended the answer (Starlette leaves that
  to the garbage collector, which may take long when the exception's traceback holds them).
"""

from __future__ import annotations

import asyncio
import logging

import anyio
from starlette.responses import StreamingResponse

from ..errors import WhisperTritonError
from .guards import CLIENT_GONE

logger = logging.getLogger(__name__)


class RequestTimeoutError(WhisperTritonError):
    def __init__(self, message: str):
        super().__init__(message=message, param="body", status=408, type="request_timeout")

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the rest of the body will not be read: the connection cannot be reused


class ClientStalled(Exception):
    """A streamed answer's client stopped reading (raised from `send`, caught by `ClientLimits`)."""


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the answer ends, so the stream's own
    cleanup (cancelling Triton's decoding, releasing its admission) runs at once."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):  # also when the answer was cancelled
                    await close()


class ClientLimits:
    def __init__(self, app, body_timeout_s: float, idle_timeout_s: float, send_timeout_s: float):
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, self._timed_receive(receive), self._timed_send(send))
        except ClientStalled:
            scope.setdefault("state", {})[CLIENT_GONE] = True  # counted as 499, like a client that left
            logger.info("client stopped reading for %.0f s: streamed answer to %s %s ended", self.send_timeout_s,
                        scope.get("method"), scope.get("path"))

    def _timed_receive(self, receive):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        state = {"body_done": False}

        async def timed_receive():
            if state["body_done"]:  # only a disconnect is left to come: no limit
                return await receive()
            left = deadline - loop.time()
            whole = left <= self.idle_timeout_s  # which limit ends the wait first
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, min(left, self.idle_timeout_s)))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(self._timeout_message(whole)) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        return timed_receive

    def _timeout_message(self, whole: bool) -> str:
        if whole:
            return (f"The request body did not arrive within {self.body_timeout_s:g} s "
                    "(WHISPER_TRITON_CLIENT_BODY_TIMEOUT_S): send it whole at once, or raise the limit.")
        return (f"The request body stopped arriving: nothing came for {self.idle_timeout_s:g} s "
                "(WHISPER_TRITON_CLIENT_IDLE_TIMEOUT_S). Send the body without pauses.")

    def _timed_send(self, send):
        async def timed_send(message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            try:
                await asyncio.wait_for(send(message), timeout=self.send_timeout_s)
            except asyncio.TimeoutError:
                raise ClientStalled() from None

        return timed_send
