"""The engine interface: the seam between the shared pipeline and CTranslate2 / TensorRT-LLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import invalid_parameter

MAX_NEW_TOKENS = 448  # Whisper's decoder context
MAX_BEAM_SIZE = 16


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    patience: float = 1.0
    length_penalty: float = 1.0
    suppress_blank: bool = True

    def validate(self, max_beam_size: int = MAX_BEAM_SIZE) -> "DecodeOptions":
        """Return self, or raise a 4xx error that names the first bad option."""
        if not 1 <= self.beam_size <= max_beam_size:
            raise invalid_parameter("beam_size", f"beam_size must be between 1 and {max_beam_size}, got {self.beam_size}.")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise invalid_parameter(
                "max_new_tokens", f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}."
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise invalid_parameter("temperature", f"temperature must be between 0 and 2, got {self.temperature}.")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise invalid_parameter(
                "repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}."
            )
        if not 0.0 < self.patience <= 10.0:
            raise invalid_parameter("patience", f"patience must be in (0, 10], got {self.patience}.")
        return self


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

    def generate(self, features: np.ndarray, prompts: list[list[int]], options: DecodeOptions) -> list[Hypothesis]:
        """features [B, n_mels, 3000]; prompts: B token-id lists; returns B hypotheses."""
        ...

    def detect_language(self, features: np.ndarray) -> list[dict[str, float]]:
        """For each of B windows: language code -> probability, most likely first."""
        ...


def supports_word_timestamps(engine) -> bool:
    """Word timestamps need cross-attention alignment: an optional engine capability, `align()`."""
    return bool(getattr(engine, "supports_word_timestamps", False)) and callable(getattr(engine, "align", None))


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
