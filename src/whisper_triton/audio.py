"""Decode audio bytes of any common container/codec to 16 kHz mono float32, in memory, with PyAV."""

from __future__ import annotations

import io
import logging

import av
import numpy as np

from .errors import InvalidAudioError, PayloadTooLargeError

SAMPLE_RATE = 16_000

logger = logging.getLogger(__name__)
av.logging.set_level(av.logging.PANIC)  # FFmpeg's own chatter about odd input is noise in our logs


def decode_audio(data: bytes, max_seconds: float | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return mono float32 samples at `sample_rate` decoded from `data`.

    Raises InvalidAudioError for bytes that are not decodable audio (the message says why),
    and PayloadTooLargeError as soon as more than `max_seconds` have been decoded.
    """
    if not data:
        raise InvalidAudioError("The request body is empty: send the audio file's bytes.")
    max_samples = None if max_seconds is None else int(max_seconds * sample_rate)
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise InvalidAudioError(
            f"The body is not a readable audio file ({_reason(exc)}). Send wav, flac, mp3, ogg, "
            "opus, m4a/aac or webm audio."
        ) from exc
    with container:
        if not container.streams.audio:
            raise InvalidAudioError("The file holds no audio stream. Send a file with an audio track.")
        samples = _decode_stream(container, container.streams.audio[0], sample_rate, max_samples)
    if samples.size == 0:
        raise InvalidAudioError(
            "The file decodes to zero audio samples (empty or truncated). Send a complete audio file."
        )
    return samples


def _decode_stream(container, stream, sample_rate: int, max_samples: int | None) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        for frame in container.decode(stream):
            frame.pts = None  # resample by sample count; broken timestamps must not drop audio
            for out in resampler.resample(frame):
                total += _append(chunks, out)
            if max_samples is not None and total > max_samples:
                raise PayloadTooLargeError(
                    f"The audio is longer than the limit of {max_samples / sample_rate:g} s. "
                    "Send shorter audio or split it."
                )
        for out in resampler.resample(None):
            total += _append(chunks, out)
    except (av.FFmpegError, ValueError) as exc:
        if total == 0:
            raise InvalidAudioError(
                f"The audio could not be decoded ({_reason(exc)}). Send a complete, uncorrupted file."
            ) from exc
        raise InvalidAudioError(
            f"The audio is corrupt or truncated after {total / sample_rate:.2f} s ({_reason(exc)}). "
            "Send the complete file."
        ) from exc
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _append(chunks: list[np.ndarray], frame) -> int:
    array = frame.to_ndarray().reshape(-1)
    chunks.append(array)
    return array.size


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.replace("\n", " ")[:200]
