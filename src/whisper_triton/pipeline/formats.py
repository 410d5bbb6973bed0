"""Transcription results as JSON, plain text, WebVTT and SubRip (SRT)."""

from __future__ import annotations

FORMATS = {
    "application/json": "json",
    "text/plain": "text",
    "text/vtt": "vtt",
    "application/x-subrip": "srt",
    "text/srt": "srt",
}


def _clock(seconds: float, separator: str) -> str:
    milliseconds = max(0, int(round(seconds * 1000)))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(result: dict) -> list[tuple[float, float, str]]:
    cues = []
    for segment in result.get("segments", []):
        text = " ".join(segment["text"].split())
        if text:
            cues.append((segment["start"], max(segment["end"], segment["start"] + 0.001), text))
    return cues


def to_text(result: dict) -> str:
    return result.get("text", "").strip()


def to_srt(result: dict) -> str:
    blocks = [f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
              for i, (start, end, text) in enumerate(_cues(result), start=1)]
    return "\n".join(blocks)


def to_vtt(result: dict) -> str:
    blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text}\n" for start, end, text in _cues(result)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(result: dict, output_format: str) -> str:
    if output_format == "text":
        return to_text(result)
    if output_format == "srt":
        return to_srt(result)
    if output_format == "vtt":
        return to_vtt(result)
    raise ValueError(f"unknown format {output_format}")
