"""Decoding Whisper windows (at most 30 s each) with an engine, and the short-form pipeline.

`EngineWindowDecoder` is the one place that turns audio windows into engine calls (features,
batching, language detection, word-timing alignment). The Triton `whisper` model runs
`ShortFormTranscriber` on it; the long-form pipeline (`longform.py`) drives the same decoder
in-process, or the `whisper` model through Triton from the `transcribe` model.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE
from ..contract.capabilities import EngineCapabilities
from ..contract.engine import Engine, Hypothesis, TokenTimings
from ..contract.options import DecodeOptions
from ..errors import PayloadTooLargeError, WhisperTritonError
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


class EncoderCache:
    """Encoder outputs of recent windows, keyed by their samples, bounded in bytes.

    A window is often decoded more than once: language detection first, then transcription, then
    a fallback temperature or alignment, each possibly in another request (the `transcribe` model
    sends every attempt to `whisper_window` on its own). Keyed by content, a hit is always right."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(audio: np.ndarray) -> bytes:
        data = np.ascontiguousarray(audio, dtype=np.float32)
        return hashlib.blake2b(data.tobytes(), digest_size=16).digest() + data.size.to_bytes(8, "little")

    def get(self, key: bytes) -> np.ndarray | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        if key in self._items or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes


class EngineWindowDecoder:
    """Audio windows -> engine calls, in-process; one encoder pass per window where the engine can."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer, encoder_cache_bytes: int = 256 << 20):
        self.engine = engine
        self.tokenizer = tokenizer
        self.capabilities: EngineCapabilities = engine.capabilities
        self.cache = EncoderCache(encoder_cache_bytes) if self.capabilities.encoder_reuse else None

    @property
    def is_multilingual(self) -> bool:
        return self.engine.is_multilingual

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        return batch_log_mel(audios, self.engine.n_mels)

    def inputs(self, audios: list[np.ndarray]) -> np.ndarray:
        """What the engine decodes from: its encoder output where it can reuse one, else log-mel."""
        if self.cache is None:
            return self.features(audios)
        keys = [self.cache.key(audio) for audio in audios]
        found = {key: self.cache.get(key) for key in set(keys)}
        missing = [key for key, value in found.items() if value is None]
        self.cache.hits += len(keys) - sum(1 for key in keys if found[key] is None)
        if missing:
            self.cache.misses += len(missing)
            first = {key: audios[keys.index(key)] for key in missing}
            encoded = self.engine.encode(self.features(list(first.values())))
            for key, value in zip(first, encoded):
                found[key] = value
                self.cache.put(key, value)
        return np.stack([found[key] for key in keys])

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, inputs: np.ndarray | None = None) -> list[WindowOutput]:
        if not audios:
            return []
        if word_timestamps and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        inputs = self.inputs(audios) if inputs is None else inputs
        hypotheses = self.engine.generate(inputs, prompts, options)
        outputs = [WindowOutput(h) for h in hypotheses]
        if word_timestamps:
            self._align(inputs, audios, prompts, outputs)
        return outputs

    def _align(self, inputs, audios, prompts, outputs: list[WindowOutput]) -> None:
        for index, output in enumerate(outputs):
            text = [t for t in output.hypothesis.tokens if t < self.tokenizer.eot]
            if not text:
                output.timings = TokenTimings([], [], [])
                continue
            start_sequence = self.start_sequence(prompts[index])
            frames = max(1, min(audios[index].size, N_SAMPLES) // HOP_LENGTH)
            output.timings = self.engine.align(inputs[index : index + 1], start_sequence, [text], [frames])[0]

    def start_sequence(self, prompt: list[int]) -> list[int]:
        """<|startoftranscript|> and what follows it, without <|notimestamps|> (alignment wants text only)."""
        tail = prompt[prompt.index(self.tokenizer.sot):] if self.tokenizer.sot in prompt else prompt
        return [t for t in tail if t != self.tokenizer.no_timestamps]

    def detect_language(self, audios: list[np.ndarray], inputs: np.ndarray | None = None) -> list[dict[str, float]]:
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in audios]
        inputs = self.inputs(audios) if inputs is None else inputs
        return self.engine.detect_language(inputs)


def unsupported_word_timestamps(capabilities: EngineCapabilities) -> WhisperTritonError:
    return WhisperTritonError(
        message=f"Word timestamps need cross-attention alignment, which the {capabilities.engine or 'served'} "
        "engine does not provide here. Drop word_timestamps, or serve with the ctranslate2 engine.",
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
    language_probabilities: dict[str, float] | None = None  # the whole distribution, where detected


class ShortFormTranscriber:
    """Runs a batch of single-window requests through one engine in as few calls as possible."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer, encoder_cache_bytes: int = 256 << 20):
        self.decoder = EngineWindowDecoder(engine, tokenizer, encoder_cache_bytes)
        self.tokenizer = tokenizer

    def detect(self, requests: list[ShortRequest]) -> list[ShortResult]:
        """Language detection alone (no `generate`): what a client asking only for languages gets."""
        audible = [r for r in requests if not _is_silent(r.audio)]
        detected = iter(self.decoder.detect_language([r.audio for r in audible]) if audible else [])
        results = []
        for request in requests:
            probs = next(detected) if not _is_silent(request.audio) else {request.spec.language or "en": 0.0}
            language = max(probs, key=probs.get)
            results.append(ShortResult("", language, _duration(request.audio), language_probability=float(probs[language]),
                                       language_probabilities=probs))
        return results

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
        inputs = self.decoder.inputs(audios)  # one encoder pass for detection, decoding and alignment
        languages, probabilities = self._languages(inputs, audios, requests)
        groups: dict[tuple[DecodeOptions, bool], list[int]] = defaultdict(list)
        for position, request in enumerate(requests):
            groups[(request.options, request.word_timestamps)].append(position)
        for (options, words), positions in groups.items():
            prompts = [self._prompt(requests[p], languages[p]) for p in positions]
            outputs = self.decoder.decode([audios[p] for p in positions], prompts, options, words, inputs[positions])
            for position, output in zip(positions, outputs):
                language, probability = languages[position], probabilities[position]
                if language is None:  # chosen by the engine at the sot step of this very decode
                    found = output.hypothesis.language_probs or {"en": 1.0}
                    language = max(found, key=found.get)
                    probability = float(found[language])
                results[indices[position]] = self._result(output, language, probability, audios[position])

    def _prompt(self, request: ShortRequest, language: str | None) -> list[int]:
        if request.prompt_ids:
            return request.prompt_ids
        prompt = self.tokenizer.prompt_ids(request.spec, language or "en")
        if language is None:  # no language token after <|startoftranscript|>: the engine chooses it
            at = prompt.index(self.tokenizer.sot) + 1
            if at < len(prompt) and prompt[at] in self.tokenizer.language_by_id:
                del prompt[at]
        return prompt

    def _prompt_language(self, prompt_ids: list[int] | None) -> str | None:
        for token in prompt_ids or []:
            if token in self.tokenizer.language_by_id:
                return self.tokenizer.language_by_id[token]
        return None

    def _languages(self, inputs: np.ndarray, audios, requests: list[ShortRequest]) -> tuple[list[str], list[float]]:
        languages = [r.spec.language or self._prompt_language(r.prompt_ids) for r in requests]
        probabilities = [1.0] * len(requests)
        if not self.tokenizer.is_multilingual:
            return [language or "en" for language in languages], probabilities
        to_detect = [i for i, language in enumerate(languages) if language is None]
        if to_detect and self.decoder.capabilities.language_in_decode:
            return languages, probabilities  # type: ignore[return-value]  # one encoder pass: read while decoding
        if to_detect:
            detected = self.decoder.detect_language([audios[i] for i in to_detect], inputs[to_detect])
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
