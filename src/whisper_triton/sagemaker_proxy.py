"""The SageMaker container contract in front of Triton: GET /ping and POST /invocations.

The proxy checks the HTTP side (size cap before reading, Content-Type, JSON, base64, options),
then hands the audio bytes to Triton's long-form `transcribe` model over one shared async gRPC
client, and renders the result as JSON, text, WebVTT or SRT.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import InvalidAudioError, PayloadTooLargeError, WhisperTritonError, invalid_parameter
from .formats import FORMATS, render
from .longform import TranscribeOptions
from .settings import Settings

logger = logging.getLogger(__name__)

TRANSCRIBE_MODEL = "transcribe"
PING_TIMEOUT_S = 1.5
WHISPER_MODEL = "whisper"
_AUDIO_TYPES = ("application/octet-stream",)
_OPTION_ALIASES = {"prompt": "initial_prompt"}


def parse_options(raw: dict) -> TranscribeOptions:
    """Options from JSON fields, query parameters or custom attributes (strings are coerced)."""
    values = {_OPTION_ALIASES.get(key, key): value for key, value in raw.items()}
    known = {f.name for f in fields(TranscribeOptions)}
    for key in values:
        if key not in known:
            raise invalid_parameter(key, f"Unknown option {key!r}. Known options: {', '.join(sorted(known))}.")
    try:
        options = TypeAdapter(TranscribeOptions).validate_python(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first.get("loc", ("options",))[0])
        raise invalid_parameter(param, f"Invalid option {param}: {first.get('msg')}.") from None
    return options.validate()


@dataclass
class Invocation:
    audio: bytes
    options: TranscribeOptions


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def _custom_attributes(header: str | None) -> dict[str, str]:
    """`X-Amzn-SageMaker-Custom-Attributes: language=de,task=translate` (SageMaker passes it through)."""
    pairs = {}
    for part in re.split(r"[,;]", header or ""):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def choose_output_type(accept: str | None) -> str:
    """The first supported type in the Accept header; JSON when the client accepts anything."""
    if not accept:
        return "application/json"
    for part in accept.split(","):
        media = _media_type(part)
        if media in FORMATS:
            return media
        if media in ("*/*", "application/*", ""):
            return "application/json"
        if media == "text/*":
            return "text/plain"
    raise WhisperTritonError(
        message=f"Cannot answer with {accept!r}: use Accept {', '.join(FORMATS)}.",
        param="Accept", status=406, type="not_acceptable",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is read whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The body is {int(declared)} bytes; the limit is {limit} bytes.", param="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The body is over the limit of {limit} bytes.", param="body")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_invocation(request: Request, settings: Settings) -> Invocation:
    content_type = _media_type(request.headers.get("content-type"))
    body = await read_body(request, settings.body_limit())
    raw_options: dict = {**_custom_attributes(request.headers.get("x-amzn-sagemaker-custom-attributes")),
                         **dict(request.query_params)}
    if content_type == "application/json":
        audio_bytes, json_options = _parse_json_body(body)
        raw_options.update(json_options)
    elif content_type in _AUDIO_TYPES or content_type.startswith(("audio/", "video/")) or not content_type:
        # boto3 sends no Content-Type when the caller gives none: treat the body as audio
        audio_bytes = body
    else:
        raise WhisperTritonError(
            message=f"Unsupported Content-Type {content_type!r}: send audio/* or application/octet-stream "
            'with the file\'s bytes, or application/json {"audio": "<base64>"}.',
            param="Content-Type", status=415, type="unsupported_media_type",
        )
    if not audio_bytes:
        raise InvalidAudioError("The request body is empty: send the audio file's bytes.")
    return Invocation(audio=audio_bytes, options=parse_options(raw_options))


def _parse_json_body(body: bytes) -> tuple[bytes, dict]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_parameter("body", f"The body is not valid JSON ({exc}).") from None
    if not isinstance(payload, dict):
        raise invalid_parameter("body", 'The JSON body must be an object: {"audio": "<base64>", ...}.')
    encoded = payload.pop("audio", None)
    if not isinstance(encoded, str) or not encoded:
        raise invalid_parameter("audio", 'The JSON body needs "audio": the audio file\'s bytes in base64.')
    try:
        audio = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter("audio", '"audio" is not valid base64.') from None
    return audio, payload


class TritonTranscribeClient:
    """One shared async gRPC client to Triton's long-form `transcribe` model."""

    def __init__(self, url: str, timeout_s: float):
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout_s = timeout_s

    async def ready(self) -> bool:
        async def check() -> bool:
            return bool(await self.client.is_server_ready()
                        and await self.client.is_model_ready(WHISPER_MODEL)
                        and await self.client.is_model_ready(TRANSCRIBE_MODEL))

        try:  # SageMaker wants /ping answered within 2 s
            return await asyncio.wait_for(check(), timeout=PING_TIMEOUT_S)
        except Exception:  # any failure to answer in time means not ready
            return False

    async def transcribe(self, invocation: Invocation) -> dict:
        from tritonclient.utils import InferenceServerException

        grpc = self._grpc
        audio = grpc.InferInput("AUDIO", [1], "BYTES")
        audio.set_data_from_numpy(np.array([invocation.audio], dtype=object))
        options = grpc.InferInput("OPTIONS", [1], "BYTES")
        options.set_data_from_numpy(np.array([json.dumps(asdict(invocation.options)).encode()], dtype=object))
        try:
            result = await self.client.infer(TRANSCRIBE_MODEL, [audio, options],
                                             outputs=[grpc.InferRequestedOutput("RESULT")],
                                             client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _from_triton(exc) from None
        return json.loads(result.as_numpy("RESULT").reshape(-1)[0])

    async def close(self) -> None:
        await self.client.close()


def _from_triton(exc) -> WhisperTritonError:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    decoded = WhisperTritonError.decode(message or "")
    if decoded is not None:
        return decoded
    status = str(exc.status() or "")
    if "UNAVAILABLE" in status:
        return WhisperTritonError("Triton is not available; retry shortly.", None, 503, "service_unavailable")
    if "DEADLINE_EXCEEDED" in status:
        return WhisperTritonError("Transcription took longer than the request timeout.", None, 504, "timeout")
    return WhisperTritonError(f"Triton failed: {message}", None, 500, "engine_error")


def error_response(exc: WhisperTritonError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.to_dict())


def create_app(settings: Settings, triton_url: str | None = None) -> FastAPI:
    url = triton_url or f"127.0.0.1:{settings.triton_grpc_port}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonTranscribeClient(url, settings.request_timeout_s)
        try:
            yield
        finally:
            await app.state.triton.close()

    app = FastAPI(title="whisper-triton", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(WhisperTritonError)
    async def _handle_known(request: Request, exc: WhisperTritonError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _handle_http(request: Request, exc: StarletteHTTPException):
        return error_response(WhisperTritonError(str(exc.detail), None, exc.status_code, "http_error"))

    @app.exception_handler(Exception)
    async def _handle_unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(WhisperTritonError(f"Internal error: {type(exc).__name__}", None, 500, "internal_error"))

    @app.get("/ping")
    async def ping(request: Request):
        if await request.app.state.triton.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/execution-parameters")
    async def execution_parameters():
        # batch transform asks this once at start; it caps what it sends with these values
        return JSONResponse({
            "MaxConcurrentTransforms": settings.max_concurrent_transforms,
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": max(1, settings.body_limit() // (1024 * 1024)),
        })

    @app.post("/invocations")
    async def invocations(request: Request):
        output_type = choose_output_type(request.headers.get("accept"))
        invocation = await parse_invocation(request, settings)
        result = await request.app.state.triton.transcribe(invocation)
        if output_type == "application/json":
            return JSONResponse(result)
        return Response(render(result, FORMATS[output_type]), media_type=output_type)

    return app


__all__ = ["create_app", "parse_options", "choose_output_type"]
