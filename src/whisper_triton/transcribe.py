"""Decoding Whisper windows (at most 30 s each) with an engine, and the short-form pipeline.

`EngineWindowDecoder` is the one place that turns audio windows into engine calls (features,
batching, language detection, word-timing alignment). The Triton `whisper` model runs
`ShortFormTranscriber` on it; the long-form pipeline (`longform.py`) drives the same decoder
in-process, or the `whisper` model through Triton from the `transcribe` model.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE
from .engines.base import DecodeOptions, Engine, Hypothesis, TokenTimings, supports_word_timestamps
from .errors import PayloadTooLargeError, WhisperTritonError
from .features import CHUNK_SECONDS, N_SAMPLES, HOP_LENGTH, batch_log_mel
from .tokenizer import PromptSpec, WhisperTokenizer
from .decoding import QualityThresholds, is_silence

logger = logging.getLogger(__name__)

# below this peak amplitude there is nothing to hear: skip the engine instead of inviting hallucinations
SILENCE_PEAK = 1e-4


@dataclass
class WindowOutput:
    hypothesis: Hypothesis
    timings: TokenTimings | None = None  # for the hypothesis' text tokens, when asked


class EngineWindowDecoder:
    """Audio windows -> engine calls, in-process."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    @property
    def is_multilingual(self) -> bool:
        return self.engine.is_multilingual

    @property
    def supports_word_timestamps(self) -> bool:
        return supports_word_timestamps(self.engine)

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        return batch_log_mel(audios, self.engine.n_mels)

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, features: np.ndarray | None = None) -> list[WindowOutput]:
        if not audios:
            return []
        if word_timestamps and not self.supports_word_timestamps:
            raise unsupported_word_timestamps(getattr(self.engine, "name", "this engine"))
        features = self.features(audios) if features is None else features
        hypotheses = self.engine.generate(features, prompts, options)
        outputs = [WindowOutput(h) for h in hypotheses]
        if word_timestamps:
            self._align(features, audios, prompts, outputs)
        return outputs

    def _align(self, features, audios, prompts, outputs: list[WindowOutput]) -> None:
        for index, output in enumerate(outputs):
            text = [t for t in output.hypothesis.tokens if t < self.tokenizer.eot]
            if not text:
                output.timings = TokenTimings([], [], [])
                continue
            start_sequence = self.start_sequence(prompts[index])
            frames = max(1, min(audios[index].size, N_SAMPLES) // HOP_LENGTH)
            output.timings = self.engine.align(features[index : index + 1], start_sequence, [text], [frames])[0]

    def start_sequence(self, prompt: list[int]) -> list[int]:
        """<|startoftranscript|> and what follows it, without <|notimestamps|> (alignment wants text only)."""
        tail = prompt[prompt.index(self.tokenizer.sot):] if self.tokenizer.sot in prompt else prompt
        return [t for t in tail if t != self.tokenizer.no_timestamps]

    def detect_language(self, audios: list[np.ndarray], features: np.ndarray | None = None) -> list[dict[str, float]]:
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in audios]
        features = self.features(audios) if features is None else features
        return self.engine.detect_language(features)


def unsupported_word_timestamps(engine_name: str) -> WhisperTritonError:
    return WhisperTritonError(
        message=f"Word timestamps need cross-attention alignment, which the {engine_name} engine does not "
        "provide. Drop word_timestamps, or serve with the ctranslate2 engine.",
        param="word_timestamps", status=422, type="unsupported_option",
    )


@dataclass
class ShortRequest:
    audio: np.ndarray  # 16 kHz mono float32, at most 30 s
    spec: PromptSpec = field(default_factory=PromptSpec)
    options: DecodeOptions = field(default_factory=DecodeOptions)
    prompt_ids: list[int] | None = None  # used as is when given (the long-form model sends its own)
    word_timestamps: bool = False


@dataclass
class ShortResult:
    text: str
    language: str
    duration: float
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    language_probability: float = 1.0
    timings: TokenTimings | None = None


class ShortFormTranscriber:
    """Runs a batch of single-window requests through one engine in as few calls as possible."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer):
        self.decoder = EngineWindowDecoder(engine, tokenizer)
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
                language = request.spec.language or self._prompt_language(request.prompt_ids) or "en"
                results[index] = ShortResult("", language, _duration(request.audio),
                                             timings=TokenTimings([], [], []) if request.word_timestamps else None)
            else:
                audible.append(index)
        if audible:
            self._transcribe_audible([requests[i] for i in audible], audible, results)
        return results  # type: ignore[return-value]

    def _transcribe_audible(self, requests: list[ShortRequest], indices: list[int], results: list) -> None:
        audios = [r.audio for r in requests]
        features = self.decoder.features(audios)
        languages, probabilities = self._languages(features, audios, requests)
        groups: dict[tuple[DecodeOptions, bool], list[int]] = defaultdict(list)
        for position, request in enumerate(requests):
            groups[(request.options, request.word_timestamps)].append(position)
        for (options, words), positions in groups.items():
            prompts = [self._prompt(requests[p], languages[p]) for p in positions]
            outputs = self.decoder.decode([audios[p] for p in positions], prompts, options, words, features[positions])
            for position, output in zip(positions, outputs):
                results[indices[position]] = self._result(output, languages[position], probabilities[position],
                                                          audios[position])

    def _prompt(self, request: ShortRequest, language: str) -> list[int]:
        return request.prompt_ids if request.prompt_ids else self.tokenizer.prompt_ids(request.spec, language)

    def _prompt_language(self, prompt_ids: list[int] | None) -> str | None:
        for token in prompt_ids or []:
            if token in self.tokenizer.language_by_id:
                return self.tokenizer.language_by_id[token]
        return None

    def _languages(self, features: np.ndarray, audios, requests: list[ShortRequest]) -> tuple[list[str], list[float]]:
        languages = [r.spec.language or self._prompt_language(r.prompt_ids) for r in requests]
        probabilities = [1.0] * len(requests)
        if not self.tokenizer.is_multilingual:
            return [language or "en" for language in languages], probabilities
        to_detect = [i for i, language in enumerate(languages) if language is None]
        if to_detect:
            detected = self.decoder.detect_language([audios[i] for i in to_detect], features[to_detect])
            for i, probs in zip(to_detect, detected):
                languages[i] = max(probs, key=probs.get)
                probabilities[i] = float(probs[languages[i]])
        return languages, probabilities  # type: ignore[return-value]

    def _result(self, output: WindowOutput, language: str, probability: float, audio: np.ndarray) -> ShortResult:
        hypothesis = output.hypothesis
        text = self.tokenizer.decode(hypothesis.tokens).strip()
        if is_silence(hypothesis.no_speech_prob, hypothesis.avg_logprob, QualityThresholds()):
            text = ""
        return ShortResult(
            text=text,
            language=language,
            duration=_duration(audio),
            tokens=hypothesis.tokens,
            avg_logprob=hypothesis.avg_logprob,
            no_speech_prob=hypothesis.no_speech_prob,
            language_probability=probability,
            timings=output.timings,
        )


def _is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


def _duration(audio: np.ndarray) -> float:
    return round(audio.size / SAMPLE_RATE, 3)
