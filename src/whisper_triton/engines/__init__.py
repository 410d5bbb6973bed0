"""Engines behind one interface; `load_engine` picks one by name."""

from __future__ import annotations

from .base import DecodeOptions, Engine, Hypothesis

ENGINES = ("ctranslate2", "tensorrtllm")


def load_engine(name: str, model_dir: str, **kwargs) -> Engine:
    if name == "ctranslate2":
        from .ctranslate2_engine import CTranslate2Engine

        return CTranslate2Engine(model_dir, **kwargs)
    if name == "tensorrtllm":
        from .tensorrtllm_engine import TensorRTLLMEngine

        return TensorRTLLMEngine(model_dir, **kwargs)
    raise ValueError(f"Unknown engine {name!r}: choose one of {', '.join(ENGINES)}.")


__all__ = ["DecodeOptions", "Engine", "Hypothesis", "ENGINES", "load_engine"]
