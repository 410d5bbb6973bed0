"""The pipeline <-> engine boundary: what a Whisper engine takes and gives back, defined once.

The pipeline (`pipeline/windows.py`, `pipeline/longform.py`) speaks to an engine only through this
protocol; the engines (`engines/`) implement it and declare what they can do in `capabilities`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .capabilities import EngineCapabilities
from .options import DecodeOptions

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Engine", "Hypothesis", "TokenTimings"]


@dataclass
class Hypothesis:
    """The best decoded sequence for one input (prompt not included)."""

    tokens: list[int]
    sum_logprob: float | None = None  # None where the engine gives no scores
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    language_probs: dict[str, float] | None = None  # where the engine chose the language (language_in_decode)


@dataclass
class TokenTimings:
    """Word-timestamp material for the text tokens of one hypothesis (seconds from window start)."""

    starts: list[float]
    ends: list[float]
    probabilities: list[float]


@runtime_checkable
class Engine(Protocol):
    """A Whisper model that decodes batches of log-mel windows with per-item prompts."""

    n_mels: int
    is_multilingual: bool
    max_batch_size: int
    name: str
    capabilities: EngineCapabilities  # what it can do; the pipeline reads this, never the name

    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        """features [B, n_mels, 3000]; prompts: B token-id lists; returns B hypotheses."""
        ...

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        """For each of B windows: language code -> probability, most likely first."""
        ...

    # Optional, as declared in `capabilities`:
    # - encoder_reuse: `encode(features) -> encoded` once; `generate`, `detect_language` and `align`
    #   then accept `encoded` in place of the features (faster-whisper reuses one encoder pass so).
    # - word_timestamps: `align(features, start_sequence, text_tokens, num_frames) -> [TokenTimings]`.
