"""Errors that carry an HTTP status, so every layer reports bad input the same way.

The same error crosses process boundaries (Python backend -> Triton -> proxy) as a message
string; `encode`/`decode` keep its status, type and parameter intact on the way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WIRE_PREFIX = "whisper_triton_error:"
_WIRE_RE = re.compile(re.escape(_WIRE_PREFIX) + r"(\{.*\})", re.DOTALL)


@dataclass
class WhisperTritonError(Exception):
    """A request the service cannot serve, with the cause and the fix in `message`."""

    message: str
    param: str | None = None
    status: int = 400
    type: str = "invalid_request_error"

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}

    def encode(self) -> str:
        """A one-line message for Triton errors that `decode` turns back into this error."""
        payload = {"status": self.status, "type": self.type, "param": self.param, "message": self.message}
        return f"{self.message} {_WIRE_PREFIX}{json.dumps(payload)}"

    @classmethod
    def decode(cls, text: str) -> "WhisperTritonError | None":
        match = _WIRE_RE.search(text or "")
        if not match:
            return None
        try:
            payload = json.loads(match.group(1))
        except ValueError:
            return None
        return cls(
            message=payload.get("message", text),
            param=payload.get("param"),
            status=int(payload.get("status", 400)),
            type=payload.get("type", "invalid_request_error"),
        )


class InvalidAudioError(WhisperTritonError):
    def __init__(self, message: str, param: str | None = "audio"):
        super().__init__(message=message, param=param, status=400, type="invalid_audio")


class PayloadTooLargeError(WhisperTritonError):
    def __init__(self, message: str, param: str | None = "audio"):
        super().__init__(message=message, param=param, status=413, type="payload_too_large")


def invalid_parameter(param: str, message: str) -> WhisperTritonError:
    return WhisperTritonError(message=message, param=param, status=400, type="invalid_request_error")
