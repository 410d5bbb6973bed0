"""Transcription results as JSON, plain text, WebVTT and SubRip (SRT), and RTTM for diarized ones.

With speakers (diarize=true) each cue says who speaks: WebVTT as a voice span (`<v A>text`, the
WebVTT way), SRT as a prefix (`A: text`, what subtitle editors show), plain text one line per
change of speaker; RTTM (NIST's Rich Transcription Time Marked, what diarization scorers read) lists
each speaker turn as a SPEAKER line."""

from __future__ import annotations

FORMATS = {
    "application/json": "json",
    "text/plain": "text",
    "text/vtt": "vtt",
    "application/x-subrip": "srt",
    "text/srt": "srt",
    "text/x-rttm": "rttm",
}


def _clock(seconds: float, separator: str) -> str:
    milliseconds = max(0, int(round(seconds * 1000)))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(result: dict) -> list[tuple[float, float, str, str | None]]:
    cues = []
    for segment in result.get("segments", []):
        text = " ".join(segment["text"].split())
        if text:
            cues.append((segment["start"], max(segment["end"], segment["start"] + 0.001), text, segment.get("speaker")))
    return cues


def _vtt_voice(speaker: str) -> str:
    """A speaker name as a WebVTT voice annotation may hold it (no '>', no line break; '&' escaped)."""
    return " ".join(speaker.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;").split())


def _vtt_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_text(result: dict) -> str:
    if not any(segment.get("speaker") for segment in result.get("segments", [])):
        return result.get("text", "").strip()
    lines: list[list] = []  # one line per change of speaker
    for _, _, text, speaker in _cues(result):
        if lines and lines[-1][0] == speaker:
            lines[-1][1].append(text)
        else:
            lines.append([speaker, [text]])
    return "\n".join(f"{speaker}: {' '.join(texts)}" if speaker else " ".join(texts) for speaker, texts in lines)


def to_srt(result: dict) -> str:
    blocks = [f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{f'{speaker}: ' if speaker else ''}{text}\n"
              for i, (start, end, text, speaker) in enumerate(_cues(result), start=1)]
    return "\n".join(blocks)


def to_vtt(result: dict) -> str:
    blocks = []
    for start, end, text, speaker in _cues(result):
        line = f"<v {_vtt_voice(speaker)}>{_vtt_text(text)}" if speaker else text
        blocks.append(f"{_clock(start, '.')} --> {_clock(end, '.')}\n{line}\n")
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_rttm(result: dict, file_id: str = "audio") -> str:
    """One SPEAKER line per speaker turn (the diarization's `turns`; the segments where a result has none):
    file, channel 1, onset, duration, speaker (spaces in names become '_')."""
    lines = []
    for turn in result.get("turns") or result.get("segments", []):
        speaker = "_".join(str(turn.get("speaker") or "unknown").split())
        duration = max(0.0, turn["end"] - turn["start"])
        lines.append(f"SPEAKER {file_id} 1 {turn['start']:.3f} {duration:.3f} <NA> <NA> {speaker} <NA> <NA>\n")
    return "".join(lines)


def render(result: dict, output_format: str) -> str:
    if output_format == "text":
        return to_text(result)
    if output_format == "srt":
        return to_srt(result)
    if output_format == "vtt":
        return to_vtt(result)
    if output_format == "rttm":
        return to_rttm(result)
    raise ValueError(f"unknown format {output_format}")
