"""Voice activity detection with Silero VAD's ONNX model, run by onnxruntime (no torch).

The model file comes from the `silero-vad` wheel, located without importing the package (its
`__init__` imports torch). The sequence variant scores a whole block of 32 ms frames per call.

Long audio is scored in sections of a minute on parallel threads (onnxruntime releases the GIL):
VAD runs before a file's first window can be decoded, so its wall time is the file's wait. Each
section starts with the model's state run over the 16 s before it (those scores are dropped), so
the spans are those of the uninterrupted pass (tests/test_vad.py compares the two): 345 -> 242 ms
for 305 s on 2 cores.

A request's cancellation (`cancelled`, Triton's flag) is asked before each block of ~16 s, so a
file whose client left stops being scored within one block per section, not after the whole file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from ..contract.options import VadOptions
from .windows import stop_if_cancelled

logger = logging.getLogger(__name__)

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees first
BLOCK_FRAMES = 512  # frames per onnxruntime call (~16 s)
MODEL_FILE = "silero_vad_16k_sequence.onnx"
SECTION_FRAMES = 1875  # 60 s: audio up to 1.5 sections is scored in one pass
WARMUP_FRAMES = 500  # 16 s scored before each later section to bring the model's state in (4 s is not enough)


@dataclass(frozen=True)
class Span:
    """A stretch of audio in samples, [start, end)."""

    start: int
    end: int

    @property
    def seconds(self) -> tuple[float, float]:
        return self.start / SAMPLE_RATE, self.end / SAMPLE_RATE


def model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "Silero VAD's model is missing: install the 'silero-vad' wheel (pip install --no-deps "
            "silero-vad==6.2.3; only its ONNX file is used), or turn VAD off (vad=false)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the silero-vad wheel; install silero-vad==6.2.3.")
    return path


@lru_cache(maxsize=1)
def _session():
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # VAD is cheap; leave the cores to the engine
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(model_path()), options, providers=["CPUExecutionProvider"])


def _frames_with_context(audio: np.ndarray) -> np.ndarray:
    """[n_frames, CONTEXT + FRAME]: each frame preceded by the tail of the one before."""
    n_frames = max(1, -(-audio.size // FRAME))
    frames = np.zeros((n_frames, FRAME), dtype=np.float32)
    frames.reshape(-1)[: audio.size] = audio
    context = np.zeros((n_frames, CONTEXT), dtype=np.float32)
    context[1:] = frames[:-1, -CONTEXT:]
    return np.concatenate([context, frames], axis=1)


def _score(frames: np.ndarray, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
    session = _session()
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    probabilities = []
    for first in range(0, frames.shape[0], BLOCK_FRAMES):
        stop_if_cancelled(cancelled)  # a dropped request stops within one block
        probs, h, c = session.run(None, {"input": frames[first : first + BLOCK_FRAMES], "h": h, "c": c})
        probabilities.append(probs.reshape(-1))
    return np.concatenate(probabilities)


THREADS = max(1, min(4, os.cpu_count() or 1))  # sections scored at once


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="vad")


def speech_probabilities(audio: np.ndarray, parallel: bool = True,
                         cancelled: Callable[[], bool] | None = None) -> np.ndarray:
    """One speech probability per 32 ms frame of 16 kHz audio; `cancelled()` True stops it
    (RequestCancelled) before the next block."""
    stop_if_cancelled(cancelled)
    frames = _frames_with_context(np.asarray(audio, dtype=np.float32).reshape(-1))
    total = frames.shape[0]
    if not parallel or total <= SECTION_FRAMES * 3 // 2 or THREADS == 1:
        return _score(frames, cancelled)
    starts = list(range(0, total, SECTION_FRAMES))

    def section(start: int) -> np.ndarray:
        warm = max(0, start - WARMUP_FRAMES)
        return _score(frames[warm : min(total, start + SECTION_FRAMES)], cancelled)[start - warm :]

    return np.concatenate(list(_pool().map(section, starts)))


def speech_spans(audio: np.ndarray, options: VadOptions = VadOptions(),
                 cancelled: Callable[[], bool] | None = None) -> list[Span]:
    """Speech stretches of `audio`, padded, with pauses shorter than min_silence_ms bridged."""
    if audio.size == 0:
        return []
    return spans_from_probabilities(speech_probabilities(audio, cancelled=cancelled), audio.size, options)


def spans_from_probabilities(probs: np.ndarray, n_samples: int, options: VadOptions) -> list[Span]:
    """Hysteresis on frame probabilities: enter at `threshold`, leave below threshold - 0.15."""
    leave = max(options.threshold - 0.15, 0.01)
    min_silence = options.min_silence_ms * SAMPLE_RATE // 1000
    raw: list[list[int]] = []
    start, silence_since = None, None
    for index, prob in enumerate(probs):
        position = index * FRAME
        if start is None:
            if prob >= options.threshold:
                start, silence_since = position, None
        elif prob >= options.threshold:
            silence_since = None
        elif prob < leave:
            silence_since = position if silence_since is None else silence_since
            if position + FRAME - silence_since >= min_silence:
                raw.append([start, silence_since])
                start, silence_since = None, None
    if start is not None:
        raw.append([start, n_samples])
    min_speech = options.min_speech_ms * SAMPLE_RATE // 1000
    kept = [span for span in raw if span[1] - span[0] >= min_speech]
    return _pad(kept, n_samples, options.speech_pad_ms * SAMPLE_RATE // 1000, options.end_pad_ms * SAMPLE_RATE // 1000)


def _pad(spans: list[list[int]], n_samples: int, before: int, after: int) -> list[Span]:
    padded: list[list[int]] = []
    previous_end = 0
    for start, end in spans:
        low = max(0, start - before)
        high = min(n_samples, end + after)
        if padded and low < padded[-1][1]:  # a short pause: split it between the neighbours
            boundary = previous_end + (start - previous_end) * after // max(1, before + after)
            padded[-1][1] = max(padded[-1][0], boundary)
            low = boundary
        padded.append([low, high])
        previous_end = end
    return [Span(int(s), int(e)) for s, e in padded if e > s]


class VadStream:
    """Silero VAD over audio that arrives in pieces (a live session): one speech probability per
    32 ms frame as soon as the frame is complete, the model's state carried from call to call, so
    the probabilities are those of one pass over the whole stream (tests/test_vad.py compares them)."""

    def __init__(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)  # the tail of the last frame scored
        self._pending = np.zeros(0, dtype=np.float32)  # samples of a frame not yet complete
        self.frames = 0  # frames scored so far

    def push(self, audio: np.ndarray) -> np.ndarray:
        """The probabilities of the frames `audio` completes (possibly none)."""
        samples = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32).reshape(-1)])
        complete = samples.size // FRAME
        self._pending = samples[complete * FRAME:]
        if complete == 0:
            return np.zeros(0, dtype=np.float32)
        frames = samples[: complete * FRAME].reshape(complete, FRAME)
        context = np.empty((complete, CONTEXT), dtype=np.float32)
        context[0] = self._context
        context[1:] = frames[:-1, -CONTEXT:]
        self._context = frames[-1, -CONTEXT:].copy()
        batch = np.concatenate([context, frames], axis=1)
        probabilities = []
        for first in range(0, complete, BLOCK_FRAMES):
            probs, self._h, self._c = _session().run(None, {"input": batch[first : first + BLOCK_FRAMES],
                                                            "h": self._h, "c": self._c})
            probabilities.append(probs.reshape(-1))
        self.frames += complete
        return np.concatenate(probabilities).astype(np.float32)
