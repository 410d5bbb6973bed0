"""Long-form pipeline above the engine interface: VAD -> windows -> batched decoding with
temperature fallback -> segments (and words) on the file's timeline.

It drives any window decoder: `transcribe.EngineWindowDecoder` in-process, or the Triton
`whisper` model through BLS (`triton_models/transcribe_model.py`), so it works the same on
every engine.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

import numpy as np

from .audio import SAMPLE_RATE
from .decoding import (DecodeAttempt, QualityThresholds, Segment, Word, attempt_failed, compression_ratio, is_silence,
                       select_attempt, split_on_timestamps)
from .engines.base import MAX_BEAM_SIZE, MAX_NEW_TOKENS, DecodeOptions, Hypothesis, TokenTimings
from .errors import invalid_parameter
from .segmenter import Window, fixed_windows, windows_from_speech
from .tokenizer import PromptSpec, WhisperTokenizer
from .transcribe import WindowOutput, unsupported_word_timestamps
from .vad import VadOptions, speech_spans

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_FOLLOW_UPS = 2  # times the rest of a window may be decoded again
JUNCTION_MARGIN_S = 0.2  # timestamp slack around a left-out pause
UNCOVERED_SPEECH_S = 1.5  # speech left after the last segment that counts as dropped
MAX_BATCH_SIZE = 64


class WindowDecoder(Protocol):
    is_multilingual: bool
    supports_word_timestamps: bool

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False) -> list[WindowOutput]: ...

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]: ...


@dataclass
class TranscribeOptions:
    """Options of one long-form transcription; names as faster-whisper / openai-whisper users know them."""

    language: str | None = None
    task: str = "transcribe"
    vad: bool = True
    chunk_length: float = 30.0
    batch_size: int = 8
    beam_size: int = 1
    temperature: list[float] | float = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    initial_prompt: str | None = None
    hotwords: str | None = None
    word_timestamps: bool = False
    without_timestamps: bool = False
    max_new_tokens: int = MAX_NEW_TOKENS
    repetition_penalty: float = 1.0
    language_detection: str = "file"  # or "chunk": detect per window
    vad_threshold: float = 0.5
    vad_min_silence_ms: int = 300
    vad_speech_pad_ms: int = 300
    vad_end_pad_ms: int = 100

    @classmethod
    def from_dict(cls, raw: dict) -> "TranscribeOptions":
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise invalid_parameter(key, f"Unknown option {key!r}. Known options: {', '.join(sorted(known))}.")
        try:
            options = cls(**raw)
        except TypeError as exc:
            raise invalid_parameter("options", f"Invalid options: {exc}") from None
        return options.validate()

    def temperatures(self) -> list[float]:
        values = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        return [float(t) for t in values]

    def thresholds(self) -> QualityThresholds:
        return QualityThresholds(self.compression_ratio_threshold, self.log_prob_threshold, self.no_speech_threshold)

    def vad_options(self) -> VadOptions:
        return VadOptions(threshold=self.vad_threshold, min_silence_ms=self.vad_min_silence_ms,
                          speech_pad_ms=self.vad_speech_pad_ms, end_pad_ms=self.vad_end_pad_ms).validate()

    def decode_options(self, temperature: float) -> DecodeOptions:
        return DecodeOptions(beam_size=self.beam_size, max_new_tokens=self.max_new_tokens, temperature=temperature,
                             repetition_penalty=self.repetition_penalty).validate()

    def validate(self) -> "TranscribeOptions":
        _check_type(self, "vad", bool)
        _check_type(self, "word_timestamps", bool)
        _check_type(self, "without_timestamps", bool)
        _check_number(self, "chunk_length", 0.0, 30.0, low_open=True)
        _check_number(self, "batch_size", 1, MAX_BATCH_SIZE, integer=True)
        _check_number(self, "beam_size", 1, MAX_BEAM_SIZE, integer=True)
        _check_number(self, "max_new_tokens", 1, MAX_NEW_TOKENS, integer=True)
        _check_number(self, "repetition_penalty", 0.0, 10.0, low_open=True)
        _check_number(self, "vad_threshold", 0.0, 1.0, low_open=True)
        _check_number(self, "vad_min_silence_ms", 0, 10_000, integer=True)
        _check_number(self, "vad_speech_pad_ms", 0, 2_000, integer=True)
        _check_number(self, "vad_end_pad_ms", 0, 2_000, integer=True)
        for name in ("compression_ratio_threshold", "no_speech_threshold"):
            if getattr(self, name) is not None:
                _check_number(self, name, 0.0, 1e6)
        if self.log_prob_threshold is not None and not isinstance(self.log_prob_threshold, (int, float)):
            raise invalid_parameter("log_prob_threshold", "log_prob_threshold must be a number or null.")
        temperatures = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if not temperatures or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2
                                   for t in temperatures):
            raise invalid_parameter("temperature", "temperature must be a number or a list of numbers in [0, 2].")
        if self.task not in ("transcribe", "translate"):
            raise invalid_parameter("task", f"Unknown task {self.task!r}: use 'transcribe' or 'translate'.")
        if self.language_detection not in ("file", "chunk"):
            raise invalid_parameter("language_detection", "language_detection must be 'file' or 'chunk'.")
        for name in ("initial_prompt", "hotwords", "language"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise invalid_parameter(name, f"{name} must be a string.")
        return self


def _check_type(options, name: str, kind: type) -> None:
    if not isinstance(getattr(options, name), kind):
        raise invalid_parameter(name, f"{name} must be {kind.__name__}, got {getattr(options, name)!r}.")


def _check_number(options, name: str, low, high, integer: bool = False, low_open: bool = False) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
        raise invalid_parameter(name, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}.")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid_parameter(name, f"{name} must be in {bound}, got {value}.")


@dataclass
class TranscriptionResult:
    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[Segment]

    def to_dict(self, words: bool = False) -> dict:
        result = asdict(self)
        for segment in result["segments"]:
            segment.pop("tokens", None)
            if not words:
                segment.pop("words", None)
            if segment.get("language") is None:
                segment.pop("language", None)
        return result


@dataclass(eq=False)
class _WindowJob:
    window: Window
    audio: np.ndarray
    language: str
    output: WindowOutput | None = None
    temperature: float = 0.0
    follow_up: bool = False  # the rest of a window whose decode stopped before its speech ended


class LongFormTranscriber:
    def __init__(self, decoder: WindowDecoder, tokenizer: WhisperTokenizer):
        self.decoder = decoder
        self.tokenizer = tokenizer

    def check(self, options: TranscribeOptions) -> TranscribeOptions:
        """Refuse what this model/engine cannot do, naming the option."""
        options.validate()
        if options.language is not None:
            options.language = self.tokenizer.validate_language(options.language)
        self.tokenizer.validate_task(options.task)
        if options.word_timestamps and not self.decoder.supports_word_timestamps:
            raise unsupported_word_timestamps(getattr(self.decoder, "engine_name", "this"))
        return options

    def windows(self, audio: np.ndarray, options: TranscribeOptions) -> list[Window]:
        if not options.vad:
            return fixed_windows(audio.size, options.chunk_length)
        return windows_from_speech(speech_spans(audio, options.vad_options()), options.chunk_length)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions | None = None) -> TranscriptionResult:
        options = self.check(options or TranscribeOptions())
        duration = round(audio.size / SAMPLE_RATE, 3)
        windows = self.windows(audio, options)
        if not windows:  # no speech at all: nothing to decode, nothing to invent
            return TranscriptionResult("", options.language or "en", 1.0 if options.language else 0.0, duration, [])
        jobs = [_WindowJob(w, w.extract(audio), options.language or "") for w in windows]
        language, probability = self._assign_languages(jobs, options)
        jobs = self._decode_until_covered(jobs, options, audio)
        segments = self._segments(jobs, options)
        text = "".join(segment.text for segment in segments).strip()
        return TranscriptionResult(text, language, probability, duration, segments)

    # ---- languages ------------------------------------------------------------------------
    def _assign_languages(self, jobs: list[_WindowJob], options: TranscribeOptions) -> tuple[str, float]:
        if options.language:
            return options.language, 1.0
        if not self.decoder.is_multilingual:
            for job in jobs:
                job.language = "en"
            return "en", 1.0
        if options.language_detection == "chunk":
            detected = self._detect([job.audio for job in jobs], options.batch_size)
            for job, probs in zip(jobs, detected):
                job.language = max(probs, key=probs.get)
            return _combine(detected, weights=[job.window.duration for job in jobs])
        sample = jobs[: min(3, len(jobs))]  # the first windows of speech decide for the file
        language, probability = _combine(self._detect([job.audio for job in sample], options.batch_size),
                                         weights=[job.window.duration for job in sample])
        for job in jobs:
            job.language = language
        return language, probability

    def _detect(self, audios: list[np.ndarray], batch_size: int) -> list[dict[str, float]]:
        detected: list[dict[str, float]] = []
        for first in range(0, len(audios), batch_size):
            detected += self.decoder.detect_language(audios[first : first + batch_size])
        return detected

    # ---- decoding -------------------------------------------------------------------------
    def _prompt(self, job: _WindowJob, options: TranscribeOptions) -> list[int]:
        previous = " ".join(p.strip() for p in (options.initial_prompt, options.hotwords) if p and p.strip()) or None
        spec = PromptSpec(language=job.language, task=options.task, timestamps=not options.without_timestamps,
                          previous_text=previous)
        return self.tokenizer.prompt_ids(spec)

    def _decode_until_covered(self, jobs: list[_WindowJob], options: TranscribeOptions,
                              audio: np.ndarray) -> list[_WindowJob]:
        """Decode every window; where Whisper closed its last segment well before the window's speech
        ended (it drops trailing sentences now and then), decode the rest of that window again, as
        openai-whisper does by seeking to the last timestamp. All jobs come back in timeline order."""
        ordered = list(jobs)
        pending = jobs
        for round_ in range(1 + MAX_FOLLOW_UPS):
            self._decode_with_fallback(pending, options)
            if options.without_timestamps or round_ == MAX_FOLLOW_UPS:
                break
            follow_ups = []
            for job in pending:
                rest = self._uncovered(job, options)
                if rest is not None:
                    follow = _WindowJob(rest, rest.extract(audio), job.language, follow_up=True)
                    ordered.insert(ordered.index(job) + 1, follow)
                    follow_ups.append(follow)
            if not follow_ups:
                break
            logger.info("%d windows stopped before their speech ended: decoding the rest", len(follow_ups))
            pending = follow_ups
        return ordered

    def _uncovered(self, job: _WindowJob, options: TranscribeOptions) -> Window | None:
        hypothesis = job.output.hypothesis
        if is_silence(hypothesis.no_speech_prob, hypothesis.avg_logprob, options.thresholds()):
            return None
        pieces = split_on_timestamps(hypothesis.tokens, self.tokenizer.timestamp_begin, self.tokenizer.eot,
                                     job.window.duration)
        if not pieces:
            return None
        rest = job.window.after(pieces[-1].end)
        return rest if rest is not None and rest.duration >= UNCOVERED_SPEECH_S else None

    def _decode_with_fallback(self, jobs: list[_WindowJob], options: TranscribeOptions) -> None:
        thresholds = options.thresholds()
        tried: dict[_WindowJob, list[tuple[WindowOutput, DecodeAttempt]]] = {job: [] for job in jobs}
        pending = list(jobs)
        temperatures = options.temperatures()
        for attempt, temperature in enumerate(temperatures):
            outputs = self._decode(pending, options, temperature)
            retry = []
            for job, output in zip(pending, outputs):
                decoded = self._attempt(output, temperature)
                tried[job].append((output, decoded))
                if attempt_failed(decoded, thresholds) and attempt < len(temperatures) - 1:
                    retry.append(job)
            if not retry:
                break
            logger.info("temperature fallback: %d of %d windows decoded again", len(retry), len(jobs))
            pending = retry
        for job, decodes in tried.items():
            self._keep(job, decodes, thresholds)

    def _attempt(self, output: WindowOutput, temperature: float) -> DecodeAttempt:
        hypothesis = output.hypothesis
        return DecodeAttempt(self.tokenizer.decode(hypothesis.tokens), hypothesis.avg_logprob,
                             hypothesis.no_speech_prob, temperature)

    def _keep(self, job: _WindowJob, decodes: list[tuple[WindowOutput, DecodeAttempt]],
              thresholds: QualityThresholds) -> None:
        """The decode `select_attempt` picks; a window whose every decode is a loop keeps no text."""
        choice = select_attempt([attempt for _, attempt in decodes], thresholds)
        if choice is not None:
            job.output, job.temperature = decodes[choice][0], decodes[choice][1].temperature
            return
        start, end = job.window.start / SAMPLE_RATE, job.window.end / SAMPLE_RATE
        logger.warning("window %.2f-%.2f s: every decode was a loop (compression ratio over %s at every "
                       "temperature); its text is left out", start, end, thresholds.compression_ratio)
        last = decodes[-1][0].hypothesis
        job.output = WindowOutput(Hypothesis(tokens=[], no_speech_prob=last.no_speech_prob))
        job.temperature = decodes[-1][1].temperature

    def _decode(self, jobs: list[_WindowJob], options: TranscribeOptions, temperature: float) -> list[WindowOutput]:
        decode_options = options.decode_options(temperature)
        outputs: list[WindowOutput] = []
        for first in range(0, len(jobs), options.batch_size):
            batch = jobs[first : first + options.batch_size]
            outputs += self.decoder.decode([job.audio for job in batch], [self._prompt(job, options) for job in batch],
                                           decode_options, options.word_timestamps)
        return outputs

    # ---- segments -------------------------------------------------------------------------
    def _segments(self, jobs: list[_WindowJob], options: TranscribeOptions) -> list[Segment]:
        thresholds = options.thresholds()
        segments: list[Segment] = []
        for job in jobs:
            hypothesis = job.output.hypothesis
            if is_silence(hypothesis.no_speech_prob, hypothesis.avg_logprob, thresholds):
                continue
            pieces = split_on_timestamps(hypothesis.tokens, self.tokenizer.timestamp_begin, self.tokenizer.eot,
                                         job.window.duration)
            consumed = 0
            for index, piece in enumerate(pieces):
                text = self.tokenizer.decode(piece.tokens)
                repeated = job.follow_up and index == 0 and segments and _same_text(segments[-1].text, text)
                if not text.strip() or repeated:  # a follow-up may start by repeating the last segment
                    consumed += len(piece.tokens)
                    continue
                # Whisper ends a segment at the next word's onset: past the next stretch's onset padding
                snap = options.vad_speech_pad_ms / 1000 + JUNCTION_MARGIN_S
                start = job.window.file_time(piece.start, "start", snap)
                end = max(job.window.file_time(max(piece.end, piece.start), "end", snap), start)
                words = None
                if options.word_timestamps and job.output.timings is not None:
                    words = self._words(piece.tokens, job.output.timings, consumed, job.window, start, end)
                consumed += len(piece.tokens)
                segments.append(Segment(
                    id=len(segments), start=round(start, 3), end=round(end, 3), text=text, tokens=piece.tokens,
                    avg_logprob=float(hypothesis.avg_logprob or 0.0), compression_ratio=compression_ratio(text),
                    no_speech_prob=float(hypothesis.no_speech_prob or 0.0), temperature=job.temperature,
                    language=job.language if options.language_detection == "chunk" else None, words=words,
                ))
        return segments

    def _words(self, tokens: list[int], timings: TokenTimings, first: int, window: Window,
               start: float, end: float) -> list[Word]:
        words: list[Word] = []
        group: list[int] = []
        for position, token in enumerate(tokens):
            piece = self.tokenizer.decode([token])
            if group and piece.startswith(" "):
                words.append(self._word(tokens, group, timings, first, window, start, end))
                group = []
            group.append(position)
        if group:
            words.append(self._word(tokens, group, timings, first, window, start, end))
        return [word for word in words if word.word.strip()]

    def _word(self, tokens, group, timings: TokenTimings, first, window: Window, start, end) -> Word:
        indices = [first + i for i in group if first + i < len(timings.starts)]
        text = self.tokenizer.decode([tokens[i] for i in group])
        if not indices:
            return Word(round(start, 3), round(end, 3), text, 0.0)
        word_start = min(max(window.file_time(timings.starts[indices[0]], "start"), start), end)
        word_end = min(max(window.file_time(timings.ends[indices[-1]], "end"), word_start), end)
        probability = float(np.mean([timings.probabilities[i] for i in indices]))
        return Word(round(word_start, 3), round(word_end, 3), text, round(probability, 4))


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _combine(detected: list[dict[str, float]], weights: list[float]) -> tuple[str, float]:
    totals: dict[str, float] = {}
    for probs, weight in zip(detected, weights):
        for language, probability in probs.items():
            totals[language] = totals.get(language, 0.0) + probability * weight
    language = max(totals, key=totals.get)
    return language, round(totals[language] / max(sum(weights), 1e-9), 4)
