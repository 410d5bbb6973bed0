"""Errors that carry an HTTP status, so every layer reports bad input the same way.

The same error crosses process boundaries (Python backend -> Triton -> proxy) as a Triton error
message written and read by `contract.tensors.encode_error` / `decode_error`.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the JSON body (none by default)."""
        return {}


class InvalidAudioError(WhisperTritonError):
    def __init__(self, message: str, param: str | None = "audio"):
        super().__init__(message=message, param=param, status=400, type="invalid_audio")


class PayloadTooLargeError(WhisperTritonError):
    def __init__(self, message: str, param: str | None = "audio"):
        super().__init__(message=message, param=param, status=413, type="payload_too_large")


def invalid_parameter(param: str, message: str) -> WhisperTritonError:
    return WhisperTritonError(message=message, param=param, status=400, type="invalid_request_error")


class OverloadedError(WhisperTritonError):
    """The service is at its configured bound: come back after `retry_after_s` (429 or 503)."""

    def __init__(self, message: str, status: int, retry_after_s: int):
        kind = "rate_limit_exceeded" if status == 429 else "service_unavailable"
        super().__init__(message=message, param=None, status=status, type=kind)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}
