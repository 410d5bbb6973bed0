"""Engines behind one interface (`contract/engine.py`); `load_engine` picks one by name.
May import `pipeline/`, `contract/`, `errors`, `settings`."""

from __future__ import annotations

from pathlib import Path

from ..contract.capabilities import SpecialTokens
from .base import DecodeOptions, Engine, Hypothesis

ENGINES = ("ctranslate2", "tensorrtllm")


def load_engine(name: str, model_dir: str, tokens: SpecialTokens | None = None, **kwargs) -> Engine:
    """The engine `name` on `model_dir`; `tokens` from the model's tokenizer (read here when not given)."""
    if tokens is None:
        from ..pipeline.tokenizer import WhisperTokenizer

        tokens = WhisperTokenizer.from_model_dir(Path(model_dir)).special_tokens()
    if name == "ctranslate2":
        from .ctranslate2_engine import CTranslate2Engine

        return CTranslate2Engine(model_dir, tokens, **kwargs)
    if name == "tensorrtllm":
        from .tensorrtllm.engine import TensorRTLLMEngine

        return TensorRTLLMEngine(model_dir, tokens, **kwargs)
    raise ValueError(f"Unknown engine {name!r}: choose one of {', '.join(ENGINES)}.")


__all__ = ["DecodeOptions", "Engine", "Hypothesis", "ENGINES", "load_engine"]
