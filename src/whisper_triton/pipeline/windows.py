"""Decoding Whisper windows (at most 30 s each) with an engine, and the short-form pipeline.

`EngineWindowDecoder` is the one place that turns audio windows into engine calls (features,
batching, language detection, word-timing alignment). The Triton `whisper` model runs
`ShortFormTranscriber` on it; the long-form pipeline (`longform.py`) drives the same decoder
in-process, or the `whisper` model through Triton from the `transcribe` model.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE
from ..contract.capabilities import EngineCapabilities
from ..contract.engine import Engine, Hypothesis, TokenTimings
from ..contract.options import MAX_NEW_TOKENS, DecodeOptions
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
    # the engine's time for this row: its share of its batch's encoder, decoder and alignment passes
    engine_seconds: dict[str, float] = field(default_factory=dict)


class EncoderCache:
    """Encoder outputs of recent windows, keyed by a scope and their samples, bounded in bytes.

    A window is often decoded more than once within one request: language detection first, then
    transcription, then a fallback temperature, another candidate language, or alignment, each in a
    BLS request of its own (the `transcribe` model sends every pass to `whisper_window` apart). The
    scope is the file's request (a random id the long-form pipeline draws per file), so an encoder
    pass is reused within that request and never serves another request's audio as speed: two
    requests with the same audio are two cold requests, as they are for a user (a client retry too:
    it recomputes). Without a scope nothing is kept (a single call reuses its pass by itself)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(audio: np.ndarray, scope: str = "") -> bytes:
        data = np.ascontiguousarray(audio, dtype=np.float32)
        digest = hashlib.blake2b(data.tobytes(), digest_size=16, key=scope.encode()[:64]).digest()
        return digest + data.size.to_bytes(8, "little")

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
    """Audio windows -> engine calls, in-process; one encoder pass per window and request where the
    engine can reuse it (`scope`: the request's id; see `EncoderCache`)."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer, encoder_cache_bytes: int = 256 << 20):
        self.engine = engine
        self.tokenizer = tokenizer
        self.capabilities: EngineCapabilities = engine.capabilities
        self.cache = EncoderCache(encoder_cache_bytes) if self.capabilities.encoder_reuse else None
        self.last_encoder_seconds = 0.0  # of the last `inputs` call (its caller shares it out)

    @property
    def is_multilingual(self) -> bool:
        return self.engine.is_multilingual

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        return batch_log_mel(audios, self.engine.n_mels)

    def inputs(self, audios: list[np.ndarray], scopes: list[str | None] | None = None) -> np.ndarray:
        """What the engine decodes from: its encoder output where it can reuse one, else log-mel.
        Rows with a scope are looked up in (and added to) the cache under it."""
        started = time.perf_counter()
        try:
            if self.cache is None:
                return self.features(audios)
            scopes = scopes or [None] * len(audios)
            keys = [self.cache.key(a, s) if s else None for a, s in zip(audios, scopes)]
            found: dict[object, np.ndarray | None] = {}
            missing: dict[object, np.ndarray] = {}
            for index, (key, audio) in enumerate(zip(keys, audios)):
                slot = key if key is not None else ("row", index)
                if slot in found or slot in missing:
                    continue
                value = self.cache.get(key) if key is not None else None
                if value is None:
                    missing[slot] = audio
                else:
                    found[slot] = value
                    self.cache.hits += 1
            if missing:
                self.cache.misses += len(missing)
                encoded = self.engine.encode(self.features(list(missing.values())))
                for slot, value in zip(missing, encoded):
                    found[slot] = value
                    if not (isinstance(slot, tuple) and slot[0] == "row"):
                        self.cache.put(slot, value)
            return np.stack([found[key if key is not None else ("row", i)] for i, key in enumerate(keys)])
        finally:
            self.last_encoder_seconds = time.perf_counter() - started

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, inputs: np.ndarray | None = None,
               scope: str | None = None) -> list[WindowOutput]:
        if not audios:
            return []
        if word_timestamps and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        encoder_s = 0.0
        if inputs is None:
            inputs = self.inputs(audios, [scope] * len(audios))
            encoder_s = self.last_encoder_seconds
        started = time.perf_counter()
        hypotheses = self.engine.generate(inputs, prompts, options)
        decoder_s = time.perf_counter() - started
        outputs = [WindowOutput(h) for h in hypotheses]
        alignment_s = 0.0
        if word_timestamps:
            started = time.perf_counter()
            self._align(inputs, audios, prompts, outputs)
            alignment_s = time.perf_counter() - started
        share = {"encoder": encoder_s, "decoder": decoder_s, "alignment": alignment_s}
        for output in outputs:
            output.engine_seconds = {stage: seconds / len(outputs) for stage, seconds in share.items() if seconds}
        return outputs

    def _align(self, inputs, audios, prompts, outputs: list[WindowOutput]) -> None:
        for index, output in enumerate(outputs):
            text = [t for t in output.hypothesis.tokens if t < self.tokenizer.eot]
            if not text:
                output.timings = TokenTimings([], [], [])
                continue
            start_sequence = self.start_sequence(prompts[index])
            # the decoder has MAX_NEW_TOKENS (448) positions for the start sequence, <|notimestamps|>, the
            # text and <|endoftext|> (openai-whisper's find_alignment; CTranslate2 adds the two): a decode
            # that ran to the limit (a loop at a high temperature) is aligned as far as it fits, and its
            # words past that take their segment's times
            text = text[: max(0, MAX_NEW_TOKENS - len(start_sequence) - 2)]
            frames = max(1, min(audios[index].size, N_SAMPLES) // HOP_LENGTH)
            output.timings = self.engine.align(inputs[index : index + 1], start_sequence, [text], [frames])[0]

    def start_sequence(self, prompt: list[int]) -> list[int]:
        """<|startoftranscript|> and what follows it, without <|notimestamps|> (alignment wants text only)."""
        tail = prompt[prompt.index(self.tokenizer.sot):] if self.tokenizer.sot in prompt else prompt
        return [t for t in tail if t != self.tokenizer.no_timestamps]

    def detect_language(self, audios: list[np.ndarray], inputs: np.ndarray | None = None,
                        scope: str | None = None) -> list[dict[str, float]]:
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in audios]
        encoder_s = 0.0
        if inputs is None:
            inputs = self.inputs(audios, [scope] * len(audios))
            encoder_s = self.last_encoder_seconds
        started = time.perf_counter()
        detected = self.engine.detect_language(inputs)
        self._detection_seconds().update(
            encoder=self._detection_seconds().get("encoder", 0.0) + encoder_s,
            decoder=self._detection_seconds().get("decoder", 0.0) + time.perf_counter() - started)
        return detected

    def _detection_seconds(self) -> dict[str, float]:
        local = self.__dict__.setdefault("_local", threading.local())
        if not hasattr(local, "seconds"):
            local.seconds = {}
        return local.seconds

    def take_detection_seconds(self) -> dict[str, float]:
        """The engine's time in this thread's detections since the last call (encoder, decoder)."""
        seconds = dict(self._detection_seconds())
        self._detection_seconds().clear()
        return seconds


class RequestCancelled(WhisperTritonError):
    """The request was cancelled (its client left or its deadline passed): the work for it stops where
    this is raised, and nobody reads the answer. 499 is nginx's "client closed request"."""

    def __init__(self) -> None:
        super().__init__("The request was cancelled (the client disconnected or its deadline passed); "
                         "decoding stopped.", None, 499, "cancelled")


def stop_if_cancelled(cancelled: Callable[[], bool] | None) -> None:
    """The cancellation hook the long stages call between blocks of work (VAD blocks, decoding rounds)."""
    if cancelled is not None and cancelled():
        raise RequestCancelled()


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
    scope: str | None = None  # the long-form request this window belongs to (encoder reuse within it)


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
    engine_seconds: dict[str, float] = field(default_factory=dict)  # this row's share of the engine's time


class ShortFormTranscriber:
    """Runs a batch of single-window requests through one engine in as few calls as possible."""

    def __init__(self, engine: Engine, tokenizer: WhisperTokenizer, encoder_cache_bytes: int = 256 << 20):
        self.decoder = EngineWindowDecoder(engine, tokenizer, encoder_cache_bytes)
        self.tokenizer = tokenizer

    def detect(self, requests: list[ShortRequest]) -> list[ShortResult]:
        """Language detection alone (no `generate`): what a client asking only for languages gets."""
        audible = [r for r in requests if not _is_silent(r.audio)]
        audios = [r.audio for r in audible]
        share: dict[str, float] = {}
        found: list[dict[str, float]] = []
        if audible and self.decoder.is_multilingual:
            started = time.perf_counter()
            inputs = self.decoder.inputs(audios, [r.scope for r in audible])
            encoder_s = self.decoder.last_encoder_seconds
            found = self.decoder.detect_language(audios, inputs)
            share = {"encoder": encoder_s / len(audible),
                     "decoder": (time.perf_counter() - started - encoder_s) / len(audible)}
        elif audible:
            found = self.decoder.detect_language(audios)
        detected = iter(found)
        results = []
        for request in requests:
            silent = _is_silent(request.audio)
            probs = next(detected) if not silent else {request.spec.language or "en": 0.0}
            language = max(probs, key=probs.get)
            results.append(ShortResult("", language, _duration(request.audio), language_probability=float(probs[language]),
                                       language_probabilities=probs, engine_seconds={} if silent else dict(share)))
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
        # one encoder pass for detection, decoding and alignment (reused across calls within a scope)
        inputs = self.decoder.inputs(audios, [r.scope for r in requests])
        encoder_share = self.decoder.last_encoder_seconds / len(requests)
        languages, probabilities = self._languages(inputs, audios, requests)
        groups: dict[tuple[DecodeOptions, bool], list[int]] = defaultdict(list)
        for position, request in enumerate(requests):
            groups[(request.options, request.word_timestamps)].append(position)
        for (options, words), positions in groups.items():
            prompts = [self._prompt(requests[p], languages[p]) for p in positions]
            outputs = self.decoder.decode([audios[p] for p in positions], prompts, options, words, inputs[positions])
            for position, output in zip(positions, outputs):
                output.engine_seconds["encoder"] = encoder_share
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
            engine_seconds=output.engine_seconds,
        )


def _is_silent(audio: np.ndarray) -> bool:
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


def _duration(audio: np.ndarray) -> float:
    return round(audio.size / SAMPLE_RATE, 3)
