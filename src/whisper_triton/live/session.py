"""One live transcription session: client events in, server events out (contract/realtime.py).

The utterance state machine, with server VAD (`turn_detection: server_vad`):

    silence --(a frame at >= threshold)--> speech   speech_started (audio_start_ms incl. prefix padding)
    speech  --(silence for end_pad_ms)---> speech   the final decode starts at once, on the utterance as
                                                    it will be if the silence holds (eager end of turn)
    speech  --(speech again)-------------> speech   that early final is dropped
    speech  --(silence_duration_ms)------> silence  speech_stopped, committed; the final (often done by
                                                    now) -> completion delta, completed
    speech  --(29.5 s of utterance)------> speech   cut at the quietest 32 ms frame of its last 20 s
                                                    (lowest VAD probability, then lowest energy):
                                                    the first part is committed and finalized, the rest
                                                    goes on as a new item

While speech goes on, the open utterance is decoded every `partial_interval_s` of new audio (one
partial at a time per session; none while its final runs) and the local agreement
(`agreement.py`) turns the hypotheses into deltas that are never taken back; the final replaces
them (`completed` carries its transcript). Finals run one after another in item order, each with
the previous transcripts as its prompt. Without turn detection (`turn_detection: null`) the client
commits: audio accumulates (up to `max_buffer_s`) and each commit is decoded like a file.

Every decode runs on `executor` threads; the event loop only moves audio and events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from ..contract.realtime import (
    MIN_COMMIT_MS, AudioAppend, AudioClear, AudioCommit, Cleared, Committed, DurationUsage, EventError, FailureDetail,
    ServerVad, SessionCreated, SessionUpdate, SessionUpdated, SpeechStarted, SpeechStopped, TranscriptionCompleted,
    TranscriptionDelta, TranscriptionFailed, TranscriptionSession, new_id,
)
from ..errors import WhisperTritonError
from ..pipeline.audio import SAMPLE_RATE
from ..pipeline.vad import FRAME, VadStream
from .agreement import LocalAgreement
from .audio_input import LiveAudioInput
from .decoding import FinalText, UtteranceDecoder, prompt_text

logger = logging.getLogger(__name__)

LEAVE_MARGIN = 0.15  # hysteresis: a frame is silence below threshold - this (as pipeline/vad.py)


@dataclass(frozen=True)
class LiveLimits:
    partial_interval_s: float = 1.0  # new audio between two partial decodes of the open utterance
    min_partial_s: float = 1.0  # no partial of less utterance than this
    end_pad_ms: int = 200  # silence kept after the speech in the final's audio (Whisper likes some)
    max_utterance_s: float = 29.5  # an utterance is cut before Whisper's 30 s window
    cut_search_s: float = 20.0  # the quietest point is looked for in the utterance's last this-many seconds
    max_buffer_s: float = 600.0  # audio held uncommitted without turn detection
    history_items: int = 8  # previous transcripts kept for the prompt


class LiveObserver:
    """What a session reports for metrics (no-op here; `serve` counts them)."""

    def utterance(self, latency_s: float | None, audio_s: float, failed: bool) -> None: ...

    def first_delta(self, latency_s: float) -> None: ...


@dataclass(eq=False)
class _Item:
    id: str
    start: int  # first sample (absolute, 16 kHz) of the item's audio
    started_at: float  # monotonic time its speech_started was decided
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    last_partial_end: int = 0
    deltas: int = 0
    committed: bool = False


class LiveSession:
    def __init__(self, decoder: UtteranceDecoder, send: Callable[[object], Awaitable[None]], executor: Executor,
                 limits: LiveLimits = LiveLimits(), observer: LiveObserver | None = None):
        self.decoder = decoder
        self.send = send
        self.executor = executor
        self.limits = limits
        self.observer = observer or LiveObserver()
        self.config = TranscriptionSession()
        self._input = LiveAudioInput(self.config.audio.input.format.type)
        self._vad = VadStream()
        self._frames_seen = 0  # VAD frames turn detection has gone through
        self._audio = np.zeros(0, dtype=np.float32)  # samples from self._offset on
        self._offset = 0
        self.position = 0  # samples received (16 kHz)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4096)  # (end sample, arrival time) of appends
        self._uncommitted = 0  # first sample not yet committed
        self._probs: deque[float] = deque(maxlen=int(60 * SAMPLE_RATE / FRAME))  # recent frame probabilities
        self._item: _Item | None = None  # the open utterance (server VAD)
        self._silence_since: int | None = None
        self._eager: tuple[int, asyncio.Task] | None = None  # (end sample, task) of an early final
        self._partial: asyncio.Task | None = None
        self._last_final: asyncio.Task | None = None
        self._last_item_id: str | None = None
        self._history: deque[str] = deque(maxlen=limits.history_items)
        self._language: str | None = None  # detected by a final, used by the partials
        self._partial_seconds = 0.0  # how long the last partial decode took
        self._tasks: set[asyncio.Task] = set()
        self.utterances = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.send(SessionCreated(session=self.config))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the finals under way, e.g. before closing a session the client ended."""
        if self._last_final is not None:
            await asyncio.wait({self._last_final}, timeout=timeout_s)

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def turn_detection(self) -> ServerVad | None:
        return self.config.audio.input.turn_detection

    # ---- client events ------------------------------------------------------------------------
    async def handle(self, event) -> None:
        if isinstance(event, AudioAppend):
            await self._append(event)
        elif isinstance(event, SessionUpdate):
            await self._update(event)
        elif isinstance(event, AudioCommit):
            await self._commit(event)
        elif isinstance(event, AudioClear):
            await self._clear()

    async def _update(self, event: SessionUpdate) -> None:
        try:
            config = self.config.updated(event)
        except ValueError as exc:
            raise EventError(f"Invalid session: {exc}", "invalid_value", "session", event.event_id) from None
        language = config.audio.input.transcription.language
        if language:
            try:
                config.audio.input.transcription.language = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.decoder.check_language, language)
            except WhisperTritonError as exc:
                raise EventError(exc.message, "invalid_value", "session.audio.input.transcription.language",
                                 event.event_id) from None
        if config.audio.input.format.type != self.config.audio.input.format.type:
            self._input = LiveAudioInput(config.audio.input.format.type)
        if (config.audio.input.turn_detection is None) != (self.turn_detection is None):
            await self._close_open_item(keep_audio=True)
            self._vad, self._probs = VadStream(), deque(maxlen=self._probs.maxlen)
            self._frames_seen = self.position // FRAME  # the new VAD stream starts here
        self.config = config
        await self.send(SessionUpdated(session=self.config))

    async def _append(self, event: AudioAppend) -> None:
        data = event.audio_bytes()
        samples = self._input.convert(data)
        if self.turn_detection is None and (self.position + samples.size - self._uncommitted) > \
                self.limits.max_buffer_s * SAMPLE_RATE:
            raise EventError(f"The input audio buffer holds {self.limits.max_buffer_s:.0f} s, its limit without turn "
                             "detection: commit (input_audio_buffer.commit) or clear it.", "input_audio_buffer_full",
                             "audio", event.event_id)
        self._audio = np.concatenate([self._audio, samples])
        self.position += samples.size
        self._arrivals.append((self.position, time.monotonic()))
        if self.turn_detection is not None:
            for prob in self._vad.push(samples):
                await self._frame(float(prob))
            self._maybe_partial()
        self._trim()

    async def _commit(self, event: AudioCommit) -> None:
        if self._item is not None:
            await self._end_item(self.position, stopped=False)
            return
        pending = self.position - self._uncommitted
        if pending < MIN_COMMIT_MS * SAMPLE_RATE // 1000:
            raise EventError(f"Error committing input audio buffer: buffer too small. Expected at least "
                             f"{MIN_COMMIT_MS}ms of audio, but buffer only has {pending * 1000 // SAMPLE_RATE}ms of "
                             "audio.", "input_audio_buffer_commit_empty", None, event.event_id)
        start = max(self._uncommitted, self.position - int(self.limits.max_utterance_s * SAMPLE_RATE)) \
            if self.turn_detection is not None else self._uncommitted
        item = _Item(new_id("item"), start, time.monotonic())
        await self._finish(item, self.position, manual=self.turn_detection is None)

    async def _clear(self) -> None:
        await self._close_open_item(keep_audio=False)
        self._uncommitted = self.position
        self._trim()
        await self.send(Cleared())

    async def _close_open_item(self, keep_audio: bool) -> None:
        """Drop the open utterance without a transcript (clear, or a change of turn detection)."""
        if self._eager is not None:
            self._eager[1].cancel()
            self._eager = None
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None
        if self._item is not None and keep_audio:
            self._uncommitted = min(self._uncommitted, self._item.start)
        self._item, self._silence_since = None, None

    # ---- turn detection ------------------------------------------------------------------------
    async def _frame(self, prob: float) -> None:
        vad = self.turn_detection
        assert vad is not None
        self._probs.append(prob)
        self._frames_seen += 1
        end = self._frames_seen * FRAME  # this frame's end
        frame_start = end - FRAME
        if self._item is None:
            if prob >= vad.threshold:
                start = max(self._uncommitted, frame_start - vad.prefix_padding_ms * SAMPLE_RATE // 1000)
                self._item = _Item(new_id("item"), start, time.monotonic(), last_partial_end=start)
                self._silence_since = None
                await self.send(SpeechStarted(audio_start_ms=_ms(start), item_id=self._item.id))
            return
        if prob >= vad.threshold:
            self._silence_since = None
            if self._eager is not None:  # the pause was not the end: the early final is not needed
                self._eager[1].cancel()
                self._eager = None
        elif prob < max(vad.threshold - LEAVE_MARGIN, 0.01) and self._silence_since is None:
            self._silence_since = frame_start
        if self._silence_since is not None:
            silent = end - self._silence_since
            final_end = self._silence_since + self.limits.end_pad_ms * SAMPLE_RATE // 1000
            if self._eager is None and end >= final_end:
                audio = self._slice(self._item.start, final_end)
                self._eager = (final_end, self._spawn(self._decode_final(audio, False, self._last_final)))
            if silent >= vad.silence_duration_ms * SAMPLE_RATE // 1000:
                await self._end_item(final_end, stopped=True, speech_end=self._silence_since)
                return
        if end - self._item.start >= self.limits.max_utterance_s * SAMPLE_RATE:
            await self._cut()

    async def _end_item(self, end: int, stopped: bool, speech_end: int | None = None) -> None:
        item, self._item, self._silence_since = self._item, None, None
        assert item is not None
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None
        eager, self._eager = self._eager, None
        if stopped:
            await self.send(SpeechStopped(audio_end_ms=_ms(self._frames_seen * FRAME), item_id=item.id))
        reuse = eager[1] if eager is not None and eager[0] == end else None
        if eager is not None and reuse is None:
            eager[1].cancel()
        await self._finish(item, min(end, self.position), reuse=reuse, speech_end=speech_end)

    async def _cut(self) -> None:
        """The open utterance reached max_utterance_s: commit it up to its quietest frame, go on after it."""
        item = self._item
        assert item is not None
        frames = list(self._probs)
        total = self._frames_seen
        first_frame = max(item.start // FRAME + 1, total - int(self.limits.cut_search_s * SAMPLE_RATE / FRAME),
                          total - len(frames))
        candidates = range(first_frame, total - 1)
        if not candidates:
            cut = total * FRAME
        else:
            def quietness(index: int) -> tuple[float, float]:
                start = index * FRAME - self._offset
                energy = float(np.mean(self._audio[max(0, start): start + FRAME] ** 2)) if start + FRAME > 0 else 0.0
                return frames[index - (total - len(frames))], energy

            cut = min(candidates, key=quietness) * FRAME + FRAME // 2
        if self._eager is not None:
            self._eager[1].cancel()
            self._eager = None
        self._item = None
        logger.info("live utterance reached %.1f s: cut at %.2f s (its quietest frame)",
                    self.limits.max_utterance_s, cut / SAMPLE_RATE)
        await self._finish(item, cut)
        self._item = _Item(new_id("item"), cut, time.monotonic(), last_partial_end=cut)
        self._silence_since = None
        await self.send(SpeechStarted(audio_start_ms=_ms(cut), item_id=self._item.id))

    # ---- decoding ------------------------------------------------------------------------------
    def _maybe_partial(self) -> None:
        item = self._item
        if item is None or self._partial is not None or self._eager is not None or self._silence_since is not None:
            return  # one partial at a time, and none in a pause that may end the utterance (its final comes)
        if self._last_final is not None and not self._last_final.done():
            return  # the engine is finishing the previous utterance: its final comes first
        length = self.position - item.start
        # the cadence slows down when partials take long (a loaded engine): at most a third of the time decoding
        interval = max(self.limits.partial_interval_s, 3 * self._partial_seconds)
        if length < self.limits.min_partial_s * SAMPLE_RATE or \
                self.position - item.last_partial_end < interval * SAMPLE_RATE:
            return
        item.last_partial_end = self.position
        self._partial = self._spawn(self._run_partial(item, self.position))

    async def _run_partial(self, item: _Item, end: int) -> None:
        audio = self._slice(item.start, end)
        prompt = prompt_text(self.config.audio.input.transcription.prompt, list(self._history))
        language = self.config.audio.input.transcription.language or self._language
        started = time.monotonic()
        try:
            text = await asyncio.get_running_loop().run_in_executor(self.executor, self.decoder.partial, audio,
                                                                    language, prompt)
            self._partial_seconds = time.monotonic() - started
        except WhisperTritonError as exc:
            logger.warning("a partial decode failed (%s); the final will carry the text", exc.message)
            return
        finally:
            if self._partial is asyncio.current_task():
                self._partial = None
        if item is not self._item or item.committed:
            return  # the utterance ended while this partial ran: the final replaces it
        delta = item.agreement.update(text)
        if delta:
            await self._delta(item, delta)

    async def _delta(self, item: _Item, delta: str) -> None:
        if item.deltas == 0:
            self.observer.first_delta(time.monotonic() - item.started_at)
        item.deltas += 1
        await self.send(TranscriptionDelta(item_id=item.id, delta=delta))

    async def _decode_final(self, audio: np.ndarray, manual: bool, previous: asyncio.Task | None) -> FinalText:
        if previous is not None:
            await asyncio.wait({previous})  # the previous utterance's transcript is this one's prompt
        prompt = prompt_text(self.config.audio.input.transcription.prompt, list(self._history))
        language = self.config.audio.input.transcription.language
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.decoder.final, audio, language,
                                                                prompt, manual)

    async def _finish(self, item: _Item, end: int, reuse: asyncio.Task | None = None, manual: bool = False,
                      speech_end: int | None = None) -> None:
        """Commit `item` (audio up to `end`) and transcribe it after the previous items."""
        item.committed = True
        self._uncommitted = max(self._uncommitted, end)
        await self.send(Committed(item_id=item.id, previous_item_id=self._last_item_id))
        self._last_item_id = item.id
        decode = reuse if reuse is not None else self._spawn(
            self._decode_final(self._slice(item.start, end), manual, self._last_final))
        spoken = self._arrival(end if speech_end is None else speech_end)
        self._last_final = self._spawn(self._complete(item, decode, (end - item.start) / SAMPLE_RATE, spoken))
        self.utterances += 1
        self._trim()

    async def _complete(self, item: _Item, decode: asyncio.Task, seconds: float, speech_end: float | None) -> None:
        try:
            final = await decode
        except WhisperTritonError as exc:
            logger.warning("live utterance %s could not be transcribed: %s", item.id, exc.message)
            self.observer.utterance(None, seconds, failed=True)
            await self.send(TranscriptionFailed(item_id=item.id, error=FailureDetail(
                type=exc.type, code="transcription_failed", message=exc.message, param=exc.param)))
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed utterance must not end the session
            logger.exception("live utterance %s could not be transcribed", item.id)
            self.observer.utterance(None, seconds, failed=True)
            await self.send(TranscriptionFailed(item_id=item.id, error=FailureDetail(
                type="server_error", code="transcription_failed",
                message="The transcription of this utterance failed; the session goes on.")))
            return
        self._history.append(final.text)
        if final.language:
            self._language = final.language
        completion = item.agreement.completion(final.text)
        if completion:
            await self._delta(item, completion)
        latency = None if speech_end is None else time.monotonic() - speech_end
        self.observer.utterance(latency, seconds, failed=False)
        await self.send(TranscriptionCompleted(item_id=item.id, transcript=final.text,
                                               usage=DurationUsage(seconds=round(seconds, 3))))

    # ---- audio held ----------------------------------------------------------------------------
    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._audio[max(0, start - self._offset): max(0, end - self._offset)].copy()

    def _arrival(self, sample: int) -> float | None:
        """When `sample` was spoken, as the appends' arrival shows it (for the speech-end-to-final latency):
        the arrival of the append holding it, less the audio after it in that append."""
        for end, arrived in self._arrivals:
            if end >= sample:
                return arrived - (end - sample) / SAMPLE_RATE
        return None

    def _trim(self) -> None:
        """Keep only what a later decode can need: the open utterance, uncommitted audio, the prefix padding."""
        keep = self._uncommitted
        if self._item is not None:
            keep = min(keep, self._item.start)
        if self.turn_detection is not None:  # an utterance is never longer, nor a commit's audio
            keep = max(keep, self.position - int((self.limits.max_utterance_s + 1) * SAMPLE_RATE))
        drop = keep - self._offset
        if drop > SAMPLE_RATE:  # in steps of a second or more, not per append
            self._audio = self._audio[drop:]
            self._offset = keep


def _ms(sample: int) -> int:
    return int(sample * 1000 // SAMPLE_RATE)
