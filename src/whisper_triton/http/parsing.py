"""HTTP request -> (audio bytes, options): size cap before the body is read whole, Content-Type,
Accept, JSON and base64, options from query, SageMaker custom attributes and JSON fields, all parsed
by the one request model (`contract.options`)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import anyio
from fastapi import Request

from ..contract.json_limits import load_object
from ..contract.options import TranscribeOptions, parse_options
from ..errors import InvalidAudioError, PayloadTooLargeError, WhisperTritonError, invalid_parameter
from ..pipeline.formats import FORMATS
from ..settings import Settings
from .guards import clip

_AUDIO_TYPES = ("application/octet-stream",)
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
MAX_CUSTOM_ATTRIBUTES_CHARS = 1024  # SageMaker's own limit on the header
MAX_QUERY_CHARS = 16 * 1024  # two prompts of 8,192 characters fit; longer is not a set of options


STREAM_TYPES = ("application/jsonlines", "application/x-ndjson")  # Accept types answered as a stream


@dataclass
class Invocation:
    audio: bytes
    options: TranscribeOptions
    stream: bool = False  # answer JSON lines as segments are decoded (SageMaker response streaming)
    references: list[bytes] | None = None  # known speakers' clips (diarize), one per known_speaker_names entry


REFERENCES_PARAM = "known_speaker_references"
MAX_REFERENCES = 4


def data_url_bytes(value, param: str = REFERENCES_PARAM) -> bytes:
    """The bytes of a base64 data URL (`data:audio/wav;base64,...`), as OpenAI takes reference clips."""
    if not isinstance(value, str) or not value.startswith("data:"):
        raise invalid_parameter(param, f"Each of {param} must be a data URL (data:audio/wav;base64,...), "
                                "not a link or a file name.")
    header, comma, payload = value.partition(",")
    if not comma or not header.endswith(";base64"):
        raise invalid_parameter(param, f"{param}: the data URL must be base64 (data:<type>;base64,<data>).")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter(param, f"{param}: the data URL's base64 cannot be decoded.") from None


def speaker_references(values) -> list[bytes] | None:
    """Known speakers' reference clips from a list of data URLs (at most MAX_REFERENCES)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise invalid_parameter(REFERENCES_PARAM, f"{REFERENCES_PARAM} must be a list of data URLs.")
    if len(values) > MAX_REFERENCES:
        raise invalid_parameter(REFERENCES_PARAM, f"At most {MAX_REFERENCES} known speakers, got {len(values)}.")
    return [data_url_bytes(value) for value in values]


def stream_type(accept: str | None) -> str | None:
    """The streaming type the Accept header asks for first, if it asks for one."""
    for part in (accept or "").split(","):
        media = media_type(part)
        if media in STREAM_TYPES:
            return media
        if media in FORMATS or media in ("*/*", "application/*", "text/*"):
            return None
    return None


def wants_stream(value) -> bool:
    """`stream=true` (query or custom attribute): the same words a boolean option takes."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise invalid_parameter("stream", f"stream must be true or false, got {clip(str(value))!r}.")


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def custom_attributes(header: str | None) -> dict[str, str]:
    """`X-Amzn-SageMaker-Custom-Attributes: language=de,task=translate` (SageMaker passes it through)."""
    if header and len(header) > MAX_CUSTOM_ATTRIBUTES_CHARS:
        raise invalid_parameter(CUSTOM_ATTRIBUTES_HEADER, f"{CUSTOM_ATTRIBUTES_HEADER} is {len(header)} characters; "
                                f"SageMaker's limit is {MAX_CUSTOM_ATTRIBUTES_CHARS}.")
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
        media = media_type(part)
        if media in FORMATS:
            return media
        if media in ("*/*", "application/*", ""):
            return "application/json"
        if media == "text/*":
            return "text/plain"
    raise WhisperTritonError(
        message=f"Cannot answer with {clip(accept)!r}: use Accept {', '.join(FORMATS)}.",
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
    content_type = media_type(request.headers.get("content-type"))
    body = await read_body(request, settings.body_limit())
    query = request.url.query
    if len(query) > MAX_QUERY_CHARS:
        raise invalid_parameter("query", f"The query string is {len(query)} characters; the limit is {MAX_QUERY_CHARS}. "
                                "Send long options (prompts) in a JSON body.")
    raw_options: dict = {**custom_attributes(request.headers.get(CUSTOM_ATTRIBUTES_HEADER)),
                         **dict(request.query_params)}
    if content_type == "application/json":
        # decoding and validating megabytes of JSON takes the CPU for a while: off the event loop, so
        # /ping and every other request go on answering meanwhile
        return await anyio.to_thread.run_sync(_json_invocation, body, raw_options)
    if content_type in _AUDIO_TYPES or content_type.startswith(("audio/", "video/")) or not content_type:
        # boto3 sends no Content-Type when the caller gives none: treat the body as audio
        audio_bytes = body
    else:
        raise WhisperTritonError(
            message=f"Unsupported Content-Type {clip(content_type)!r}: send audio/* or application/octet-stream "
            'with the file\'s bytes, or application/json {"audio": "<base64>"}.',
            param="Content-Type", status=415, type="unsupported_media_type",
        )
    return _invocation(audio_bytes, raw_options)


def _json_invocation(body: bytes, raw_options: dict) -> Invocation:
    audio_bytes, json_options = parse_json_body(body)
    references = speaker_references(json_options.pop(REFERENCES_PARAM, None))
    return _invocation(audio_bytes, {**raw_options, **json_options}, references)


def _invocation(audio_bytes: bytes, raw_options: dict, references: list[bytes] | None = None) -> Invocation:
    if not audio_bytes:
        raise InvalidAudioError("The request body is empty: send the audio file's bytes.")
    if REFERENCES_PARAM in raw_options:
        raise invalid_parameter(REFERENCES_PARAM, f"Send {REFERENCES_PARAM} in a JSON body "
                                '({"audio": "<base64>", "known_speaker_references": ["data:audio/wav;base64,..."]}).')
    stream = wants_stream(raw_options.pop("stream", False))
    return Invocation(audio=audio_bytes, options=parse_options(raw_options), stream=stream, references=references)


def parse_json_body(body: bytes) -> tuple[bytes, dict]:
    """`{"audio": "<base64>", option: value, ...}`; size is capped before (read_body), depth here."""
    payload = load_object(body, "body")
    encoded = payload.pop("audio", None)
    if not isinstance(encoded, str) or not encoded:
        raise invalid_parameter("audio", 'The JSON body needs "audio": the audio file\'s bytes in base64.')
    try:
        audio = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter("audio", '"audio" is not valid base64.') from None
    return audio, payload
