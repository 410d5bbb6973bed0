"""The audio of a live session as it arrives (OpenAI's `audio/pcm` at 24 kHz, or G.711 `audio/pcmu` /
`audio/pcma` at 8 kHz as telephony sends it) -> 16 kHz mono float32, piece by piece.

Resampling is PyAV's (FFmpeg's swresample), one resampler per session, so its filter state runs on
across appends and a stream cut into pieces resamples as the whole would (tests/test_live.py).
G.711 is expanded with its standard tables (ITU-T G.711), which numpy applies per byte.
"""

from __future__ import annotations

import av
import numpy as np

from ..contract.realtime import G711_RATE, PCM_RATE
from ..pipeline.audio import SAMPLE_RATE


def _ulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = codes & 0x80, (codes >> 4) & 0x07, codes & 0x0F
    magnitude = ((mantissa << 3) + 0x84) << exponent
    return np.where(sign != 0, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign, exponent, mantissa = codes & 0x80, (codes >> 4) & 0x07, codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


_TABLES = {"audio/pcmu": _ulaw_table(), "audio/pcma": _alaw_table()}
INPUT_RATES = {"audio/pcm": PCM_RATE, "audio/pcmu": G711_RATE, "audio/pcma": G711_RATE}


class LiveAudioInput:
    """Bytes of one session's format in, 16 kHz float32 samples out, in order."""

    def __init__(self, audio_format: str):
        if audio_format not in INPUT_RATES:
            raise ValueError(f"unknown live audio format {audio_format!r}")
        self.format = audio_format
        self.rate = INPUT_RATES[audio_format]
        self._odd = b""  # a 16-bit sample split across two appends
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.input_samples = 0  # samples received at the input rate

    def bytes_per_second(self) -> int:
        return self.rate * (2 if self.format == "audio/pcm" else 1)

    def convert(self, data: bytes) -> np.ndarray:
        if self.format == "audio/pcm":
            data, self._odd = self._odd + data, b""
            if len(data) % 2:
                data, self._odd = data[:-1], data[-1:]
            pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
        else:
            pcm = _TABLES[self.format][np.frombuffer(data, dtype=np.uint8)]
        if pcm.size == 0:
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self.input_samples
        self.input_samples += pcm.size
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
