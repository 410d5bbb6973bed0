"""The events of a live transcription session: OpenAI's Realtime transcription protocol, as the
`openai` Python SDK speaks it (`client.realtime.connect(extra_query={"intent": "transcription"})`),
on `/v1/realtime` and on SageMaker's `/invocations-bidirectional-stream`.

The shapes follow the SDK's own types (`openai.types.realtime`): `session.update` with a
`transcription` session (`audio.input.format`, `.transcription`, `.turn_detection`),
`input_audio_buffer.append` / `.commit` / `.clear` from the client; `session.created` / `.updated`,
`input_audio_buffer.speech_started` / `.speech_stopped` / `.committed` / `.cleared`,
`conversation.item.input_audio_transcription.delta` / `.completed` / `.failed` and `error` from the
server. `tests/test_realtime_contract.py` parses every server event here with the SDK's models.

A bad client event is answered with an `error` event in OpenAI's shape (`type`, `code`, `message`,
`param`, `event_id` of the event that caused it) and the session goes on.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_EVENT_BYTES = 16 * 1024 * 1024  # OpenAI takes appends of up to 15 MiB of audio (base64 adds a third)
MIN_COMMIT_MS = 100  # OpenAI refuses a commit of less than 100 ms of audio
PCM_RATE = 24_000  # audio/pcm: 16-bit little-endian mono at 24 kHz, the only rate OpenAI takes
G711_RATE = 8_000  # audio/pcmu, audio/pcma: G.711 at 8 kHz, as telephony sends it


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """Fields OpenAI defines but this server does not act on are accepted and kept (the SDK sends them)."""

    model_config = ConfigDict(extra="allow")


# ---- the session -----------------------------------------------------------------------------
class AudioPCM(_Strict):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = PCM_RATE


class AudioPCMU(_Strict):
    type: Literal["audio/pcmu"] = "audio/pcmu"


class AudioPCMA(_Strict):
    type: Literal["audio/pcma"] = "audio/pcma"


AudioFormat = Annotated[Union[AudioPCM, AudioPCMU, AudioPCMA], Field(discriminator="type")]


class Transcription(_Open):
    model: str | None = None
    language: Annotated[str, Field(max_length=32)] | None = None
    prompt: Annotated[str, Field(max_length=8_192)] | None = None


class ServerVad(_Open):
    """Turn detection on the server (Silero VAD here): OpenAI's fields and defaults."""

    type: Literal["server_vad"] = "server_vad"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    prefix_padding_ms: Annotated[int, Field(ge=0, le=5_000)] = 300
    silence_duration_ms: Annotated[int, Field(ge=100, le=10_000)] = 500


class AudioInput(_Open):
    format: AudioFormat = Field(default_factory=AudioPCM)
    transcription: Transcription = Field(default_factory=Transcription)
    turn_detection: ServerVad | None = Field(default_factory=ServerVad)
    noise_reduction: dict | None = None


class SessionAudio(_Open):
    input: AudioInput = Field(default_factory=AudioInput)


class TranscriptionSession(_Open):
    """The effective configuration of a session (what `session.created` / `.updated` carry)."""

    type: Literal["transcription"] = "transcription"
    id: str = Field(default_factory=lambda: new_id("sess"))
    object: str = "realtime.transcription_session"
    audio: SessionAudio = Field(default_factory=SessionAudio)
    include: list[str] | None = None

    def updated(self, update: "SessionUpdate") -> "TranscriptionSession":
        """This session with the fields the update names replaced (absent fields stay as they are;
        `turn_detection: null` switches to manual commits), as OpenAI's `session.update` does."""
        merged = self.model_dump()
        patch = update.session.model_dump(exclude_unset=True)
        patch.pop("type", None)
        _merge(merged, patch)
        return TranscriptionSession.model_validate(merged)


def _merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in ("format", "turn_detection"):
            _merge(base[key], value)
        elif key == "turn_detection" and isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value


# ---- client events ---------------------------------------------------------------------------
class _PartialInput(_Open):
    format: AudioFormat | None = None
    transcription: Transcription | None = None
    turn_detection: ServerVad | None = None
    noise_reduction: dict | None = None


class _PartialAudio(_Open):
    input: _PartialInput | None = None


class _SessionPatch(_Open):
    type: Literal["transcription"]
    audio: _PartialAudio | None = None
    include: list[str] | None = None


class SessionUpdate(_Strict):
    type: Literal["session.update"]
    event_id: str | None = None
    session: _SessionPatch


class AudioAppend(_Strict):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str

    def audio_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("`audio` is not valid base64: send the audio bytes base64-encoded.",
                             "invalid_value", "audio", self.event_id) from None


class AudioCommit(_Strict):
    type: Literal["input_audio_buffer.commit"]
    event_id: str | None = None


class AudioClear(_Strict):
    type: Literal["input_audio_buffer.clear"]
    event_id: str | None = None


ClientEvent = Annotated[Union[SessionUpdate, AudioAppend, AudioCommit, AudioClear], Field(discriminator="type")]
_CLIENT_EVENT: TypeAdapter = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                      "input_audio_buffer.clear")


class EventError(Exception):
    """A client event this server refuses: becomes an `error` event; the session goes on."""

    def __init__(self, message: str, code: str, param: str | None = None, event_id: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.event_id, self.type = message, code, param, event_id, type_

    def event(self) -> "ErrorEvent":
        return ErrorEvent(error=RealtimeError(type=self.type, code=self.code, message=self.message, param=self.param,
                                              event_id=self.event_id))


def parse_client_event(data: str | bytes) -> SessionUpdate | AudioAppend | AudioCommit | AudioClear:
    """One client event from a WebSocket message, or an EventError naming what is wrong."""
    if len(data) > MAX_EVENT_BYTES:
        raise EventError(f"The event is {len(data)} bytes; the limit is {MAX_EVENT_BYTES} bytes: send audio in "
                         "smaller appends.", "event_too_large")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise EventError("The message is not a JSON event: send one JSON object per message.",
                         "invalid_json") from None
    if not isinstance(raw, dict):
        raise EventError("The message is not a JSON object: send events as {\"type\": ..., ...}.", "invalid_json")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    kind = raw.get("type")
    if kind not in CLIENT_EVENT_TYPES:
        shown = repr(kind)[:60]
        raise EventError(f"Unknown or unsupported event type {shown} for a transcription session. Supported: "
                         f"{', '.join(CLIENT_EVENT_TYPES)}.", "invalid_value", "type", event_id)
    try:
        return _CLIENT_EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        parts = [str(part) for part in first.get("loc", ())]
        parts = parts[1:] if parts and parts[0] == kind else parts  # the union's tag: the event type
        path = ".".join(p for p in parts if "/" not in p and not p.startswith("function"))  # no format tags
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise EventError(f"Invalid {path or 'event'} in {kind}: {message}.", "invalid_value", path or None,
                         event_id) from None


# ---- server events ---------------------------------------------------------------------------
class _ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))

    def wire(self) -> str:
        return self.model_dump_json()


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: TranscriptionSession


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: TranscriptionSession


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class Committed(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None = None


class Cleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class TranscriptionDelta(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = \
        "conversation.item.input_audio_transcription.delta"
    item_id: str
    content_index: int = 0
    delta: str


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionCompleted(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = \
        "conversation.item.input_audio_transcription.completed"
    item_id: str
    content_index: int = 0
    transcript: str
    usage: DurationUsage


class FailureDetail(BaseModel):
    type: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None


class TranscriptionFailed(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = \
        "conversation.item.input_audio_transcription.failed"
    item_id: str
    content_index: int = 0
    error: FailureDetail


class RealtimeError(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(_ServerEvent):
    type: Literal["error"] = "error"
    error: RealtimeError


ServerEvent = Union[SessionCreated, SessionUpdated, SpeechStarted, SpeechStopped, Committed, Cleared,
                    TranscriptionDelta, TranscriptionCompleted, TranscriptionFailed, ErrorEvent]


def server_error(message: str, code: str, type_: str = "server_error") -> ErrorEvent:
    return ErrorEvent(error=RealtimeError(type=type_, code=code, message=message))


def as_json(event: Any) -> str:
    """A server event as the one JSON text message it travels in."""
    return event.wire() if isinstance(event, _ServerEvent) else json.dumps(event)
