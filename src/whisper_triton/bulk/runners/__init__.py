"""The engines that transcribe a list of S3 objects: a SageMaker batch transform job, an async
endpoint, or a running `serve`. Each reports one `Outcome` per object, from whichever thread."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..listing import AudioObject
from ..manifest import PERMANENT, RETRYABLE

# error types of the container (errors.py) that another try cannot change
CLIENT_ERROR_TYPES = {"invalid_audio", "invalid_request_error", "payload_too_large", "unsupported_media_type",
                      "unsupported_option", "not_acceptable", "input_error"}


@dataclass
class Outcome:
    obj: AudioObject
    body: bytes | None = None  # the container's JSON answer, when it transcribed the file
    error: str | None = None
    error_kind: str | None = None  # client (permanent) | server (retryable)
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.body is not None


Report = Callable[[Outcome], None]


class Runner(Protocol):
    via: str

    def limit_bytes(self) -> int | None: ...

    def start(self) -> None: ...

    def run(self, objects: list[AudioObject], report: Report) -> None: ...

    def finish(self) -> None: ...

    def details(self) -> dict: ...


def error_message(body: bytes | str) -> tuple[str, str]:
    """(message, kind) of a container's error answer ({"error": {"message", "type"}}) or any text."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text or "the container gave no reason", RETRYABLE
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        kind = PERMANENT if error.get("type") in CLIENT_ERROR_TYPES else RETRYABLE
        return str(error.get("message") or text), kind
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"]), RETRYABLE
    return text, RETRYABLE


def guarded(one: Callable[[AudioObject], Outcome], obj: AudioObject) -> Outcome:
    """`one(obj)`, with anything it raises turned into the file's (retryable) failure: one file's
    surprise must not end the run."""
    try:
        return one(obj)
    except Exception as exc:  # noqa: BLE001
        return Outcome(obj, error=f"{type(exc).__name__}: {exc}", error_kind=RETRYABLE)
