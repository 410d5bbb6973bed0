"""Decode audio bytes of any common container/codec to 16 kHz mono float32, in memory, with PyAV.

Hostile or broken input, decided here once for every route:
- bytes after a valid stream (trailing junk), or a stream cut short: the audio decoded before the
  first undecodable data is kept, as faster-whisper's PyAV decoder does (it stops at the first
  `InvalidDataError` and keeps what it has); a warning is logged. Nothing decodable at all is a 400.
- samples that are not finite numbers (NaN, infinity; float WAV/CAF/AU/Matroska PCM can hold them)
  or beyond MAX_SAMPLE_MAGNITUDE:
  refused with a 400 naming `audio` and the time of the first one, never passed on (they would turn
  the log-mel features into NaN and the transcript silently empty). Refused rather than sanitised:
  such a file is corrupt, and zeroing samples would alter the audio without telling anyone.
- bodies that make FFmpeg reach outside them (an SDP text binds UDP ports and waits, an `ffconcat`
  list or a playlist opens local files or URLs): only the audio/video container demuxers of
  AUDIO_DEMUXERS may open a body (FFmpeg's `format_whitelist`, checked again after opening), and
  no protocol may be opened from inside one (`protocol_whitelist`). Every body that cannot be opened
  gets the same fixed message (NOT_AUDIO): FFmpeg's text is logged, never echoed, and never tells a
  file that exists from one that does not.
- work out of proportion to the body: a sample rate outside MIN/MAX_SAMPLE_RATE, more than
  MAX_CHANNELS channels, more than MAX_AUDIO_STREAMS audio streams are refused (400) before any
  decoding; the duration cap is checked in output samples BEFORE each resampler call (a 16 KB WAV at
  a tiny rate would otherwise grow to gigabytes inside one call).
"""

from __future__ import annotations

import ctypes
import io
import logging
import threading

import av
import numpy as np

from ..errors import InvalidAudioError, PayloadTooLargeError

SAMPLE_RATE = 16_000
# float PCM is nominally within +-1; beyond this (120 dB over full scale) a sample is not audio, and
# squared in the spectrum it overflows float32 into infinity
MAX_SAMPLE_MAGNITUDE = 1e6

logger = logging.getLogger(__name__)
av.logging.set_level(av.logging.PANIC)  # FFmpeg's own chatter about odd input is noise in our logs

# Demuxers a body may be opened with (FFmpeg names; a demuxer named "mov,mp4,m4a,..." matches on
# any of its names): the audio containers users send, telephony formats, and the video containers
# whose audio track is transcribed. Left out on purpose: playlists and references to other inputs
# (hls, dash, concat, sdp, rtp, rtsp, sap, image2, lavfi, tee, data), devices (alsa, oss, v4l2,
# x11grab, fbdev, kmsgrab), raw PCM (a header-less body is noise) and the long tail of game and
# image formats nobody transcribes (more parsers reachable by untrusted bytes, no user gained).
AUDIO_DEMUXERS = (
    "wav", "w64", "mp3", "flac", "ogg", "matroska", "webm", "mov", "mp4", "m4a", "3gp", "3g2", "aac", "loas",
    "ac3", "eac3", "amr", "amrnb", "amrwb", "aiff", "caf", "au", "g722", "g723_1", "g729", "gsm", "ilbc",
    "qcp", "nistsphere", "voc", "ircam", "sox", "wv", "ape", "tta", "mpc", "mpc8", "dts", "truehd", "mlp",
    "asf", "xwma", "avi", "flv", "mpeg", "mpegts", "nut", "rm", "oma", "shn", "tak",
)
# No protocol may be opened from inside a body: the body itself is read through PyAV's in-memory
# I/O, which is no protocol, so a list naming no protocol refuses every nested open (file, http, udp, crypto,
# concat, subfile, ...) whatever demuxer asks. "none" is no protocol's name (an empty string would
# not be read as a list by every FFmpeg version).
_CONTAINMENT = {
    "format_whitelist": ",".join(AUDIO_DEMUXERS),
    "protocol_whitelist": "none",
    "max_streams": "32",  # FFmpeg's default is 1000 streams, each probed
}
MIN_SAMPLE_RATE = 1_000  # 8 kHz telephony and 4-6 kHz archives pass; below it a file is not speech
MAX_SAMPLE_RATE = 768_000  # 4x the highest studio rate (192 kHz)
MAX_CHANNELS = 8  # 7.1 surround; every channel is decoded before the downmix
MAX_AUDIO_STREAMS = 8  # only the first is transcribed; each one is probed
NOT_AUDIO = ("The body is not an audio file of a supported format. Send wav, flac, mp3, ogg/opus, m4a/aac, "
             "webm/mkv or another common audio or video file.")

# FFmpeg probes up to 5 MB of a file before it reports its streams: 5 ms for a 4 s WAV, most of the
# time spent on a short request outside the engine. WAV and FLAC state everything in their first
# bytes, so those are opened with a small probe (same samples, checked in tests/test_audio.py);
# every other format, and any WAV/FLAC whose small probe leaves the stream undescribed, gets the full one.
_HEADER_PROBE = {"probesize": "8192", "analyzeduration": "0"}


def _described_by_header(data: bytes) -> bool:
    return data[:4] == b"fLaC" or (data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE")


def _open(data: bytes):
    """PyAV's container for `data`, probing only the header where the format allows it; opened only
    by an allowed demuxer, with no protocol reachable (module docstring)."""
    if _described_by_header(data):
        try:
            container = _contained_open(data, _HEADER_PROBE)
        except (av.FFmpegError, ValueError, OSError):
            container = None
        if container is not None:
            try:
                stream = container.streams.audio[0] if container.streams.audio else None
                if stream is not None and stream.codec_context.sample_rate and stream.codec_context.format is not None:
                    return container
            except Exception:  # noqa: BLE001 - a stream the small probe left half-described: probe fully
                pass
            container.close()
    return _contained_open(data, {})


def _contained_open(data: bytes, options: dict[str, str]):
    container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore", options={**options, **_CONTAINMENT})
    names = set((container.format.name or "").split(","))
    if not names & set(AUDIO_DEMUXERS):  # FFmpeg checked the whitelist; a build that did not is caught here
        container.close()
        raise ValueError(f"demuxer {container.format.name!r} is not allowed")
    return container


def open_audio(data: bytes):
    """The container of `data` opened as decode_audio opens it (whitelisted, nothing reached outside
    the bytes), or InvalidAudioError with the fixed NOT_AUDIO message."""
    try:
        return _open(data)
    except (av.FFmpegError, ValueError, OSError) as exc:
        # FFmpeg's text names files and formats (it told an existing file from a missing one): logged only
        logger.info("body refused as not audio: %s", _reason(exc))
        raise InvalidAudioError(NOT_AUDIO) from None


def decode_audio(data: bytes, max_seconds: float | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return mono float32 samples at `sample_rate` decoded from `data`.

    Raises InvalidAudioError for bytes that are not decodable audio (the message says why),
    and PayloadTooLargeError as soon as more than `max_seconds` have been decoded.
    """
    if not data:
        raise InvalidAudioError("The request body is empty: send the audio file's bytes.")
    max_samples = None if max_seconds is None else int(max_seconds * sample_rate)
    with open_audio(data) as container:
        if not container.streams.audio:
            raise InvalidAudioError("The file holds no audio stream. Send a file with an audio track.")
        if len(container.streams.audio) > MAX_AUDIO_STREAMS:
            raise InvalidAudioError(f"The file holds {len(container.streams.audio)} audio streams, more than the "
                                    f"limit of {MAX_AUDIO_STREAMS}. Send a file with one audio track.")
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # a codec FFmpeg has no decoder for (e.g. WAV format tag 0)
            raise InvalidAudioError("The file's audio codec cannot be decoded. Send wav (PCM), flac, mp3, "
                                    "ogg/opus or m4a/aac audio.")
        _check_shape(stream.codec_context.sample_rate, stream.codec_context.channels)
        samples = _decode_stream(container, stream, sample_rate, max_samples)
    if samples.size == 0:
        raise InvalidAudioError(
            "The file decodes to zero audio samples (empty or truncated). Send a complete audio file."
        )
    return samples


RESAMPLE_BLOCK_SAMPLES = 16_000  # decoded frames are resampled in blocks of about this many samples


def _blocks(frames):
    """Consecutive decoded frames joined into blocks of at least RESAMPLE_BLOCK_SAMPLES samples: a WAV
    decodes into frames of ~2,000 samples, and one resampler call per frame cost 3 ms of a 4 s clip."""
    pending: list = []
    key = None
    try:
        for frame in frames:
            frame_key = (frame.format.name, frame.layout.name, frame.sample_rate)
            if pending and frame_key != key:
                yield _joined(pending)
                pending = []
            key = frame_key
            pending.append(frame)
            if sum(f.samples for f in pending) >= RESAMPLE_BLOCK_SAMPLES:
                yield _joined(pending)
                pending = []
    except (av.FFmpegError, ValueError, EOFError):
        if pending:  # what decoded before the bad data is kept (module docstring): hand it over first
            yield _joined(pending)
        raise
    if pending:
        yield _joined(pending)


def _joined(frames: list):
    if len(frames) == 1:
        frame = frames[0]
    else:
        first = frames[0]
        frame = av.AudioFrame.from_ndarray(np.concatenate([f.to_ndarray() for f in frames], axis=1),
                                           format=first.format.name, layout=first.layout.name)
        frame.sample_rate = first.sample_rate
    frame.pts = None  # resample by sample count; broken timestamps must not drop audio
    return frame


def _decode_stream(container, stream, sample_rate: int, max_samples: int | None) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks: list[np.ndarray] = []
    total = 0
    seconds = 0.0  # of input decoded so far: what the output will hold, known before resampling
    try:
        for frame in _blocks(container.decode(stream)):
            _check_shape(frame.sample_rate, len(frame.layout.channels))  # a stream may change mid-way
            seconds += frame.samples / frame.sample_rate
            # checked before the resampler call: it would otherwise allocate the whole block's output
            if max_samples is not None and int(seconds * sample_rate) > max_samples:
                raise _too_long(max_samples, sample_rate)
            for out in resampler.resample(frame):
                total += _append(chunks, out, total, sample_rate)
            if max_samples is not None and total > max_samples:
                raise _too_long(max_samples, sample_rate)
    except (av.FFmpegError, ValueError, EOFError) as exc:
        if total == 0:
            logger.info("audio undecodable from its start: %s", _reason(exc))
            raise InvalidAudioError(
                "The audio could not be decoded: the file is corrupt or truncated. Send a complete, uncorrupted file."
            ) from None
        # trailing junk or a cut: keep the valid part (module docstring)
        logger.warning("audio undecodable after %.2f s (%s): keeping the %.2f s decoded before it",
                       total / sample_rate, _reason(exc), total / sample_rate)
    for out in resampler.resample(None):
        total += _append(chunks, out, total, sample_rate)
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _too_long(max_samples: int, sample_rate: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The audio is longer than the limit of {max_samples / sample_rate:g} s. "
                                "Send shorter audio or split it.")


def _check_shape(rate: int | None, channels: int | None) -> None:
    """Refuse a sample rate or channel count that no speech recording has (module docstring): they
    multiply the work per byte of body."""
    if not rate or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(f"The audio's sample rate of {rate or 0} Hz is outside {MIN_SAMPLE_RATE}-"
                                f"{MAX_SAMPLE_RATE} Hz. Resample it (16 kHz is what the model hears).")
    if channels is not None and channels > MAX_CHANNELS:
        raise InvalidAudioError(f"The audio has {channels} channels, more than the limit of {MAX_CHANNELS}. "
                                "Downmix it to mono or stereo.")


def _append(chunks: list[np.ndarray], frame, before: int, sample_rate: int) -> int:
    array = frame.to_ndarray().reshape(-1)
    with np.errstate(invalid="ignore"):
        sane = np.abs(array) <= MAX_SAMPLE_MAGNITUDE  # False for NaN and infinity too
    if not sane.all():
        first = (before + int(np.argmin(sane))) / sample_rate
        raise InvalidAudioError(
            f"The audio holds samples that are not finite numbers (NaN or infinity) or are far outside the "
            f"audio range, the first at {first:.2f} s: the file is corrupt. Export it again (e.g. as 16-bit PCM "
            "WAV or FLAC)."
        )
    chunks.append(array)
    return array.size


def estimate_seconds(data: bytes) -> float:
    """The audio's length from the container header, without decoding it (for admission control).

    Falls back, when the header states no duration or cannot be read, to the body size as 16 kHz
    16-bit mono PCM (32,000 bytes a second): an over-estimate for compressed audio, which errs on the
    side of refusing rather than overloading. A file that is not audio is refused later anyway."""
    fallback = len(data) / 32_000
    try:
        with _open(data) as container:
            if container.duration and container.duration > 0:
                return float(container.duration) / av.time_base
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:  # noqa: BLE001 - an estimate: any unreadable header takes the fallback
        pass
    return fallback


def _reason(exc: Exception) -> str:
    """FFmpeg's text for the log only: it can hold names from the body (an ffconcat list's file names),
    so anything unprintable is masked and the length cut (no forged log lines)."""
    text = str(exc).strip() or type(exc).__name__
    return "".join(c if c.isprintable() else "?" for c in text[:200])


def encode_pcm16(samples: np.ndarray, rate: int = 24_000) -> bytes:
    """16 kHz float samples -> 16-bit little-endian mono PCM at `rate` (OpenAI's realtime `audio/pcm`
    is 24 kHz): what a live client sends; resampled by PyAV."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(np.asarray(samples, dtype=np.float32).reshape(1, -1), format="flt",
                                       layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frames = resampler.resample(frame) + resampler.resample(None)
    return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in frames)


def release_free_heap() -> None:
    """Hands the C heap's free pages back to the OS (glibc's malloc_trim). The audio of a dropped long
    file (its body in the proxy, its samples in a stub) is freed when its request ends, but glibc keeps
    the pages in its arenas, so without this a process stays at the peak of a storm of dropped
    requests. Called when a process goes idle; a no-op where libc has no malloc_trim."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        logger.debug("malloc_trim is not available")


_trimming = threading.Lock()


def release_free_heap_soon() -> None:
    """`release_free_heap` in a thread of its own (trimming a large heap takes milliseconds, which an
    event loop must not wait for); at most one at a time."""
    if not _trimming.acquire(blocking=False):
        return

    def trim() -> None:
        try:
            release_free_heap()
        finally:
            _trimming.release()

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
