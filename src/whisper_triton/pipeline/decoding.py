"""Reading Whisper's output: timestamp tokens -> segments, quality measures, fallback decisions."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from ..contract.options import QualityThresholds
from ..contract.results import Segment, Word  # noqa: F401  (re-exported: the pipeline's vocabulary)

TIME_PRECISION = 0.02  # seconds per timestamp token step
# Repetitive text is a loop only where it is more text than the audio could hold: recorded telephony
# prompts ("... seguido por la tecla de numero" in every sentence) compress past 2.4 at 14-16
# characters a second of speech; a decoder loop writes far more (a 4 s clip of " la la" * 60: 90/s)
LOOP_CHARS_PER_SECOND = 20.0


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


def too_repetitive(text: str, thresholds: QualityThresholds, duration: float | None = None) -> bool:
    """The compression-ratio test, where the text is also more than `duration` seconds of speech hold
    (`LOOP_CHARS_PER_SECOND`; no duration: the ratio alone, as openai-whisper)."""
    if thresholds.compression_ratio is None or compression_ratio(text) <= thresholds.compression_ratio:
        return False
    return duration is None or duration <= 0 or len(text) / duration > LOOP_CHARS_PER_SECOND


def needs_fallback(text: str, avg_logprob: float | None, thresholds: QualityThresholds,
                   duration: float | None = None) -> bool:
    """Whether to decode again at a higher temperature."""
    if too_repetitive(text, thresholds, duration):
        return True
    return thresholds.log_prob is not None and avg_logprob is not None and avg_logprob < thresholds.log_prob


# ---- temperature fallback: which decode of a window to keep ------------------------------
@dataclass(frozen=True)
class DecodeAttempt:
    """One decode of a window at one temperature, as the fallback rule sees it."""

    text: str
    avg_logprob: float | None
    no_speech_prob: float | None
    temperature: float = 0.0
    duration: float | None = None  # seconds of audio in the window (for the loop test)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text.strip())


def attempt_failed(attempt: DecodeAttempt, thresholds: QualityThresholds) -> bool:
    """Decode again at the next temperature? A decode the silence rule calls silence never fails:
    there is nothing to improve (it is left out of the transcript)."""
    if is_silence(attempt.no_speech_prob, attempt.avg_logprob, thresholds):
        return False
    return needs_fallback(attempt.text.strip(), attempt.avg_logprob, thresholds, attempt.duration)


def is_loop(attempt: DecodeAttempt, thresholds: QualityThresholds) -> bool:
    """Too repetitive to be speech: the compression-ratio test fails."""
    return too_repetitive(attempt.text.strip(), thresholds, attempt.duration)


def select_attempt(attempts: list[DecodeAttempt], thresholds: QualityThresholds) -> int | None:
    """Index of the decode to keep among a window's decodes (in temperature order), or None to
    leave the window's text out.

    The first decode that passes wins. When every decode failed, faster-whisper's rule
    (`generate_with_fallback`, SYSTRAN/faster-whisper v1.2.1 faster_whisper/transcribe.py): keep
    the decodes within the compression-ratio threshold, and of those the most confident (highest
    avg_logprob); a loop is often the most confident decode of all, so confidence alone would
    pick it. Where faster-whisper then falls back to the most confident of all decodes, here a
    window whose every decode is a loop returns None: its text is left out rather than a loop
    reported as speech (the "loop cut")."""
    if not attempts:
        raise ValueError("select_attempt needs at least one decode")
    for index, attempt in enumerate(attempts):
        if not attempt_failed(attempt, thresholds):
            return index
    candidates = [i for i, attempt in enumerate(attempts) if not is_loop(attempt, thresholds)]
    if not candidates:
        return None
    return max(candidates, key=lambda i: _confidence(attempts[i]))


def _confidence(attempt: DecodeAttempt) -> float:
    return float("-inf") if attempt.avg_logprob is None else attempt.avg_logprob
