"""Serving OpenAI's audio API: the multipart form -> (audio, the one request model), the served
models, and the results rendered as OpenAI's bodies and Server-Sent Events. The routes are in
`openai_router`, the shapes in `openai_protocol`.

The same limits as /invocations hold: the body cap (refused with 413 while the body streams in,
before it is read whole), the options' ranges (`contract.options.parse_options`), and the model's
own checks (language, task, word timestamps), which Triton's `transcribe` models run.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from ..contract.languages import LANGUAGE_NAMES, language_name
from ..contract.options import TranscribeOptions, parse_options, validated
from ..errors import InvalidAudioError, PayloadTooLargeError, WhisperTritonError, invalid_parameter
from ..pipeline.formats import render
from ..settings import Settings
from .openai_protocol import (
    OPENAI_FIELDS, STREAMING_FORMATS, AudioRequest, ModelCard, ModelList, ServerVad, TextDeltaEvent, TextDoneEvent,
    TextSegmentEvent, TranscriptionDiarized, TranscriptionDiarizedSegment, TranscriptionJson, TranscriptionSegment,
    TranscriptionVerbose, TranscriptionWord, Usage, error_body, sse,
)
from .parsing import media_type, speaker_references

_LIST_FIELDS = {"timestamp_granularities[]": "timestamp_granularities",
                "timestamp_granularities": "timestamp_granularities",
                "known_speaker_names[]": "known_speaker_names", "known_speaker_names": "known_speaker_names",
                "known_speaker_references[]": "known_speaker_references",
                "known_speaker_references": "known_speaker_references"}

_CODES_BY_NAME = {name: code for code, name in LANGUAGE_NAMES.items()}


# ---- the multipart form ---------------------------------------------------------------------
@dataclass
class AudioForm:
    audio: bytes
    filename: str
    fields: dict[str, list[str]]


async def capped_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request is {int(declared)} bytes; the limit is {limit} bytes.", param="file")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The request is over the limit of {limit} bytes.", param="file")
        yield chunk


async def read_form(request: Request, limit: int) -> AudioForm:
    """OpenAI's multipart form: exactly one file part named `file`, the rest text fields."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise WhisperTritonError("Send multipart/form-data with the audio in a `file` part (as OpenAI's SDKs do).",
                                 "file", 415, "unsupported_media_type")
    parser = MultiPartParser(request.headers, capped_stream(request, limit), max_files=2, max_fields=64)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise invalid_parameter("file", f"The multipart body cannot be read: {exc.message}") from None
    files: list[tuple[str, UploadFile]] = []
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((key, value))
        else:
            fields.setdefault(key, []).append(value)
    try:
        return AudioForm(await _one_file(files), files[0][1].filename or "", fields)
    finally:
        await form.close()


async def _one_file(files) -> bytes:
    if not files:
        raise invalid_parameter("file", "The form has no `file` part: send the audio file as `file`.")
    if len(files) > 1:
        raise invalid_parameter("file", f"The form has {len(files)} file parts ({', '.join(k for k, _ in files)}); "
                                "send one audio file, as `file`.")
    name, upload = files[0]
    if name != "file":
        raise invalid_parameter("file", f"The audio file came as {name!r}: name the part `file`.")
    audio = await upload.read()
    if not audio:
        raise InvalidAudioError("The `file` part is empty: send the audio file's bytes.", param="file")
    return audio


# ---- form fields -> the one request model -----------------------------------------------------
def openai_fields(fields: dict[str, list[str]]) -> tuple[dict, dict]:
    """(OpenAI's fields, our extra option fields), each given once (granularities may repeat)."""
    ours, theirs = {}, {}
    for key, values in fields.items():
        if key in ("timestamp_granularities[]", "timestamp_granularities"):
            theirs.setdefault("timestamp_granularities", []).extend(v for value in values for v in value.split(",") if v)
            continue
        if key in _LIST_FIELDS:  # repeated fields, as the SDKs send lists
            theirs.setdefault(_LIST_FIELDS[key], []).extend(values)
            continue
        if key.startswith("chunking_strategy[") and key.endswith("]"):  # the SDK's form of an object
            if len(values) > 1:
                raise invalid_parameter("chunking_strategy", f"{key!r} is given {len(values)} times; give it once.")
            strategy = theirs.setdefault("chunking_strategy", {})
            if not isinstance(strategy, dict):
                raise invalid_parameter("chunking_strategy", "chunking_strategy is given both as a word and an object.")
            strategy[key[len("chunking_strategy[") : -1]] = values[0]
            continue
        if len(values) > 1:
            raise invalid_parameter(key, f"{key!r} is given {len(values)} times; give it once.")
        if key == "include[]":
            raise invalid_parameter("include", "include[] (logprobs) is not supported by Whisper models here.")
        if key in ("task", "word_timestamps", "initial_prompt", "include_tokens"):
            raise invalid_parameter(key, f"{key!r} is set by the endpoint and its OpenAI fields (translations, "
                                    "prompt, timestamp_granularities[], response_format); leave it out.")
        if key == "chunking_strategy" and isinstance(theirs.get(key), dict):
            raise invalid_parameter("chunking_strategy", "chunking_strategy is given both as a word and an object.")
        (theirs if key in OPENAI_FIELDS else ours)[key] = _chunking(values[0]) if key == "chunking_strategy" else values[0]
    return theirs, ours


def _chunking(value: str):
    """"auto", or a JSON object (a client that sends the object as one field)."""
    import json

    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            raise invalid_parameter("chunking_strategy", "chunking_strategy is not valid JSON.") from None
    return text


def language_code(value: str | None) -> str | None:
    """OpenAI takes ISO-639-1 codes; a language's English name ("german") is taken too."""
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    return _CODES_BY_NAME.get(value, value)


def audio_request(fields: dict, task: str) -> tuple[AudioRequest, list[bytes] | None]:
    """The OpenAI fields checked, and the known speakers' reference clips (data URLs -> bytes)."""
    fields = dict(fields)
    references = speaker_references(fields.pop("known_speaker_references", None))
    request: AudioRequest = validated(AudioRequest, fields)
    if request.response_format == "diarized_json" and task == "translate":
        raise invalid_parameter("response_format", "diarized_json is a format of /v1/audio/transcriptions; "
                                "translations answer json, text, srt, verbose_json or vtt.")
    if request.response_format == "diarized_json" and request.timestamp_granularities:
        raise invalid_parameter("timestamp_granularities", "timestamp_granularities[] is not available with "
                                "diarized_json (as in OpenAI's API); use verbose_json, or diarize=true with it.")
    if (request.known_speaker_names or references) and len(request.known_speaker_names) != len(references or []):
        raise invalid_parameter("known_speaker_names" if request.known_speaker_names else "known_speaker_references",
                                f"known_speaker_names[] has {len(request.known_speaker_names)} names and "
                                f"known_speaker_references[] {len(references or [])} clips: give one clip per name.")
    if request.timestamp_granularities and request.response_format != "verbose_json":
        raise invalid_parameter("timestamp_granularities", "timestamp_granularities[] needs response_format "
                                f"verbose_json (got {request.response_format!r}), as in OpenAI's API.")
    if request.stream and request.response_format not in STREAMING_FORMATS:
        raise invalid_parameter("response_format", f"stream=true sends text events: use response_format "
                                f"{' or '.join(STREAMING_FORMATS)}, not {request.response_format!r}.")
    if task == "translate" and request.language is not None:
        raise invalid_parameter("language", "Translations are always into English: leave `language` out, or use "
                                "/v1/audio/transcriptions to transcribe in a given language.")
    return request, references


def transcribe_options(request: AudioRequest, extra: dict, task: str) -> TranscribeOptions:
    raw: dict = dict(extra)
    raw["task"] = task
    if language_code(request.language):
        raw["language"] = language_code(request.language)
    if request.prompt:
        raw["initial_prompt"] = request.prompt
    if request.temperature:  # 0 (or unset): start at 0 and fall back to higher temperatures, as OpenAI does
        raw["temperature"] = [request.temperature]
    if "word" in request.timestamp_granularities:
        raw["word_timestamps"] = True
    if request.response_format == "verbose_json":
        raw["include_tokens"] = True
    if request.response_format == "diarized_json" or request.known_speaker_names:
        raw["diarize"] = True
    if request.known_speaker_names:
        raw["known_speaker_names"] = request.known_speaker_names
    if isinstance(request.chunking_strategy, ServerVad):
        vad = request.chunking_strategy
        for ours, value in (("vad_speech_pad_ms", vad.prefix_padding_ms), ("vad_min_silence_ms", vad.silence_duration_ms),
                            ("vad_threshold", vad.threshold)):
            if value is not None:
                raw[ours] = value
    return parse_options(raw)


# ---- the served models ---------------------------------------------------------------------
def model_list(registry, created: int) -> ModelList:
    """Every model of the endpoint with its capabilities and state, then each alias naming it (`root`)."""
    cards = []
    for view in registry.views():
        status = {"state": view.state, "default": view.default, "source": view.source, "memory_mb": view.memory_mb,
                  "rss_mb": view.rss_mb, "in_use": view.in_use, "loads": view.loads, "unloads": view.unloads,
                  "load_seconds": view.load_seconds}
        capabilities = view.capabilities or ({"card": view.card} if view.card else None)
        cards.append(ModelCard(id=view.id, created=created, capabilities=capabilities, status=status))
        cards += [ModelCard(id=alias, created=created, root=view.id) for alias in view.aliases if alias != view.id]
    return ModelList(data=cards)


# ---- results -> OpenAI's bodies -------------------------------------------------------------
def usage(result: dict) -> Usage:
    return Usage(seconds=float(math.ceil(result.get("duration", 0.0))))


def verbose(result: dict, request: AudioRequest, task: str) -> TranscriptionVerbose:
    granularities = request.timestamp_granularities or ["segment"]
    segments = words = None
    if "segment" in granularities:
        segments = [TranscriptionSegment(
            id=s["id"], seek=int(round(s["start"] * 100)), start=s["start"], end=s["end"], text=s["text"],
            tokens=s.get("tokens", []), temperature=s.get("temperature", 0.0), avg_logprob=s.get("avg_logprob", 0.0),
            compression_ratio=s.get("compression_ratio", 0.0), no_speech_prob=s.get("no_speech_prob", 0.0),
        ) for s in result["segments"]]
    if "word" in granularities:
        words = [TranscriptionWord(word=w["word"].strip(), start=w["start"], end=w["end"])
                 for s in result["segments"] for w in (s.get("words") or [])]
    return TranscriptionVerbose(task=task, language=language_name(result.get("language", "")),
                                duration=result.get("duration", 0.0), text=result.get("text", ""),
                                segments=segments, words=words, usage=usage(result))


def diarized_segment(segment: dict) -> TranscriptionDiarizedSegment:
    return TranscriptionDiarizedSegment(id=f"seg_{segment['id']}", start=segment["start"], end=segment["end"],
                                        text=segment["text"], speaker=segment.get("speaker") or "A")


def diarized(result: dict) -> TranscriptionDiarized:
    return TranscriptionDiarized(duration=result.get("duration", 0.0), text=result.get("text", ""),
                                 segments=[diarized_segment(s) for s in result["segments"]], usage=usage(result))


def body(result: dict, request: AudioRequest, task: str) -> tuple[str | dict, str]:
    """(body, response format) for one finished result."""
    fmt = request.response_format
    if fmt == "diarized_json":
        return diarized(result).model_dump(exclude_none=True), fmt
    if fmt == "json":
        return TranscriptionJson(text=result.get("text", ""), usage=usage(result)).model_dump(exclude_none=True), fmt
    if fmt == "verbose_json":
        return verbose(result, request, task).model_dump(exclude_none=True), fmt
    rendered = render(result, fmt)
    return (rendered if fmt != "text" or rendered.endswith("\n") else rendered + "\n"), fmt


async def text_events(chunks: AsyncIterator[dict], on_first_segment=None,
                      on_done=None, diarized_segments: bool = False) -> AsyncIterator[bytes]:
    """The stream's chunks as OpenAI's SSE: one `transcript.text.delta` per segment (with
    `diarized_segments`: one `transcript.text.segment`, with its speaker), in order, then
    `transcript.text.done` with the whole text. An error after the first byte goes as an event with
    OpenAI's error body (its SDK raises it)."""
    texts: list[str] = []
    try:
        async for chunk in chunks:
            for segment in chunk["segments"]:
                delta = segment["text"] if texts else segment["text"].lstrip()
                if not delta:
                    continue
                if not texts and on_first_segment is not None:
                    on_first_segment()
                texts.append(delta)
                if diarized_segments:
                    yield sse(TextSegmentEvent(**diarized_segment(segment).model_dump(exclude={"type"})))
                else:
                    yield sse(TextDeltaEvent(delta=delta, start=segment["start"], end=segment["end"]))
            if chunk.get("done"):
                if on_done is not None:
                    on_done(chunk)
                yield sse(TextDoneEvent(text="".join(texts).strip(), usage=usage(chunk)))
                return
    except WhisperTritonError as exc:
        yield sse(error_body(exc))
