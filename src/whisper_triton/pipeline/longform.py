"""Long-form pipeline above the engine interface: VAD -> windows -> batched decoding with
temperature fallback -> segments (and words) on the file's timeline.

It drives any window decoder: `transcribe.EngineWindowDecoder` in-process, or the Triton
`whisper_window` model through BLS (`triton_models/transcribe_model.py`), so it works the same on
every engine.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .audio import SAMPLE_RATE
from ..contract.capabilities import EngineCapabilities
from ..contract.options import DecodeOptions, QualityThresholds, TranscribeOptions
from ..contract.results import LeftOut, Segment, TranscriptionInfo, TranscriptionResult, Word, Work
from .decoding import (DecodeAttempt, attempt_failed, compression_ratio, is_loop, is_silence, select_attempt,
                       split_on_timestamps)
from ..contract.engine import Hypothesis, TokenTimings
from ..errors import invalid_parameter
from .segmenter import Window, fixed_windows, windows_from_speech
from .tokenizer import PromptSpec, WhisperTokenizer
from .windows import WindowOutput, stop_if_cancelled, unsupported_word_timestamps
from .vad import spans_from_probabilities, speech_spans

__all__ = ["LongFormTranscriber", "StreamChunk", "TranscribeOptions", "TranscriptionResult", "WindowDecoder", "not_applied"]

logger = logging.getLogger(__name__)

MAX_FOLLOW_UPS = 2  # times the rest of a window may be decoded again
JUNCTION_MARGIN_S = 0.2  # timestamp slack around a left-out pause
UNCOVERED_SPEECH_S = 1.5  # speech left after the last segment that counts as dropped
# where the language was unsure and every decode failed, the next most probable languages tried
LANGUAGE_CANDIDATES = 2
MIN_CANDIDATE_PROBABILITY = 0.05  # a language less probable than this is not worth a decode
# a language the detector found less probable must be read with more confidence than the usual
# log-prob check asks: its decode's avg_logprob at least this share of `log_prob_threshold` (-1 -> -0.6).
# Calibrated on recorded prompts (bench/real_speech.py, 2026-12-07): Spanish detected as Portuguese
# decodes as Spanish at -0.58 (right); a Russian word detected as Polish decodes as Arabic at -0.76 (junk)
SWITCH_CONFIDENCE = 0.6


class WindowDecoder(Protocol):
    """Decodes windows (<= 30 s): in-process (`transcribe.EngineWindowDecoder`) or through Triton."""

    capabilities: EngineCapabilities

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, scope: str | None = None) -> list[WindowOutput]: ...

    def detect_language(self, audios: list[np.ndarray], scope: str | None = None) -> list[dict[str, float]]: ...


# rule of the pipeline -> the capability it needs (for `info.not_applied`)
RULE_NEEDS = {
    "no_speech": "no_speech_prob",  # silence: no-speech probability high and decode not confident
    "log_prob_fallback": "scores",  # decode again at a higher temperature when avg_logprob is low
    "timestamp_rules": "timestamp_rules",  # openai-whisper's rules while decoding timestamps
    "language_probability": "language_probabilities",
    "unsure_language": "language_probabilities",  # leave out a failed window in a language detected unsure
}


def not_applied(capabilities: EngineCapabilities, options: TranscribeOptions) -> dict[str, str]:
    """The rules this request asks for that the engine cannot apply, with why."""
    wanted = {
        "no_speech": options.no_speech_threshold is not None,
        "log_prob_fallback": options.log_prob_threshold is not None and len(options.temperature) > 1,
        "timestamp_rules": not options.without_timestamps,
        "language_probability": options.language is None and capabilities.multilingual,
        "unsure_language": (options.unsure_language_threshold is not None and options.language is None
                            and capabilities.multilingual),
    }
    return {rule: capabilities.missing_reason(RULE_NEEDS[rule]) for rule, asked in wanted.items()
            if asked and not getattr(capabilities, RULE_NEEDS[rule])}


@dataclass(eq=False)
class _WindowJob:
    window: Window
    audio: np.ndarray
    language: str
    output: WindowOutput | None = None
    temperature: float = 0.0
    follow_up: bool = False  # the rest of a window whose decode stopped before its speech ended
    language_probability: float = 1.0  # 1.0 where the caller gave the language (or the model has one)
    left_out: str | None = None  # why a guard left this window's text out (a LeftOut reason)
    candidates: tuple[tuple[str, float], ...] = ()  # the next most probable languages, (code, probability)
    rescued: bool = False  # kept in a candidate language after its detected language failed every check


@dataclass
class StreamChunk:
    """What `LongFormTranscriber.transcribe_iter` yields: the next segments, with what is known of the file."""

    segments: list[Segment]
    language: str
    language_probability: float
    duration: float
    info: TranscriptionInfo
    done: bool = False  # the last chunk of the file


@dataclass
class _Run:
    """One request's state: its encoder-reuse scope (a random id: nothing crosses requests) and its work."""

    options: TranscribeOptions
    audio: np.ndarray
    work: Work = field(default_factory=Work)
    cancelled: Callable[[], bool] | None = None  # the request's cancellation, asked between blocks of work
    scope: str = field(default_factory=lambda: uuid.uuid4().hex)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.work.add_seconds(stage, time.perf_counter() - started)


class LongFormTranscriber:
    def __init__(self, decoder: WindowDecoder, tokenizer: WhisperTokenizer):
        self.decoder = decoder
        self.tokenizer = tokenizer

    def check(self, options: TranscribeOptions) -> TranscribeOptions:
        """Refuse what this model and engine cannot do, naming the option: once, before any audio work."""
        capabilities = self.decoder.capabilities
        if options.language is not None:
            options.language = self.tokenizer.validate_language(options.language)
        self.tokenizer.validate_task(options.task)
        if options.task == "translate" and not capabilities.translate:
            raise invalid_parameter("task", "This model cannot translate (it was not trained to: large-v3-turbo and "
                                    "English-only models). Use task 'transcribe', or serve a model that translates.")
        if options.word_timestamps and not capabilities.word_timestamps:
            raise unsupported_word_timestamps(capabilities)
        if options.beam_size > capabilities.max_beam_size:
            why = capabilities.notes.get("beam_size")
            raise invalid_parameter("beam_size", f"beam_size must be at most {capabilities.max_beam_size} on this "
                                    f"engine, got {options.beam_size}" + (f": {why}." if why else "."))
        return options

    def windows(self, audio: np.ndarray, options: TranscribeOptions,
                speech: np.ndarray | None = None, cancelled: Callable[[], bool] | None = None) -> list[Window]:
        """The windows to decode; `speech`: VAD frame probabilities already computed for `audio` (the
        speaker diarization uses the same ones), else VAD runs here."""
        if not options.vad:
            return fixed_windows(audio.size, options.chunk_length)
        if speech is not None:
            spans = spans_from_probabilities(speech, audio.size, options.vad_options) if audio.size else []
        else:
            spans = speech_spans(audio, options.vad_options, cancelled)  # asked per block of VAD
        return windows_from_speech(spans, options.chunk_length)

    def _start(self, audio: np.ndarray, options: TranscribeOptions, speech: np.ndarray | None = None,
               cancelled: Callable[[], bool] | None = None) -> tuple[_Run, TranscriptionInfo, list[Window]]:
        run = _Run(options, audio, cancelled=cancelled)
        info = TranscriptionInfo(engine=self.decoder.capabilities.engine,
                                 not_applied=not_applied(self.decoder.capabilities, options), work=run.work)
        with run.timed("vad"):
            windows = self.windows(audio, options, speech, cancelled)
        run.work.windows = len(windows)
        return run, info, windows

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions | None = None,
                   speech: np.ndarray | None = None, cancelled: Callable[[], bool] | None = None) -> TranscriptionResult:
        """The whole file's transcription; `cancelled()` True (the client left) stops it with RequestCancelled
        at the next block of VAD or batch of windows."""
        options = self.check(options or TranscribeOptions())
        duration = round(audio.size / SAMPLE_RATE, 3)
        run, info, windows = self._start(audio, options, speech, cancelled)
        if not windows:  # no speech at all: nothing to decode, nothing to invent
            return TranscriptionResult("", options.language or "en", 1.0 if options.language else 0.0, duration, [],
                                       info)
        jobs = [_WindowJob(w, w.extract(audio), options.language or "") for w in windows]
        language, probability = self._assign_languages(jobs, run)
        jobs = self._decode_until_covered(jobs, run)
        language, probability = _kept_language(jobs, language, probability)
        info.left_out = _left_out(jobs)
        segments = self._segments(jobs, options)
        text = "".join(segment.text for segment in segments).strip()
        return TranscriptionResult(text, language, probability, duration, segments, info)

    def transcribe_iter(self, audio: np.ndarray, options: TranscribeOptions | None = None,
                        cancelled: Callable[[], bool] | None = None,
                        speech: np.ndarray | None = None) -> Iterator[StreamChunk]:
        """`transcribe`, a chunk of windows at a time: each chunk's segments as soon as they are decoded,
        in timeline order, ids continuing across chunks. The windows of a chunk are decoded as one batch
        (with fallback and follow-ups, as `transcribe` does); the first chunk is one window, so the first
        segments come after one window, and every later chunk is `batch_size` windows, the batches
        `transcribe` sends (growing 1, 2, 4 ... cost a streamed file 1.4-2x its unstreamed time on the CPU
        engine, where small batches cost more per window). `cancelled()` is asked before each chunk: True
        stops the decoding (the client left); during VAD and between batches of a chunk it raises
        RequestCancelled."""
        options = self.check(options or TranscribeOptions())
        duration = round(audio.size / SAMPLE_RATE, 3)
        run, info, windows = self._start(audio, options, speech, cancelled)
        jobs = [_WindowJob(w, w.extract(audio), options.language or "") for w in windows]
        if jobs:
            language, probability = self._assign_languages(jobs, run)
        else:
            language, probability = options.language or "en", 1.0 if options.language else 0.0
        given: list[Segment] = []
        first, size = 0, 1
        while first < len(jobs) or first == 0:
            if cancelled is not None and cancelled():
                logger.info("stream cancelled after %d of %d windows", first, len(jobs))
                return
            chunk = jobs[first : first + size]
            decoded = self._decode_until_covered(chunk, run) if chunk else []
            info.left_out += _left_out(decoded)
            segments = self._segments(decoded, options, given) if chunk else []
            given += segments
            first += max(len(chunk), 1)
            size = options.batch_size
            yield StreamChunk(segments, language, probability, duration, info, done=first >= len(jobs))

    # ---- languages ------------------------------------------------------------------------
    def _assign_languages(self, jobs: list[_WindowJob], run: _Run) -> tuple[str, float]:
        options = run.options
        if options.language:
            return options.language, 1.0
        if not self.decoder.capabilities.multilingual:
            for job in jobs:
                job.language = "en"
            return "en", 1.0
        if options.language_detection == "chunk":
            detected = self._detect([job.audio for job in jobs], run)
            for job, probs in zip(jobs, detected):
                ranked = _ranked(probs)
                (job.language, job.language_probability), job.candidates = ranked[0], _candidates(ranked)
            return _combine(detected, weights=[job.window.duration for job in jobs])
        sample = jobs[: min(3, len(jobs))]  # the first windows of speech decide for the file
        ranked = _ranked(_combined(self._detect([job.audio for job in sample], run),
                                   weights=[job.window.duration for job in sample]))
        (language, probability), candidates = ranked[0], _candidates(ranked)
        for job in jobs:
            job.language, job.language_probability, job.candidates = language, probability, candidates
        return language, round(probability, 4)

    def _detect(self, audios: list[np.ndarray], run: _Run) -> list[dict[str, float]]:
        detected: list[dict[str, float]] = []
        batch_size = run.options.batch_size
        with run.timed("detection"):
            for first in range(0, len(audios), batch_size):
                stop_if_cancelled(run.cancelled)
                detected += self.decoder.detect_language(audios[first : first + batch_size], scope=run.scope)
        run.work.detections += len(audios)
        take = getattr(self.decoder, "take_detection_seconds", None)  # the engine's share, where told
        for stage, seconds in (take() if callable(take) else {}).items():
            run.work.add_seconds(stage, seconds)
        return detected

    # ---- decoding -------------------------------------------------------------------------
    def _prompt(self, job: _WindowJob, options: TranscribeOptions) -> list[int]:
        previous = " ".join(p.strip() for p in (options.initial_prompt, options.hotwords) if p and p.strip()) or None
        spec = PromptSpec(language=job.language, task=options.task, timestamps=not options.without_timestamps,
                          previous_text=previous)
        return self.tokenizer.prompt_ids(spec)

    def _decode_until_covered(self, jobs: list[_WindowJob], run: _Run) -> list[_WindowJob]:
        """Decode every window; where Whisper closed its last segment well before the window's speech
        ended (it drops trailing sentences now and then), decode the rest of that window again, as
        openai-whisper does by seeking to the last timestamp. All jobs come back in timeline order."""
        options, audio = run.options, run.audio
        ordered = list(jobs)
        pending = jobs
        for round_ in range(1 + MAX_FOLLOW_UPS):
            self._decode_with_fallback(pending, run)
            if options.without_timestamps or round_ == MAX_FOLLOW_UPS:
                break
            follow_ups = []
            for job in pending:
                rest = self._uncovered(job, options)
                if rest is not None:
                    follow = _WindowJob(rest, rest.extract(audio), job.language, follow_up=True,
                                        language_probability=job.language_probability, candidates=job.candidates,
                                        rescued=job.rescued)
                    ordered.insert(ordered.index(job) + 1, follow)
                    follow_ups.append(follow)
            if not follow_ups:
                break
            logger.info("%d windows stopped before their speech ended: decoding the rest", len(follow_ups))
            pending = follow_ups
        return ordered

    def _uncovered(self, job: _WindowJob, options: TranscribeOptions) -> Window | None:
        hypothesis = job.output.hypothesis
        if is_silence(hypothesis.no_speech_prob, hypothesis.avg_logprob, options.thresholds):
            return None
        pieces = split_on_timestamps(hypothesis.tokens, self.tokenizer.timestamp_begin, self.tokenizer.eot,
                                     job.window.duration)
        if not pieces:
            return None
        rest = job.window.after(pieces[-1].end)
        return rest if rest is not None and rest.duration >= UNCOVERED_SPEECH_S else None

    def _decode_with_fallback(self, jobs: list[_WindowJob], run: _Run) -> None:
        options = run.options
        thresholds = options.thresholds
        tried: dict[_WindowJob, list[tuple[WindowOutput, DecodeAttempt]]] = {job: [] for job in jobs}
        pending = list(jobs)
        temperatures = options.temperatures()
        for attempt, temperature in enumerate(temperatures):
            outputs = self._decode(pending, run, temperature)
            run.work.fallback_decodes += len(pending) if attempt else 0
            if attempt == 0:
                outputs = self._weigh_unsure_languages(pending, outputs, run, temperature)
            retry = []
            for job, output in zip(pending, outputs):
                decoded = self._attempt(output, temperature, job.window.duration)
                tried[job].append((output, decoded))
                if attempt_failed(decoded, thresholds) and attempt < len(temperatures) - 1:
                    retry.append(job)
            if not retry:
                break
            logger.info("temperature fallback: %d of %d windows decoded again", len(retry), len(jobs))
            pending = retry
        unsure = [job for job, decodes in tried.items() if self._unsure_failure(job, decodes, thresholds)]
        rescued = self._try_candidates(unsure, run) if unsure else set()
        for job, decodes in tried.items():
            if job not in rescued:
                self._keep(job, decodes, thresholds)

    def _weigh_unsure_languages(self, jobs: list[_WindowJob], outputs: list[WindowOutput], run: _Run,
                                temperature: float) -> list[WindowOutput]:
        """Where a window's language was detected unsure (under `unsure_language`), its first decode is
        weighed against one in the next most probable language: Whisper's detection reads one token,
        a whole decode reads the speech (Spanish detected as Portuguese at 0.42, Spanish 0.16: the
        Spanish decode is the more confident one). The decode that passes the checks, else the more
        confident one, is kept, and its language with it (with room to spare: `_confident_switch`);
        the other stays a candidate."""
        thresholds = run.options.thresholds
        if thresholds.unsure_language is None:
            return outputs
        unsure = [i for i, job in enumerate(jobs) if job.candidates and not job.follow_up
                  and job.language_probability < thresholds.unsure_language]
        if not unsure:
            return outputs
        trying = [jobs[i] for i in unsure]
        detected = [(job.language, job.language_probability) for job in trying]
        for job in trying:
            job.language, job.language_probability = job.candidates[0]
        others = self._decode(trying, run, temperature)
        run.work.language_retries += len(trying)
        outputs = list(outputs)
        for index, job, other, (language, probability) in zip(unsure, trying, others, detected):
            duration = job.window.duration
            if _better(self._attempt(other, temperature, duration), self._attempt(outputs[index], temperature, duration),
                       thresholds):
                outputs[index] = other
                job.candidates = ((language, probability),) + job.candidates[1:]
                job.rescued = True
                logger.info("window %.2f-%.2f s: decoded as %s (p %.2f) rather than %s (p %.2f): the more "
                            "confident decode", job.window.start / SAMPLE_RATE, job.window.end / SAMPLE_RATE,
                            job.language, job.language_probability, language, probability)
            else:
                job.language, job.language_probability = language, probability
        return outputs

    def _unsure_failure(self, job: _WindowJob, decodes: list[tuple[WindowOutput, DecodeAttempt]],
                        thresholds: QualityThresholds) -> bool:
        """Every decode failed while the window's language was detected unsure (the unsure-language guard)."""
        if thresholds.unsure_language is None or job.language_probability >= thresholds.unsure_language:
            return False
        attempts = [attempt for _, attempt in decodes]
        choice = select_attempt(attempts, thresholds)
        return choice is not None and attempt_failed(attempts[choice], thresholds)

    def _try_candidates(self, jobs: list[_WindowJob], run: _Run) -> set[_WindowJob]:
        """Windows whose detected language failed every check, decoded again in the next most probable
        languages (greedy, the first temperature): the first candidate whose decode passes the checks
        is kept (the model knew the speech, not its language). What fails in every candidate is left
        out by `_keep` (the guard: guesswork in another language stays withheld)."""
        thresholds, temperature = run.options.thresholds, run.options.temperatures()[0]
        rescued: set[_WindowJob] = set()
        pending = list(jobs)
        for rank in range(LANGUAGE_CANDIDATES):
            trying = [job for job in pending if len(job.candidates) > rank]
            if not trying:
                break
            detected = [(job.language, job.language_probability) for job in trying]
            for job in trying:
                job.language, job.language_probability = job.candidates[rank]
            outputs = self._decode(trying, run, temperature)
            run.work.language_retries += len(trying)
            for job, output, (language, probability) in zip(trying, outputs, detected):
                attempt = self._attempt(output, temperature, job.window.duration)
                if _confident_switch(attempt, thresholds):
                    job.output, job.temperature, job.rescued = output, temperature, True
                    rescued.add(job)
                    pending.remove(job)
                    logger.info("window %.2f-%.2f s: kept in %s (p %.2f) after %s (p %.2f) failed every check",
                                job.window.start / SAMPLE_RATE, job.window.end / SAMPLE_RATE, job.language,
                                job.language_probability, language, probability)
                else:
                    job.language, job.language_probability = language, probability
        return rescued

    def _attempt(self, output: WindowOutput, temperature: float, duration: float | None = None) -> DecodeAttempt:
        hypothesis = output.hypothesis
        return DecodeAttempt(self.tokenizer.decode(hypothesis.tokens), hypothesis.avg_logprob,
                             hypothesis.no_speech_prob, temperature, duration)

    def _keep(self, job: _WindowJob, decodes: list[tuple[WindowOutput, DecodeAttempt]],
              thresholds: QualityThresholds) -> None:
        """The decode `select_attempt` picks. Two guards leave a window's text out instead (and the
        answer's `info.left_out` says where and why): every decode was a loop (the loop cut), or every
        decode failed while the window's language was detected with less than
        `thresholds.unsure_language` probability (the model did not know the language: what it wrote
        is guesswork in another one; a caller who knows the language gives it and gets the text)."""
        attempts = [attempt for _, attempt in decodes]
        choice = select_attempt(attempts, thresholds)
        start, end = job.window.start / SAMPLE_RATE, job.window.end / SAMPLE_RATE
        if choice is None:
            logger.warning("window %.2f-%.2f s: every decode was a loop (compression ratio over %s at every "
                           "temperature); its text is left out", start, end, thresholds.compression_ratio)
            self._leave_out(job, decodes, "loop")
            return
        unsure = thresholds.unsure_language is not None and job.language_probability < thresholds.unsure_language
        if unsure and attempt_failed(attempts[choice], thresholds):
            logger.warning("window %.2f-%.2f s: every decode failed and the language (%s) was detected with "
                           "probability %.2f only; its text is left out", start, end, job.language,
                           job.language_probability)
            self._leave_out(job, decodes, "unsure_language")
            return
        job.output, job.temperature = decodes[choice][0], attempts[choice].temperature

    @staticmethod
    def _leave_out(job: _WindowJob, decodes: list[tuple[WindowOutput, DecodeAttempt]], reason: str) -> None:
        last = decodes[-1][0].hypothesis
        job.output = WindowOutput(Hypothesis(tokens=[], no_speech_prob=last.no_speech_prob))
        job.temperature, job.left_out = decodes[-1][1].temperature, reason

    def _decode(self, jobs: list[_WindowJob], run: _Run, temperature: float) -> list[WindowOutput]:
        options = run.options
        decode_options = options.decode_options(temperature)
        outputs: list[WindowOutput] = []
        with run.timed("decoding"):
            for first in range(0, len(jobs), options.batch_size):
                stop_if_cancelled(run.cancelled)  # between batches and rounds (fallback, follow-ups)
                batch = jobs[first : first + options.batch_size]
                outputs += self.decoder.decode([job.audio for job in batch],
                                               [self._prompt(job, options) for job in batch], decode_options,
                                               options.word_timestamps, scope=run.scope)
        run.work.decodes += len(jobs)
        run.work.follow_up_decodes += sum(1 for job in jobs if job.follow_up)
        for output in outputs:
            for stage, seconds in output.engine_seconds.items():
                run.work.add_seconds(stage, seconds)
        return outputs

    # ---- segments -------------------------------------------------------------------------
    def _segments(self, jobs: list[_WindowJob], options: TranscribeOptions,
                  previous: list[Segment] | None = None) -> list[Segment]:
        """The segments of `jobs`, after `previous` (the segments already given, for ids and repeats)."""
        thresholds = options.thresholds
        segments: list[Segment] = list(previous or [])
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
        return segments[len(previous or []):]

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


def _left_out(jobs: list[_WindowJob]) -> list[LeftOut]:
    return [LeftOut(round(job.window.start / SAMPLE_RATE, 3), round(job.window.end / SAMPLE_RATE, 3), job.left_out,
                    round(job.language_probability, 4) if job.left_out == "unsure_language" else None)
            for job in jobs if job.left_out]


def _confident_switch(attempt: DecodeAttempt, thresholds: QualityThresholds) -> bool:
    """A decode in a less probable language is kept only if it passes the checks with room to spare
    (`SWITCH_CONFIDENCE`): guesswork in another language often passes the plain log-prob check."""
    if attempt_failed(attempt, thresholds) or is_loop(attempt, thresholds) or not attempt.text.strip():
        return False
    if thresholds.log_prob is None or attempt.avg_logprob is None:
        return True
    return attempt.avg_logprob >= SWITCH_CONFIDENCE * thresholds.log_prob


def _better(candidate: DecodeAttempt, current: DecodeAttempt, thresholds: QualityThresholds) -> bool:
    """Is `candidate` (another language's decode) the one to keep: it passes the checks with room to
    spare (`_confident_switch`) and is more confident than `current`, or `current` failed them."""
    if not _confident_switch(candidate, thresholds):
        return False
    if attempt_failed(current, thresholds):
        return True
    if candidate.avg_logprob is None or current.avg_logprob is None:
        return False
    return candidate.avg_logprob > current.avg_logprob


def _kept_language(jobs: list[_WindowJob], language: str, probability: float) -> tuple[str, float]:
    """The answer's language: the detected one, unless every window that kept text was kept in one
    candidate language instead (a short clip whose detected language failed every check)."""
    kept = [job for job in jobs if not job.left_out and job.output is not None and job.output.hypothesis.tokens]
    if kept and all(job.rescued for job in kept) and len({job.language for job in kept}) == 1:
        return kept[0].language, round(kept[0].language_probability, 4)
    return language, probability


def _ranked(probabilities: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(((code, float(p)) for code, p in probabilities.items()), key=lambda item: -item[1])


def _candidates(ranked: list[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    return tuple(item for item in ranked[1 : 1 + LANGUAGE_CANDIDATES] if item[1] >= MIN_CANDIDATE_PROBABILITY)


def _combined(detected: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for probs, weight in zip(detected, weights):
        for language, probability in probs.items():
            totals[language] = totals.get(language, 0.0) + probability * weight
    total = max(sum(weights), 1e-9)
    return {language: value / total for language, value in totals.items()}


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _combine(detected: list[dict[str, float]], weights: list[float]) -> tuple[str, float]:
    totals: dict[str, float] = {}
    for probs, weight in zip(detected, weights):
        for language, probability in probs.items():
            totals[language] = totals.get(language, 0.0) + probability * weight
    language = max(totals, key=totals.get)
    return language, round(totals[language] / max(sum(weights), 1e-9), 4)
