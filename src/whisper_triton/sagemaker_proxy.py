"""The SageMaker container contract in front of Triton: GET /ping and POST /invocations.

The proxy decodes audio (so bad input is refused before it costs GPU time), then calls the
Triton `whisper` model over one shared async gRPC client.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .audio import SAMPLE_RATE, decode_audio
from .engines.base import DecodeOptions
from .errors import PayloadTooLargeError, WhisperTritonError, invalid_parameter
from .settings import Settings

logger = logging.getLogger(__name__)

WHISPER_MODEL = "whisper"
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]*\|>")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}$")
_AUDIO_TYPES = ("application/octet-stream",)
_OUTPUT_TYPES = ("application/json", "text/plain")


class InvocationOptions(BaseModel):
    """Options of one transcription request (JSON fields, query parameters or custom attributes)."""

    model_config = ConfigDict(extra="forbid")

    language: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = Field(default=None, max_length=2000)
    beam_size: int = 1
    max_new_tokens: int = 448
    temperature: float = 0.0
    repetition_penalty: float = 1.0

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(
            beam_size=self.beam_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            repetition_penalty=self.repetition_penalty,
        ).validate()

    def text_prefix(self) -> str:
        prefix = ""
        if self.prompt and self.prompt.strip():
            prefix += "<|startofprev|>" + _SPECIAL_TOKEN_RE.sub("", self.prompt).strip()
        prefix += "<|startoftranscript|>"
        if self.language:
            prefix += f"<|{self.language}|>"
        return prefix + f"<|{self.task}|><|notimestamps|>"


def parse_options(raw: dict) -> InvocationOptions:
    try:
        options = InvocationOptions(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())) or None
        allowed = ", ".join(InvocationOptions.model_fields)
        hint = f" Allowed options: {allowed}." if first.get("type") == "extra_forbidden" else ""
        raise invalid_parameter(param or "options", f"Invalid option {param}: {first.get('msg')}.{hint}") from None
    if options.language is not None:
        options.language = options.language.strip().lower()
        if not _LANGUAGE_RE.match(options.language):
            raise invalid_parameter(
                "language", f"Unknown language code {options.language!r}: use a Whisper code such as 'en' or 'de'."
            )
    options.decode_options()
    return options


@dataclass
class Invocation:
    audio: np.ndarray
    options: InvocationOptions


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
        if media in _OUTPUT_TYPES:
            return media
        if media in ("*/*", "application/*", ""):
            return "application/json"
        if media == "text/*":
            return "text/plain"
    raise WhisperTritonError(
        message=f"Cannot answer with {accept!r}: use Accept application/json or text/plain.",
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
    body = await read_body(request, settings.max_body_bytes)
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
    options = parse_options(raw_options)
    audio = await anyio.to_thread.run_sync(decode_audio, audio_bytes, settings.max_audio_seconds)
    return Invocation(audio=audio, options=options)


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


class TritonWhisperClient:
    """One shared async gRPC client to Triton's `whisper` model."""

    def __init__(self, url: str, timeout_s: float):
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout_s = timeout_s

    async def ready(self) -> bool:
        try:
            return bool(
                await self.client.is_server_ready(client_timeout=1.5)
                and await self.client.is_model_ready(WHISPER_MODEL, client_timeout=1.5)
            )
        except Exception:  # any failure to answer means not ready
            return False

    async def transcribe(self, invocation: Invocation) -> dict:
        from tritonclient.utils import InferenceServerException

        grpc = self._grpc
        audio = invocation.audio.reshape(1, -1)
        inputs = [grpc.InferInput("WAV", list(audio.shape), "FP32"),
                  grpc.InferInput("WAV_LENS", [1, 1], "INT32"),
                  grpc.InferInput("TEXT_PREFIX", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(audio)
        inputs[1].set_data_from_numpy(np.array([[audio.shape[1]]], dtype=np.int32))
        inputs[2].set_data_from_numpy(np.array([[invocation.options.text_prefix().encode()]], dtype=object))
        decode = invocation.options.decode_options()
        for name, value, dtype in (("BEAM_SIZE", decode.beam_size, np.int32),
                                   ("MAX_NEW_TOKENS", decode.max_new_tokens, np.int32),
                                   ("TEMPERATURE", decode.temperature, np.float32),
                                   ("REPETITION_PENALTY", decode.repetition_penalty, np.float32)):
            tensor = grpc.InferInput(name, [1, 1], "INT32" if dtype is np.int32 else "FP32")
            tensor.set_data_from_numpy(np.array([[value]], dtype=dtype))
            inputs.append(tensor)
        outputs = [grpc.InferRequestedOutput("TRANSCRIPTS"), grpc.InferRequestedOutput("LANGUAGE")]
        try:
            result = await self.client.infer(WHISPER_MODEL, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _from_triton(exc) from None
        return {
            "text": result.as_numpy("TRANSCRIPTS").reshape(-1)[0].decode("utf-8"),
            "language": result.as_numpy("LANGUAGE").reshape(-1)[0].decode("utf-8"),
            "duration": round(audio.shape[1] / SAMPLE_RATE, 3),
        }

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
        app.state.triton = TritonWhisperClient(url, settings.request_timeout_s)
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

    @app.post("/invocations")
    async def invocations(request: Request):
        output_type = choose_output_type(request.headers.get("accept"))
        invocation = await parse_invocation(request, settings)
        result = await request.app.state.triton.transcribe(invocation)
        if output_type == "text/plain":
            return PlainTextResponse(result["text"])
        return JSONResponse(result)

    return app


__all__ = ["create_app", "InvocationOptions", "choose_output_type"]
