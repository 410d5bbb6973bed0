"""Real speech for tests: espeak-ng speaks English sentences; PyAV re-encodes them into other formats."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np

SENTENCES = [
    "Please send me the report before the meeting on Monday morning.",
    "My favorite color is blue and I like to read books.",
    "Open the window because it is very warm in this room.",
    "We need to buy milk, bread and eggs from the store.",
    "Thank you for calling, how can I help you today?",
    "The cat is sleeping on the sofa next to the fire.",
]


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng (the .ci/run script does this)")
    return path


def speak(text: str, path: Path, voice: str = "en-us", words_per_minute: int = 150) -> Path:
    subprocess.run([require_espeak(), "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                   check=True, timeout=60, capture_output=True)
    return path


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


PAUSES = (0.8, 1.2, 1.6, 2.0, 2.5)


def long_recording(clips: list[np.ndarray], texts: list[str], repeats: int = 40, rate: int = 16000):
    """Sentences joined by pauses of known length: (samples, reference text, [(pause_start, pause_end)])."""
    parts, reference, pauses, t = [], [], [], 0.0
    for k in range(repeats):
        clip = clips[k % len(clips)]
        parts.append(clip)
        reference.append(texts[k % len(texts)])
        t += clip.size / rate
        pause = PAUSES[k % len(PAUSES)]
        pauses.append((t, t + pause))
        parts.append(np.zeros(int(pause * rate), dtype=np.float32))
        t += pause
    return np.concatenate(parts), " ".join(reference), pauses[:-1]
