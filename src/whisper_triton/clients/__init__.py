"""Application clients for a deployed endpoint: real-time (`invoke_endpoint`) and async
(`invoke_endpoint_async` + S3), plain boto3 so they run unchanged against AWS or the local emulator. May import `pipeline/`, `contract/`."""

from .asynchronous import AsyncInvokeOptions, AsyncResult, transcribe_async
from .formats import FORMATS, render
from .realtime import InvokeError, InvokeOptions, Transcript, runtime_client, transcribe_bytes, transcribe_file

__all__ = [
    "FORMATS",
    "AsyncInvokeOptions",
    "AsyncResult",
    "InvokeError",
    "InvokeOptions",
    "Transcript",
    "render",
    "runtime_client",
    "transcribe_async",
    "transcribe_bytes",
    "transcribe_file",
]
