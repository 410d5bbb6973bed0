"""Reading Whisper's output: timestamp tokens -> segments, quality measures, fallback decisions."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from .contract.options import QualityThresholds
from .contract.results import Segment, Word  # noqa: F401  (re-exported: the pipeline's vocabulary)

TIME_PRECISION = 0.02  # seconds per timestamp token step


@dataclass
class TimedTokens:
    """Text tokens between two timestamps, times relative to the window start."""

    start: float
    end: float
    tokens: list[int]


def split_on_timestamps(tokens: list[int], timestamp_begin: int, eot: int, window_duration: float) -> list[TimedTokens]:
    """Group generated tokens into timed pieces. Text without timestamps spans the whole window."""
    pieces: list[TimedTokens] = []
    start: float | None = None
    text: list[int] = []
    last_end = 0.0
    for token in tokens:
        if token >= timestamp_begin:
            time = min((token - timestamp_begin) * TIME_PRECISION, window_duration)
            if text:
                piece_start = start if start is not None else last_end
                pieces.append(TimedTokens(piece_start, max(time, piece_start), text))
                last_end, text, start = time, [], None
            else:
                start = time  # an opening timestamp (or the second of a closing/opening pair)
        elif token < eot:
            text.append(token)
    if text:
        pieces.append(TimedTokens(start if start is not None else last_end, window_duration, text))
    return pieces


def compression_ratio(text: str) -> float:
    """How repetitive a text is: long loops of the same words compress well (> 2.4 is suspect)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def is_silence(no_speech_prob: float | None, avg_logprob: float | None, thresholds: QualityThresholds) -> bool:
    """openai-whisper's rule: the model says no speech and is not confident in what it wrote."""
    if thresholds.no_speech is None or no_speech_prob is None:
        return False
    if no_speech_prob <= thresholds.no_speech:
        return False
    return thresholds.log_prob is None or avg_logprob is None or avg_logprob < thresholds.log_prob


def needs_fallback(text: str, avg_logprob: float | None, thresholds: QualityThresholds) -> bool:
    """Whether to decode again at a higher temperature."""
    if thresholds.compression_ratio is not None and compression_ratio(text) > thresholds.compression_ratio:
        return True
    return thresholds.log_prob is not None and avg_logprob is not None and avg_logprob < thresholds.log_prob
