"""OpenAI's audio API as data: the form of `POST /v1/audio/transcriptions` and `/translations`, the
bodies it answers with (json, verbose_json, SSE events), `GET /v1/models` and the error shape.

Field names and meanings are OpenAI's (API reference: audio/createTranscription, the
`TranscriptionVerbose`, `TranscriptionSegment`, `TranscriptionWord`, `transcript.text.delta` /
`transcript.text.done` objects); extras are added only where they add and parsers ignore them.
No serving logic here: `openai_serving` maps these onto the one request model and the results.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..contract.options import PromptText, Temperature
from ..errors import WhisperTritonError

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]
RESPONSE_FORMATS: tuple[str, ...] = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
# json/text stream `transcript.text.delta` events; diarized_json `transcript.text.segment` events
STREAMING_FORMATS: tuple[str, ...] = ("json", "text", "diarized_json")
Granularity = Literal["segment", "word"]
GRANULARITIES: tuple[str, ...] = ("segment", "word")

# the OpenAI form fields (multipart), as the SDKs send them; every other field is one of ours
OPENAI_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature",
                 "timestamp_granularities[]", "timestamp_granularities", "stream", "chunking_strategy", "include[]",
                 "known_speaker_names[]", "known_speaker_names", "known_speaker_references[]", "known_speaker_references")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "diarized_json": "application/json",
               "text": "text/plain; charset=utf-8", "srt": "application/x-subrip; charset=utf-8",
               "vtt": "text/vtt; charset=utf-8"}
MAX_KNOWN_SPEAKERS = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerVad(_Strict):
    """chunking_strategy={"type": "server_vad", ...}: OpenAI's VAD settings, applied to our VAD."""

    type: Literal["server_vad"]
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=2_000)  # -> vad_speech_pad_ms
    silence_duration_ms: int | None = Field(default=None, ge=0, le=10_000)  # -> vad_min_silence_ms
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)  # -> vad_threshold


class AudioRequest(_Strict):
    """The OpenAI fields of one request (the file travels apart, as bytes)."""

    model: str | None = Field(default=None, max_length=256)
    language: str | None = Field(default=None, max_length=32)  # ISO-639-1; transcriptions only
    prompt: PromptText | None = None
    response_format: ResponseFormat = "json"
    # OpenAI: 0 lets the model raise the temperature on its own (our fallback); above 0 is used as it is
    temperature: Temperature | None = None
    timestamp_granularities: list[Granularity] = Field(default_factory=list, max_length=2)
    stream: bool = False
    # windows are always cut by VAD here; server_vad's settings tune it
    chunking_strategy: Literal["auto"] | ServerVad | None = None
    known_speaker_names: list[str] = Field(default_factory=list, max_length=MAX_KNOWN_SPEAKERS)


# ---- answers ----------------------------------------------------------------------------------
class Usage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionJson(BaseModel):
    text: str
    usage: Usage | None = None


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int  # the segment's start in 10 ms frames (openai-whisper counts seek in mel frames)
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str  # the language's English name, as OpenAI answers ("english")
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: Usage | None = None


class TextDeltaEvent(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    # extras: where on the file's timeline the delta's segment lies
    start: float | None = None
    end: float | None = None


class TranscriptionDiarizedSegment(BaseModel):
    type: Literal["transcript.text.segment"] = "transcript.text.segment"
    id: str  # "seg_0", "seg_1", ... (as OpenAI's service numbers them)
    start: float
    end: float
    text: str
    speaker: str  # "A", "B", ... in order of first appearance, or a known speaker's name


class TranscriptionDiarized(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    duration: float
    text: str
    segments: list[TranscriptionDiarizedSegment]
    usage: Usage | None = None


class TextSegmentEvent(TranscriptionDiarizedSegment):
    """The stream event of a diarized segment (OpenAI's `transcript.text.segment`: the segment's fields)."""


class TextDoneEvent(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "whisper-triton"
    root: str | None = None  # for an alias: the model it names
    capabilities: dict | None = None  # what the model's engine declares (contract/capabilities.py)
    status: dict | None = None  # loaded or not, default or not, memory budgeted and measured, loads


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status (its SDK picks the exception class by the status)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(exc: WhisperTritonError) -> ErrorBody:
    """OpenAI's error shape; `code` carries our error kind (e.g. payload_too_large, model_not_found)."""
    return ErrorBody(error=ErrorInfo(message=exc.message, type=error_type(exc.status), param=exc.param, code=exc.type))


def sse(event: BaseModel | dict) -> bytes:
    """One Server-Sent Event: `data: <json>` and a blank line (no `event:` line, as OpenAI sends them)."""
    payload = event.model_dump_json(exclude_none=True) if isinstance(event, BaseModel) else _json(event)
    return f"data: {payload}\n\n".encode()


def _json(value: dict) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)
