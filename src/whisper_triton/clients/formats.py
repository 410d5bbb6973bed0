"""Output formats of the clients: what to ask the endpoint for, and how to turn its answer into a file.

The container answers application/json, text/plain, text/vtt or application/x-subrip. For SubRip and
WebVTT the clients ask for the subtitle type first and JSON second, so an endpoint that only answers
JSON still gives subtitles: rendered locally with the server's own renderer (one cue per segment, or
one cue over the whole clip).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline.formats import render as subtitles

FORMATS: dict[str, tuple[str, str]] = {  # name -> (media type, file suffix)
    "text": ("text/plain", ".txt"),
    "json": ("application/json", ".json"),
    "srt": ("application/x-subrip", ".srt"),
    "vtt": ("text/vtt", ".vtt"),
}

AUDIO_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".oga": "audio/ogg",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",
    ".aac": "audio/aac",
    ".webm": "audio/webm",
}


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ValueError(f"Unknown output format {name!r}: use one of {', '.join(FORMATS)}.")
    return name


def accept_header(fmt: str) -> str:
    media = FORMATS[check_format(fmt)][0]
    if fmt in ("srt", "vtt"):
        return f"{media}, application/json;q=0.9"
    return media


def content_type_for(path: Path) -> str:
    return AUDIO_TYPES.get(path.suffix.lower(), "application/octet-stream")


def output_path_for(path: Path, fmt: str) -> Path:
    """Next to the input, keeping its whole name (clip.wav -> clip.wav.txt), so clip.wav and clip.mp3 never collide."""
    return path.with_name(path.name + FORMATS[check_format(fmt)][1])


def error_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".error.txt")


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def render(body: bytes, content_type: str | None, fmt: str) -> str:
    """The file content in `fmt` from the endpoint's answer."""
    check_format(fmt)
    media = _media(content_type)
    text = body.decode("utf-8", errors="replace")
    if media == FORMATS[fmt][0]:
        if fmt == "json":
            return json.dumps(json.loads(text), ensure_ascii=False, indent=2) + "\n"
        return text.strip() + "\n" if fmt == "text" else text
    if media == "application/json":
        data = json.loads(text)
    elif media.startswith("text/"):
        data = {"text": text.strip()}
    else:
        raise ValueError(f"The endpoint answered {content_type!r}, which cannot be turned into {fmt}.")
    if fmt == "text":
        return str(data.get("text", "")).strip() + "\n"
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    return subtitles({"segments": _segments(data)}, fmt)


def _segments(data: dict) -> list[dict]:
    segments = data.get("segments")
    if isinstance(segments, list) and segments:
        return [
            {"start": float(s.get("start", 0.0)), "end": float(s.get("end", 0.0)), "text": str(s.get("text", "")).strip()}
            for s in segments
            if str(s.get("text", "")).strip()
        ]
    text = str(data.get("text", "")).strip()
    if not text:
        return []
    return [{"start": 0.0, "end": float(data.get("duration") or 0.0), "text": text}]

