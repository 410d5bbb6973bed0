"""Short-form pipeline (one window of at most 30 s per item): audio -> features -> prompt -> engine -> text.

This is what the Triton `whisper` model runs for a batch of requests, and what the benchmark calls
directly to measure the engine without the serving stack.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE
from .engines.base import DecodeOptions, Engine, Hypothesis
from .errors import PayloadTooLargeError
from .features import CHUNK_SECONDS, N_SAMPLES, batch_log_mel
from .tokenizer import PromptSpec, WhisperTokenizer

logger = logging.getLogger(__name__)

# openai-whisper's rule: a window is silence when the model says so and is unsure of its words
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
# below this peak amplitude there is nothing to hear: skip the engine instead of inviting hallucinations
SILENCE_PEAK = 1e-4


@dataclass
class ShortRequest:
    audio: np.ndarray  # 16 kHz mono float32, at most 30 s
    spec: PromptSpec = field(default_factory=PromptSpec)
    options: DecodeOptions = field(default_factory=DecodeOptions)


@dataclass
class ShortResult:
    text: str
    language: str
    duration: float
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None


class ShortFormTranscriber:
    """Runs a batch of single-window requests through one engine in as few calls as possible."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    def transcribe(self, requests: list[ShortRequest]) -> list[ShortResult]:
        for request in requests:
            if request.audio.size > N_SAMPLES:
                raise PayloadTooLargeError(
                    f"The audio is {request.audio.size / SAMPLE_RATE:.1f} s long; one window holds at most "
                    f"{CHUNK_SECONDS} s. Split it, or use the long-form `transcribe` model."
                )
        results: list[ShortResult | None] = [None] * len(requests)
        audible = []
        for index, request in enumerate(requests):
            if _is_silent(request.audio):
                results[index] = ShortResult("", request.spec.language or "en", _duration(request.audio))
            else:
                audible.append(index)
        if audible:
            features = batch_log_mel([requests[i].audio for i in audible], self.engine.n_mels)
            languages = self._languages(features, [requests[i].spec for i in audible])
            groups: dict[DecodeOptions, list[int]] = defaultdict(list)
            for position, index in enumerate(audible):
                groups[requests[index].options].append(position)
            for options, positions in groups.items():
                prompts = [
                    self.tokenizer.prompt_ids(requests[audible[p]].spec, languages[p]) for p in positions
                ]
                hypotheses = self.engine.generate(features[positions], prompts, options)
                for position, hypothesis in zip(positions, hypotheses):
                    index = audible[position]
                    results[index] = self._result(hypothesis, languages[position], requests[index].audio)
        return results  # type: ignore[return-value]

    def _languages(self, features: np.ndarray, specs: list[PromptSpec]) -> list[str]:
        languages = [spec.language or "en" for spec in specs]
        if not self.tokenizer.is_multilingual:
            return languages
        to_detect = [i for i, spec in enumerate(specs) if spec.language is None]
        if to_detect:
            detected = self.engine.detect_language(features[to_detect])
            for i, probs in zip(to_detect, detected):
                languages[i] = max(probs, key=probs.get)
        return languages

    def _result(self, hypothesis: Hypothesis, language: str, audio: np.ndarray) -> ShortResult:
        text = self.tokenizer.decode(hypothesis.tokens).strip()
        if _judged_silent(hypothesis):
            text = ""
        return ShortResult(
            text=text,
            language=language,
            duration=_duration(audio),
            tokens=hypothesis.tokens,
            avg_logprob=hypothesis.avg_logprob,
            no_speech_prob=hypothesis.no_speech_prob,
        )


def _judged_silent(hypothesis: Hypothesis) -> bool:
    if hypothesis.no_speech_prob is None or hypothesis.no_speech_prob <= NO_SPEECH_THRESHOLD:
        return False
    return hypothesis.avg_logprob is None or hypothesis.avg_logprob < LOGPROB_THRESHOLD


def _is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


def _duration(audio: np.ndarray) -> float:
    return round(audio.size / SAMPLE_RATE, 3)
