"""Real speech for tests: espeak-ng speaks English sentences; PyAV re-encodes them into other formats."""

from __future__ import annotations

import io

import av
import numpy as np

from testkit.synthetic_speech import SENTENCES as _SENTENCES
from testkit.synthetic_speech import long_recording, speak  # noqa: F401  (re-exported for the tests)

# the first six of the package's sentences: what the tests were written against
SENTENCES = list(_SENTENCES[:6])


def encode(samples: np.ndarray, rate: int, container: str, codec: str, channels: int = 1,
           out_rate: int | None = None) -> bytes:
    """Encode float samples in [-1, 1] into `container`/`codec` bytes, in memory."""
    out_rate = out_rate or rate
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=out_rate)
        stream.layout = layout
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "-2"}
        data = np.tile(samples.astype(np.float32), (channels, 1))
        frame = av.AudioFrame.from_ndarray(data.reshape(1, -1) if channels == 1 else data.T.reshape(1, -1).copy(),
                                           format="flt", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=out_rate)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(resampled):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


# name -> (container, codec, channels, output rate)
FORMATS = {
    "flac": ("flac", "flac", 1, 16000),
    "mp3": ("mp3", "libmp3lame", 1, 22050),
    "ogg-vorbis": ("ogg", "vorbis", 2, 44100),
    "opus": ("ogg", "libopus", 1, 48000),
    "m4a-aac": ("ipod", "aac", 2, 44100),
    "webm": ("webm", "libopus", 2, 48000),
    "wav-stereo-44k": ("wav", "pcm_s16le", 2, 44100),
    "wav-8k": ("wav", "pcm_s16le", 1, 8000),
}

