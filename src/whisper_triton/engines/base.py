"""The engine interface: the seam between the shared pipeline and CTranslate2 / TensorRT-LLM."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..contract.capabilities import EngineCapabilities
from ..contract.engine import Engine, Hypothesis, TokenTimings
from ..contract.options import MAX_BEAM_SIZE, MAX_NEW_TOKENS, DecodeOptions

__all__ = ["MAX_BEAM_SIZE", "MAX_NEW_TOKENS", "DecodeOptions", "EngineCapabilities", "Engine", "Hypothesis",
           "TokenTimings", "check_batch"]


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
