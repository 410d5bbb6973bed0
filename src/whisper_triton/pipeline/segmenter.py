"""Long audio -> windows of at most `chunk_length` seconds for the engine, and back to the file's timeline.

With VAD, a window packs speech stretches back to back (the pauses between them left out), so
each engine pass carries as much speech as it can hold; `Window.file_time` maps a time inside the
window back to the original file through those stretches' offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .vad import Span

JUNCTION_SNAP_S = 0.3


@dataclass(frozen=True)
class Window:
    """Stretches of the file ([start, end) in samples) decoded together as one Whisper window."""

    pieces: tuple[Span, ...]

    @property
    def start(self) -> int:
        return self.pieces[0].start

    @property
    def end(self) -> int:
        return self.pieces[-1].end

    @property
    def samples(self) -> int:
        return sum(piece.end - piece.start for piece in self.pieces)

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    def extract(self, audio: np.ndarray) -> np.ndarray:
        if len(self.pieces) == 1:
            return audio[self.start : self.end]
        return np.concatenate([audio[piece.start : piece.end] for piece in self.pieces])

    def file_time(self, seconds: float, side: str = "start", snap: float = JUNCTION_SNAP_S) -> float:
        """Where `seconds` into the window lies in the file.

        Whisper's timestamps are coarse; near a junction between two stretches (where a pause was
        left out) an end is snapped back to the earlier stretch's end and a start forward to the
        later stretch's start, so segments do not swallow the pause."""
        position = max(0, min(int(round(seconds * SAMPLE_RATE)), self.samples))
        tolerance = int(snap * SAMPLE_RATE)
        offset = 0
        for index, piece in enumerate(self.pieces):
            length = piece.end - piece.start
            junction = offset + length
            last = index == len(self.pieces) - 1
            if not last and side == "end" and junction <= position <= junction + tolerance:
                return piece.end / SAMPLE_RATE
            if not last and side == "start" and junction - tolerance <= position <= junction:
                return self.pieces[index + 1].start / SAMPLE_RATE
            if position < junction or (position == junction and (side == "end" or last)):
                return (piece.start + position - offset) / SAMPLE_RATE
            offset = junction
        return self.end / SAMPLE_RATE


    def after(self, seconds: float) -> "Window | None":
        """The part of this window from `seconds` (window time) on, or None if nothing is left."""
        position = max(0, int(round(seconds * SAMPLE_RATE)))
        offset = 0
        for index, piece in enumerate(self.pieces):
            length = piece.end - piece.start
            if position < offset + length:
                first = Span(piece.start + position - offset, piece.end)
                return Window((first, *self.pieces[index + 1 :]))
            offset += length
        return None


def fixed_windows(n_samples: int, chunk_length: float) -> list[Window]:
    """Consecutive windows with no VAD: the whole file, `chunk_length` seconds at a time."""
    step = int(chunk_length * SAMPLE_RATE)
    return [Window((Span(start, min(start + step, n_samples)),)) for start in range(0, n_samples, step)]


def windows_from_speech(spans: list[Span], chunk_length: float) -> list[Window]:
    """Pack speech spans, in order, into windows of at most `chunk_length` seconds of audio;
    a span longer than that is cut into window-sized pieces."""
    limit = int(chunk_length * SAMPLE_RATE)
    windows: list[Window] = []
    current: list[Span] = []
    filled = 0
    for span in spans:
        for piece in _cut(span, limit):
            length = piece.end - piece.start
            if current and filled + length > limit:
                windows.append(Window(tuple(current)))
                current, filled = [], 0
            current.append(piece)
            filled += length
    if current:
        windows.append(Window(tuple(current)))
    return windows


def _cut(span: Span, limit: int) -> list[Span]:
    return [Span(start, min(start + limit, span.end)) for start in range(span.start, span.end, limit)]
