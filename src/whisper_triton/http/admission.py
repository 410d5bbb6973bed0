"""Admission: what work the server takes on, kept on the event loop (no await between a check and
its change). `Guards` (http/guards.py) holds a request slot for each metered request; the
transcription calls (`TritonClient`) hold its audio."""

from __future__ import annotations

import contextvars
from contextlib import asynccontextmanager
from typing import AsyncIterator

from ..errors import OverloadedError

# the status a refusal for load gets on the current request's route (429 or 503)
_OVERLOAD_STATUS: contextvars.ContextVar[int] = contextvars.ContextVar("overload_status", default=503)


def overload_status(path: str) -> int:
    """OpenAI clients back off on 429; SageMaker retries 503."""
    return 429 if path.startswith("/v1/") else 503


class Admission:
    """Bounds on work in flight, kept on the event loop (no await between check and change)."""

    def __init__(self, max_requests: int, max_audio_seconds: float, retry_after_s: int):
        self.max_requests = max_requests
        self.max_audio_seconds = max_audio_seconds
        self.retry_after_s = retry_after_s
        self.requests = 0
        self.audio_seconds = 0.0
        self.refused = 0

    def overloaded(self, what: str) -> OverloadedError:
        self.refused += 1
        return OverloadedError(f"The server is busy ({what}); retry after {self.retry_after_s} s.",
                               _OVERLOAD_STATUS.get(), self.retry_after_s)

    def enter(self) -> None:
        if self.requests >= self.max_requests:
            raise self.overloaded(f"{self.requests} requests in flight, the limit is {self.max_requests}")
        self.requests += 1

    def leave(self) -> None:
        self.requests -= 1

    @asynccontextmanager
    async def audio(self, seconds: float) -> AsyncIterator[None]:
        """Hold `seconds` of audio while it is transcribed; a file alone is always admitted."""
        if self.audio_seconds > 0 and self.audio_seconds + seconds > self.max_audio_seconds:
            raise self.overloaded(f"{self.audio_seconds:.0f} s of audio in flight, the limit is "
                                  f"{self.max_audio_seconds:.0f} s")
        self.audio_seconds += seconds
        try:
            yield
        finally:
            self.audio_seconds = max(0.0, self.audio_seconds - seconds)
