"""The files written per input: the container's JSON answer rendered as JSON, text, SRT and WebVTT
(the clients' renderer, one cue per segment), at `<output prefix>/<input path>.<ext>`, so clip.wav and
clip.mp3 never collide."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..clients.formats import FORMATS, render
from .listing import BulkError, Location

DEFAULT_FORMATS = ("json", "text", "srt", "vtt")


def check_formats(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise BulkError(f"Unknown output format(s) {', '.join(unknown) or '(none)'}: use any of {', '.join(FORMATS)}.")
    return list(dict.fromkeys(names))


def extensions(formats: list[str]) -> list[str]:
    return [FORMATS[f][1] for f in formats]


@dataclass
class Transcript:
    """What one input came back as."""

    body: bytes  # the container's JSON
    language: str | None
    duration: float | None

    @classmethod
    def parse(cls, body: bytes) -> "Transcript":
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ValueError(f"the answer is not JSON: {body[:200]!r}") from exc
        if not isinstance(data, dict) or "text" not in data:
            raise ValueError(f"the answer has no transcript: {body[:200]!r}")
        duration = data.get("duration")
        return cls(body, data.get("language"), float(duration) if isinstance(duration, (int, float)) else None)


def write_outputs(s3: Any, target: Location, relative: str, transcript: Transcript, formats: list[str]) -> list[str]:
    """Every requested format of one transcript, written; their keys."""
    written = []
    for fmt in formats:
        media, ext = FORMATS[fmt]
        key = target.key(f"{relative}{ext}")
        text = render(transcript.body, "application/json", fmt)
        s3.put_object(Bucket=target.bucket, Key=key, Body=text.encode("utf-8"), ContentType=f"{media}; charset=utf-8")
        written.append(key)
    return written
