"""Long audio -> windows of at most `chunk_length` seconds for the engine, on the file's timeline."""

from __future__ import annotations

from dataclasses import dataclass

from .audio import SAMPLE_RATE
from .vad import Span


@dataclass(frozen=True)
class Window:
    """A stretch of the file decoded as one Whisper window; `start`/`end` in samples."""

    start: int
    end: int

    @property
    def offset(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def fixed_windows(n_samples: int, chunk_length: float) -> list[Window]:
    """Consecutive windows with no VAD: the whole file, `chunk_length` seconds at a time."""
    step = int(chunk_length * SAMPLE_RATE)
    return [Window(start, min(start + step, n_samples)) for start in range(0, n_samples, step)]


def windows_from_speech(spans: list[Span], chunk_length: float) -> list[Window]:
    """Merge speech spans into windows no longer than `chunk_length`; a longer span is cut.

    A window runs from its first span's start to its last span's end, so pauses inside it stay
    and timestamps map back by adding the window's offset.
    """
    limit = int(chunk_length * SAMPLE_RATE)
    windows: list[Window] = []
    current: Window | None = None
    for span in spans:
        for piece in _cut(span, limit):
            if current is not None and piece.end - current.start <= limit:
                current = Window(current.start, piece.end)
                continue
            if current is not None:
                windows.append(current)
            current = Window(piece.start, piece.end)
    if current is not None:
        windows.append(current)
    return windows


def _cut(span: Span, limit: int) -> list[Span]:
    return [Span(start, min(start + limit, span.end)) for start in range(span.start, span.end, limit)]
