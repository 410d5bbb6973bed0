"""The engine interface: the seam between the shared pipeline and CTranslate2 / TensorRT-LLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..contract.capabilities import EngineCapabilities
from ..contract.options import MAX_BEAM_SIZE, MAX_NEW_TOKENS, DecodeOptions

__all__ = ["MAX_BEAM_SIZE", "MAX_NEW_TOKENS", "DecodeOptions", "EngineCapabilities", "Engine", "Hypothesis",
           "TokenTimings", "check_batch"]


@dataclass
class Hypothesis:
    """The best decoded sequence for one input (prompt not included)."""

    tokens: list[int]
    sum_logprob: float | None = None  # None where the engine gives no scores
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


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


@dataclass
class EngineInfo:
    name: str
    model_dir: str
    n_mels: int
    is_multilingual: bool
    max_batch_size: int
    extra: dict = field(default_factory=dict)


def check_batch(features: np.ndarray, prompts: list[list[int]], n_mels: int) -> None:
    """Shared argument checks, so every engine rejects the same malformed calls."""
    if features.ndim != 3 or features.shape[1] != n_mels:
        raise ValueError(f"features must be [B, {n_mels}, frames], got {list(features.shape)}")
    if len(prompts) != features.shape[0]:
        raise ValueError(f"got {features.shape[0]} feature windows but {len(prompts)} prompts")
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least <|startoftranscript|>")
